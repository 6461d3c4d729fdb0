"""Telegram end to end: the fake Bot API server, the real adapter on python-telegram-bot,
the real `ConversationManager`, `Worker(FakeEngine)` and a SQLite repository."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from bot.chat import conversation
from bot.chat.conversation import ConversationManager
from bot.events import ConversationKey, IncomingMessage
from storage.repository import SqlRepository
from tests.adapters.telegram.chats import ALICE, BOB, CAROL, GROUP, PRIVATE_ALICE, PRIVATE_BOB
from tests.adapters.telegram.conftest import RunAdapter, free_port
from tests.conftest import Harness
from tests.fakes.fake_engine import SPECIAL_BASE, FakeEngine
from tests.fakes.telegram import Chat, FakeTelegramServer, User


def overrides(server: FakeTelegramServer, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "telegram_token": server.token,
        "telegram_api_base": server.api_base,
        "telegram_edit_interval": 0.0,
        "admin_ids": f"telegram:{ALICE.id}",
    }
    values.update(extra)
    return values


def tg_key(chat: Chat, user_id: int) -> ConversationKey:
    return ConversationKey("telegram", str(chat.id), str(user_id))


async def ask(
    server: FakeTelegramServer, chat: Chat, user: User, text: str, expect: str | Callable[[str], bool]
) -> None:
    """Send `text` and wait until the bot's reply to it says `expect` (or satisfies it)."""
    before = len(server.bot_messages(chat.id))
    sent = server.user_sends(chat, user, text)
    check = expect if callable(expect) else expect.__eq__

    def answered() -> bool:
        new = server.bot_messages(chat.id)[before:]
        if chat.type != "private":
            new = [m for m in new if m.reply_to == sent.message_id]
        return bool(new) and check(new[0].text or "")

    await server.wait_for(answered, what=f"the reply to {text!r} to be {expect!r}")


