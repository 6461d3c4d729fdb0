"""Nothing accepted is lost, nothing is answered twice: the real bot process
(`tests.fakes.bot_process`: the real Telegram adapter, manager, worker and a SQLite
file, around the fake engine) killed with SIGKILL or stopped with SIGTERM mid-reply,
then started again, against the fake Bot API server that outlives it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from bot.events import ConversationKey
from storage.database import open_database
from storage.repository import SqlRepository
from tests.fakes.processes import BotProcess, base_env, free_port
from tests.fakes.telegram.objects import Chat, StoredMessage, User
from tests.fakes.telegram.server import FakeTelegramServer

ALICE = User(1001, "Alice", "alice")
GROUP = Chat.group(-500, "Recovery group")
STEP_DELAY = 0.3  # seconds per token: a reply streams for several seconds


def bot_env(server: FakeTelegramServer, database: Path, metrics_port: int | None = None) -> dict[str, str]:
    env = base_env(f"sqlite+aiosqlite:///{database}") | {
        "TELEGRAM_TOKEN": server.token,
        "TELEGRAM_API_BASE": server.api_base,
        "TELEGRAM_EDIT_INTERVAL": "0.1",
    }
    if metrics_port is not None:
        env["METRICS_PORT"] = str(metrics_port)
    return env


async def answered_count(port: int) -> float:
    """`llm_chat_bot_messages_total{outcome="answered"}` as the process's /metrics says."""
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    except aiohttp.ClientError:
        return 0.0  # not up yet
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("llm_chat_bot_messages_total{") and 'outcome="answered"' in line
    )


async def wait_answered(port: int, count: int, timeout: float = 60.0) -> None:
    """Until the process has finished `count` turns (the reply shown AND stored)."""
    deadline = time.monotonic() + timeout
    while (seen := await answered_count(port)) < count:
        assert time.monotonic() < deadline, f"{seen} turns answered, waiting for {count}"
        await asyncio.sleep(0.1)


def replies_to(server: FakeTelegramServer, message: StoredMessage) -> list[StoredMessage]:
    return [m for m in server.bot_messages(GROUP.id) if m.reply_to == message.message_id]


async def stored_history(database: Path) -> list[tuple[str, str, str | None]]:
    async with open_database(f"sqlite+aiosqlite:///{database}") as engine:
        repo = SqlRepository.from_engine(engine)
        try:
            key = ConversationKey("telegram", str(GROUP.id), str(ALICE.id))
            return [(m.role, m.content, m.status) for m in await repo.conversation_messages(key)]
        finally:
            await repo.close()


async def ask_two(server: FakeTelegramServer) -> tuple[StoredMessage, StoredMessage]:
    """Alice asks twice; returns once the first reply is partly shown."""
    first = server.user_sends(GROUP, ALICE, f"@{server.bot.username} first question")
    second = server.user_sends(GROUP, ALICE, f"@{server.bot.username} second question")
    await server.wait_for(
        lambda: any(len(m.text or "") > 3 for m in replies_to(server, first)), timeout=60, what="a partial reply"
    )
    return first, second


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
async def test_a_turn_interrupted_mid_reply_is_answered_exactly_once_after_a_restart(tmp_path: Path, how: str) -> None:
    database = tmp_path / "bot.db"
    async with FakeTelegramServer() as server:
        bot = BotProcess("R", bot_env(server, database), tmp_path, step_delay=STEP_DELAY)
        await bot.start()
        await bot.wait_ready()
        first, second = await ask_two(server)
        if how == "kill -9":
            await bot.kill()
        else:
            assert await bot.stop() == 0
        shown = [m.text for m in replies_to(server, first)]

        port = free_port()
        again = BotProcess("R", bot_env(server, database, port), tmp_path, step_delay=STEP_DELAY)
        await again.start()
        try:
            # The reply shows before the model's end of sequence: wait for the turns' ends.
            await wait_answered(port, 2 if how == "kill -9" else 1)
            assert [m.text for m in replies_to(server, second)] == ["R echo: second question"]
        finally:
            assert await again.stop() == 0
        assert not again.errors(), "\n".join(again.log[-30:])

    first_replies = replies_to(server, first)
    assert len(first_replies) == 1, [m.text for m in first_replies]  # never a second message
    history = await stored_history(database)
    if how == "kill -9":
        # The partial reply was edited into the full answer by the new process.
        assert first_replies[0].text == "R echo: first question", shown
        assert history == [
            ("user", "first question", None),
            ("assistant", "R echo: first question", None),
            ("user", "second question", None),
            ("assistant", "R echo: second question", None),
        ]
    else:
        # Stopped on purpose: what the user saw is what history keeps, marked cut off.
        cut = first_replies[0].text or ""
        shown_part, _, note = cut.rpartition(" … ")
        assert note == "[stopped]" and "R echo: first question".startswith(shown_part), cut
        assert history == [
            ("user", "first question", None),
            ("assistant", cut, "cut_off"),
            ("user", "second question", None),
            ("assistant", "R echo: second question", None),
        ]


async def test_updates_the_dead_process_fetched_are_redelivered_and_answered_once(tmp_path: Path) -> None:
    database = tmp_path / "bot.db"
    async with FakeTelegramServer() as server:
        bot = BotProcess("R", bot_env(server, database), tmp_path, step_delay=0.1)
        await bot.start()
        await bot.wait_ready()
        sent = [server.user_sends(GROUP, ALICE, f"@{server.bot.username} burst {i}") for i in range(6)]
        # Killed while the first answer streams (once it has been edited, so its message
        # id is surely stored): the others were fetched, some accepted, none answered.
        await server.wait_for(
            lambda: any(m.edits for m in replies_to(server, sent[0])), timeout=60, what="a first reply"
        )
        await bot.kill()
        again = BotProcess("R", bot_env(server, database), tmp_path, step_delay=0.1)
        await again.start()
        try:
            await server.wait_for(
                lambda: all(
                    [m.text for m in replies_to(server, s)] == [f"R echo: burst {i}"] for i, s in enumerate(sent)
                ),
                timeout=60,
                what="every message answered once",
            )
        finally:
            assert await again.stop() == 0
    answers = [m for m in server.bot_messages(GROUP.id)]
    assert len(answers) == len(sent), [m.text for m in answers]
    # In the order they were asked.
    assert [m.reply_to for m in answers] == [s.message_id for s in sent]
