"""The real default model answering through Discord: fake Discord, real discord.py
client, real adapter, manager, worker and SQLite."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from bot.events import ConversationKey
from tests.adapters.discord.conftest import RunAdapter, World, assert_pings_no_one
from tests.conftest import Harness
from tests.fakes.discord.server import FakeDiscordServer

if TYPE_CHECKING:
    from bot.model.hf import HFEngine


@pytest.mark.model
async def test_default_model_answers_a_mention_in_a_server_channel(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness, default_engine: HFEngine
) -> None:
    async with (
        harness.core(default_engine, max_new_tokens=24, temperature=0.0) as core,
        run_adapter(core.manager, discord_edit_interval=0.2) as adapter,
    ):
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} What is the capital of France?")
        await server.wait_for(lambda: bool(server.bot_texts(world.general)), timeout=120)
        await server.wait_for(lambda: adapter.in_flight == 0, timeout=120)
    texts = server.bot_texts(world.general)
    assert len(texts) == 1 and "Paris" in texts[0]
    assert_pings_no_one(server)
    stored = await harness.repo.recent_messages(
        ConversationKey("discord", str(world.general.id), str(world.alice.id)), 5
    )
    assert [m.role for m in stored] == ["user", "assistant"]
    assert stored[0].content == "What is the capital of France?"
    assert stored[1].content == texts[0]