async def test_a_private_chat_is_answered_by_the_model_and_stored(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    settings = overrides(server)
    async with harness.manager(**settings) as manager, run_adapter(manager, settings=harness.settings(**settings)):
        sent = server.user_sends(PRIVATE_BOB, BOB, "hello model")
        await server.wait_for(lambda: server.bot_texts(BOB.id) == ["Echo: hello model"])
    stored = await harness.repo.recent_messages(tg_key(PRIVATE_BOB, BOB.id), 10)
    (reply,) = server.bot_messages(BOB.id)
    assert [(m.role, m.content, m.platform_message_id) for m in stored] == [
        ("user", "hello model", str(sent.message_id)),
        ("assistant", "Echo: hello model", str(reply.message_id)),
    ]
    assert not server.calls_to("sendChatAction")  # the reply came at once: no "typing…" needed


async def test_a_slow_answer_shows_typing_first(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    harness.engine.step_delay = 0.05  # about 1 s for this reply
    settings = overrides(server)
    async with harness.manager(**settings) as manager, run_adapter(manager, settings=harness.settings(**settings)):
        await ask(server, GROUP, BOB, "@LlmTestBot take your time please", "Echo: take your time please")
    typing = server.calls_to("sendChatAction")
    assert typing and typing[0].params == {"chat_id": GROUP.id, "action": "typing"}


async def test_each_user_in_a_group_has_a_conversation_of_their_own(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    settings = overrides(server)
    async with harness.manager(**settings) as manager, run_adapter(manager, settings=harness.settings(**settings)):
        await ask(server, GROUP, BOB, "@LlmTestBot I am Bob", "Echo: I am Bob")
        await ask(server, GROUP, CAROL, "@LlmTestBot I am Carol", "Echo: I am Carol")
        server.user_sends(GROUP, BOB, "nobody asked the bot")  # not addressed: not stored
        await ask(server, GROUP, BOB, "/reset", "Done: I forgot our conversation (2 messages).")
    assert await harness.repo.recent_messages(tg_key(GROUP, BOB.id), 10) == []
    carol = await harness.repo.recent_messages(tg_key(GROUP, CAROL.id), 10)
    assert [m.content for m in carol] == ["I am Carol", "Echo: I am Carol"]


async def test_admin_commands_need_a_bot_admin_or_for_chat_scope_a_chat_admin(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    server.set_member_status(GROUP.id, CAROL.id, "administrator")
    settings = overrides(server)
    async with harness.manager(**settings) as manager, run_adapter(manager, settings=harness.settings(**settings)):
        # Bot-wide statistics: only the bot admins of ADMIN_IDS.
        await ask(server, PRIVATE_BOB, BOB, "/stats", "Only admins can do that.")
        await ask(server, PRIVATE_ALICE, ALICE, "/stats", lambda reply: reply.startswith("Users: "))
        await ask(server, GROUP, CAROL, "/stats@LlmTestBot", "Only admins can do that.")
        # Session settings in a group: chat admins too, but not ordinary members.
        await ask(server, GROUP, BOB, "/config set temperature 0.5", "Only admins can do that.")
        await ask(server, GROUP, CAROL, "/config set temperature 0.5", "temperature is now 0.5 for this session.")
    assert await harness.repo.get_settings(tg_key(GROUP, CAROL.id)) == {"temperature": 0.5}
    assert await harness.repo.get_settings(tg_key(GROUP, BOB.id)) == {}


class ChunkyEngine(FakeEngine):
    """The fake engine with tokens of up to 50 characters: with one character per token
    no reply allowed by the context (at most 2048 tokens) could pass 4096 characters."""

    CHUNK = 50

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._vocab_lock = threading.Lock()
        self._chunk_ids: dict[str, int] = {}
        self._chunks: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        ids = []
        with self._vocab_lock:
            for start in range(0, len(text), self.CHUNK):
                chunk = text[start : start + self.CHUNK]
                if chunk not in self._chunk_ids:
                    self._chunk_ids[chunk] = 0x100000 + len(self._chunk_ids)  # private-use plane
                    self._chunks[self._chunk_ids[chunk]] = chunk
                ids.append(self._chunk_ids[chunk])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        with self._vocab_lock:
            return "".join(self._chunks.get(i, "") for i in ids if i < SPECIAL_BASE)


async def test_a_long_model_reply_is_split_into_messages_of_at_most_4096_chars(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    lines = [f"Line {i}: " + "word " * 60 for i in range(40)]  # ~12.7k chars
    long_reply = "\n".join(line.rstrip() for line in lines)
    harness.engine = ChunkyEngine(reply=lambda _text: long_reply)
    settings = overrides(server, telegram_edit_interval=0.02, max_new_tokens=1000)
    async with harness.manager(**settings) as manager, run_adapter(manager, settings=harness.settings(**settings)):
        server.user_sends(PRIVATE_BOB, BOB, "write me an essay")
        await server.wait_for(lambda: "\n".join(server.bot_texts(BOB.id)) == long_reply, timeout=20)
    texts = server.bot_texts(BOB.id)
    assert len(texts) == 4 and all(len(t) <= 4096 for t in texts)
    assert all(t.startswith("Line ") for t in texts)  # cut at line boundaries
    assert not [c for c in server.calls if c.status == 400]
    stored = await harness.repo.recent_messages(tg_key(PRIVATE_BOB, BOB.id), 10)
    assert stored[-1].content == long_reply


@pytest.mark.filterwarnings("ignore:.*attribute `retry_after`:DeprecationWarning")
async def test_a_blocked_user_costs_nothing_but_their_reply(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    settings = overrides(server)
    server.block(ALICE.id)
    server.fail_next("sendMessage", status=429, retry_after=0.2, chat_id=BOB.id)
    async with harness.manager(**settings) as manager, run_adapter(manager, settings=harness.settings(**settings)):
        server.user_sends(PRIVATE_ALICE, ALICE, "are you there")
        await server.wait_for(lambda: any(c.status == 403 for c in server.calls_to("sendMessage")))
        await ask(server, PRIVATE_BOB, BOB, "and me?", "Echo: and me?")
    alice = await harness.repo.recent_messages(tg_key(PRIVATE_ALICE, ALICE.id), 10)
    # the question is kept, though the reply never arrived (and so is not stored)
    assert [(m.role, m.content) for m in alice] == [("user", "are you there")]


async def test_stopping_the_adapter_while_the_manager_runs_is_clean(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    settings = overrides(server)
    manager: ConversationManager
    async with harness.manager(**settings) as manager:
        async with run_adapter(manager, settings=harness.settings(**settings)):
            await ask(server, PRIVATE_BOB, BOB, "one", "Echo: one")
        async with run_adapter(manager, settings=harness.settings(**settings)):
            await ask(server, PRIVATE_BOB, BOB, "two", "Echo: two")
    stored = await harness.repo.recent_messages(tg_key(PRIVATE_BOB, BOB.id), 10)
    assert [m.content for m in stored] == ["one", "Echo: one", "two", "Echo: two"]


async def test_history_and_settings_follow_a_group_upgraded_to_a_supergroup(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    upgraded = Chat.supergroup(-1_000_000_000_778, "Tea party, upgraded")
    settings = overrides(server)  # ALICE is a bot admin: she may /config set
    async with harness.manager(**settings) as manager, run_adapter(manager, settings=harness.settings(**settings)):
        await ask(server, GROUP, ALICE, "@LlmTestBot my name is Alice", "Echo: my name is Alice")
        await ask(server, GROUP, ALICE, "/config set max_new_tokens 100", lambda text: "100" in text)
        server.upgrade(GROUP, upgraded, by=ALICE)
        for _ in range(250):  # the move is one quick UPDATE; wait until it is committed
            if await harness.repo.recent_messages(tg_key(upgraded, ALICE.id), 1):
                break
            await asyncio.sleep(0.02)
        await ask(server, upgraded, ALICE, "@LlmTestBot what is my name?", "Echo: what is my name?")
        await ask(server, upgraded, ALICE, "/config", lambda text: "100" in text)

    assert "my name is Alice" in harness.engine.added[-1]  # the old turns are in the prompt
    stored = await harness.repo.recent_messages(tg_key(upgraded, ALICE.id), 10)
    assert [m.content for m in stored] == [
        "my name is Alice",
        "Echo: my name is Alice",
        "what is my name?",
        "Echo: what is my name?",
    ]
    # Nothing stays behind under the old chat id (a fresh repository: no cached ids).
    assert await SqlRepository.from_engine(harness.db).recent_messages(tg_key(GROUP, ALICE.id), 10) == []


# --------------------------------------------------------------------------- nothing lost, nothing twice


async def test_a_polling_update_delivered_again_after_a_restart_is_answered_once(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    settings = overrides(server)
    async with harness.manager(**settings) as manager:
        async with run_adapter(manager, settings=harness.settings(**settings)):
            sent = server.user_sends(PRIVATE_BOB, BOB, "answer me once")
            await server.wait_for(lambda: server.bot_texts(BOB.id) == ["Echo: answer me once"])
        # The process died before its next getUpdates confirmed the batch: Telegram
        # delivers the update again to the next start.
        server.updates.append({"update_id": sent.update_id, "message": sent.json})
        async with run_adapter(manager, settings=harness.settings(**settings)):
            await server.wait_for(lambda: server.pending_updates == 0)
            await ask(server, PRIVATE_BOB, BOB, "and this one", "Echo: and this one")
    assert server.bot_texts(BOB.id) == ["Echo: answer me once", "Echo: and this one"]
    stored = await harness.repo.recent_messages(tg_key(PRIVATE_BOB, BOB.id), 10)
    assert [m.content for m in stored] == [
        "answer me once",
        "Echo: answer me once",
        "and this one",
        "Echo: and this one",
    ]


async def test_a_webhook_call_telegram_repeats_is_answered_once(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    port = free_port()
    settings = overrides(
        server,
        telegram_webhook_url=f"http://127.0.0.1:{port}/hook",
        telegram_webhook_listen="127.0.0.1",
        telegram_webhook_port=port,
    )
    async with harness.manager(**settings) as manager, run_adapter(manager, settings=harness.settings(**settings)):
        sent = server.user_sends(PRIVATE_BOB, BOB, "via the webhook")
        await server.wait_for(lambda: server.bot_texts(BOB.id) == ["Echo: via the webhook"])
        # Telegram did not see the 200 in time and posts the same update again.
        server.deliver_to_webhook({"update_id": sent.update_id, "message": sent.json})
        await server.wait_for(lambda: len(server.webhook_deliveries) == 2)
        await ask(server, PRIVATE_BOB, BOB, "next", "Echo: next")
    assert server.bot_texts(BOB.id) == ["Echo: via the webhook", "Echo: next"]


async def test_a_reply_telegram_refuses_with_5xx_is_kept_and_delivered_later(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversation, "REDELIVERY_DELAYS_S", (0.3,))
    server.fail_next("sendMessage", status=500, times=4)  # more than the retries
    settings = overrides(server)
    async with harness.manager(**settings) as manager, run_adapter(manager, settings=harness.settings(**settings)):
        server.user_sends(PRIVATE_BOB, BOB, "are you there")
        await server.wait_for(lambda: server.bot_texts(BOB.id) == ["Echo: are you there"], timeout=10)
        for _ in range(100):  # until the late delivery is recorded too
            if not await harness.repo.open_turns("telegram"):
                break
            await asyncio.sleep(0.05)
    assert [c.status for c in server.calls_to("sendMessage")] == [500, 500, 500, 500, 200]
    stored = await harness.repo.recent_messages(tg_key(PRIVATE_BOB, BOB.id), 10)
    assert [m.content for m in stored] == ["are you there", "Echo: are you there"]


async def test_a_send_whose_answer_timed_out_is_not_repeated_at_once(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversation, "REDELIVERY_DELAYS_S", (1.5,))
    server.delay_next("sendMessage", 1.0)  # carried out, answered after the client gave up
    settings = overrides(server)
    async with (
        harness.manager(**settings) as manager,
        run_adapter(manager, settings=harness.settings(**settings), send_timeout=0.3),
    ):
        server.user_sends(PRIVATE_BOB, BOB, "slow telegram")
        await server.wait_for(lambda: len(server.calls_to("sendMessage")) == 1)
        await asyncio.sleep(1.0)  # the timed-out send is not retried on the spot
        assert len(server.calls_to("sendMessage")) == 1
        await server.wait_for(lambda: "Echo: slow telegram" in server.bot_texts(BOB.id), timeout=10)
    # The late answer is the whole reply, once; what the timed-out send showed stays a
    # prefix of it (the documented price of never losing a reply).
    texts = server.bot_texts(BOB.id)
    assert texts.count("Echo: slow telegram") == 1 and len(texts) <= 2
    assert all("Echo: slow telegram".startswith(t) for t in texts)


async def test_a_turn_accepted_before_a_restart_is_answered_in_its_forum_topic(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    forum = Chat.supergroup(-1_000_000_000_556, "Forum")
    asked = server.user_sends(forum, BOB, "@LlmTestBot what did I miss?")
    event = IncomingMessage(
        platform="telegram",
        chat_id=f"{forum.id}/12",
        user_id=str(BOB.id),
        display_name="Bob",
        message_id=str(asked.message_id),
        text="what did I miss?",
        is_private=False,
        timestamp=datetime.now(UTC),
        thread_id="12",
    )
    assert await harness.repo.accept_turn(event, "message", 4) is not None  # then the process died
    server.updates.clear()  # that update was confirmed before the crash
    settings = overrides(server)
    async with harness.manager(**settings) as manager, run_adapter(manager, settings=harness.settings(**settings)):
        await server.wait_for(lambda: server.bot_texts(forum.id) == ["Echo: what did I miss?"])
    (reply,) = server.bot_messages(forum.id)
    assert (reply.reply_to, reply.thread_id) == (asked.message_id, 12)
    assert await harness.repo.open_turns("telegram") == []
