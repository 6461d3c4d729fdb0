"""Two real bot processes sharing one PostgreSQL database (`tests.fakes.bot_process`: the
real bot around the fake engine), against the fake Telegram Bot API and the fake Discord.

- Telegram webhook mode behind a load balancer: one chat's updates go to the two
  processes in turn; each message is answered once, in order, and the history is exact;
  a setting changed through one process applies in the other.
- Discord with the shards split between the processes: each guild is served by exactly
  the process that runs its shard.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.events import ConversationKey
from storage.database import open_database
from storage.repository import SqlRepository
from tests.fakes.discord.server import FakeDiscordServer
from tests.fakes.discord.world import FakeGuild
from tests.fakes.processes import BotProcess, base_env, free_port
from tests.fakes.telegram.objects import Chat, User
from tests.fakes.telegram.server import FakeTelegramServer

pytestmark = pytest.mark.parametrize("db_backend", ["postgresql"])

ALICE = User(1001, "Alice", "alice")
PRIVATE_ALICE = Chat.private(ALICE)


@contextlib.asynccontextmanager
async def bot_processes(envs: dict[str, dict[str, str]], cwd: Path) -> AsyncIterator[dict[str, BotProcess]]:
    """Start one process per name, wait until all are ready; stop them all on exit."""
    processes = {name: BotProcess(name, env, cwd) for name, env in envs.items()}
    try:
        for process in processes.values():
            await process.start()
        await asyncio.gather(*(p.wait_ready() for p in processes.values()))
        yield processes
    finally:
        codes = {name: await p.stop() for name, p in processes.items()}
        for name, p in processes.items():
            errors = [line for line in p.log if " ERROR " in line or "Traceback" in line]
            assert not errors, f"{name}: " + "\n".join(p.log[-40:])
        assert all(code == 0 for code in codes.values()), codes


async def test_telegram_webhook_updates_of_one_chat_split_across_two_processes(
    database_url: str, tmp_path: Path
) -> None:
    ports = {"A": free_port(), "B": free_port()}
    async with FakeTelegramServer() as server:
        public_url = f"http://127.0.0.1:{ports['A']}/telegram"  # what both register; the balancer splits
        server.webhook_backends = [f"http://127.0.0.1:{ports[name]}/telegram" for name in ("A", "B")]
        envs = {
            name: base_env(database_url)
            | {
                "TELEGRAM_TOKEN": server.token,
                "TELEGRAM_API_BASE": server.api_base,
                "TELEGRAM_WEBHOOK_URL": public_url,
                "TELEGRAM_WEBHOOK_LISTEN": "127.0.0.1",
                "TELEGRAM_WEBHOOK_PORT": str(port),
                "TELEGRAM_WEBHOOK_SECRET": "shared-secret",
                "TELEGRAM_EDIT_INTERVAL": "0.1",
                "ADMIN_IDS": f"telegram:{ALICE.id}",
            }
            for name, port in ports.items()
        }
        async with bot_processes(envs, tmp_path):
            # "ready" comes before the adapters are up: both register the webhook after it.
            await server.wait_for(lambda: len(server.calls_to("setWebhook")) == 2, timeout=20)
            texts = [f"message {i}" for i in range(8)]
            for text in texts:
                server.user_sends(PRIVATE_ALICE, ALICE, text)
                await asyncio.sleep(0.1)  # each arrives while the previous reply is still running
            # Update i went to process A for even i, to B for odd i.
            expected = [f"{'AB'[i % 2]} echo: {text}" for i, text in enumerate(texts)]
            try:
                await server.wait_for(lambda: server.bot_texts(ALICE.id) == expected, timeout=30)
            except AssertionError:
                raise AssertionError(f"answers: {server.bot_texts(ALICE.id)}, expected {expected}") from None

            # A setting changed through one process is used by the other's next turn.
            server.user_sends(PRIVATE_ALICE, ALICE, "/config set history_turns 3")  # -> A
            await server.wait_for(lambda: len(server.bot_texts(ALICE.id)) == 9, timeout=10)
            server.user_sends(PRIVATE_ALICE, ALICE, "/config")  # -> B
            await server.wait_for(lambda: len(server.bot_texts(ALICE.id)) == 10, timeout=10)
            assert "history_turns = 3 (set for this session)" in server.bot_texts(ALICE.id)[-1]

        assert [status for _, status in server.webhook_deliveries] == [200] * 10

    async with open_database(database_url) as engine:
        repo = SqlRepository.from_engine(engine)
        history = await repo.recent_messages(ConversationKey("telegram", str(ALICE.id), str(ALICE.id)), 100)
        await repo.close()
    # One turn at a time across both processes: every question is followed by its answer.
    assert [(m.role, m.content) for m in history] == [
        pair for i, text in enumerate(texts) for pair in (("user", text), ("assistant", expected[i]))
    ]


async def test_discord_shards_split_across_two_processes_serve_each_guild_once(
    database_url: str, tmp_path: Path
) -> None:
    async with FakeDiscordServer() as server:
        alice = server.add_user("alice")
        guilds: list[FakeGuild] = []
        while {(g.id >> 22) % 4 for g in guilds} != {0, 1, 2, 3}:  # a guild on every shard
            guild = server.add_guild(f"guild {len(guilds)}")
            server.add_member(guild, alice)
            server.add_text_channel(guild, "general")
            guilds.append(guild)
            await asyncio.sleep(0.002)  # a snowflake's shard comes from its millisecond
        envs = {
            name: base_env(database_url)
            | {
                "DISCORD_TOKEN": server.token,
                "DISCORD_API_BASE": server.base_url,
                "DISCORD_GATEWAY_URL": server.gateway_url,
                "DISCORD_EDIT_INTERVAL": "0.1",
                "DISCORD_SHARD_COUNT": "4",
                "DISCORD_SHARD_IDS": shard_ids,
            }
            for name, shard_ids in (("A", "0,1"), ("B", "2,3"))
        }
        async with bot_processes(envs, tmp_path):
            await server.wait_identified(4, timeout=40)
            assert sorted(i["shard"] for i in server.identifies) == [[0, 4], [1, 4], [2, 4], [3, 4]]
            for guild in guilds:
                await server.user_sends(guild.channels[0], alice, f"{server.bot.mention} hello from {guild.name}")
            expected = {
                guild.id: [f"{'A' if (guild.id >> 22) % 4 in (0, 1) else 'B'} echo: hello from {guild.name}"]
                for guild in guilds
            }
            await server.wait_for(
                lambda: {g.id: server.bot_texts(g.channels[0]) for g in guilds} == expected, timeout=20
            )
            await asyncio.sleep(0.3)  # nothing more arrives: no guild was answered twice
            assert {g.id: server.bot_texts(g.channels[0]) for g in guilds} == expected
