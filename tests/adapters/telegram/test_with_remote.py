"""Telegram answered by a real model server: the fake Bot API, the real adapter and
core, and `transformers serve` with the default model (slow: marked `model`)."""

from __future__ import annotations

import asyncio
import time

import pytest

from bot.events import ConversationKey
from tests.adapters.telegram.chats import BOB
from tests.adapters.telegram.conftest import RunAdapter
from tests.conftest import Harness
from tests.fakes.telegram import Chat, FakeTelegramServer
from tests.transformers_serve import ServedModel


@pytest.mark.model
async def test_a_model_server_answers_a_private_message_through_telegram(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness, transformers_serve: ServedModel
) -> None:
    key = ConversationKey("telegram", str(BOB.id), str(BOB.id))
    async with (
        harness.core(
            model_backend="openai",
            openai_base_url=transformers_serve.base_url,
            openai_timeout=120.0,
            telegram_token=server.token,
            telegram_api_base=server.api_base,
            telegram_edit_interval=0.2,
            max_new_tokens=16,
            temperature=0.0,
        ) as core,
        run_adapter(core.manager, settings=core.settings),
    ):
        server.user_sends(Chat.private(BOB), BOB, "What is the capital of France?")
        deadline = time.monotonic() + 120
        while len(stored := await harness.repo.recent_messages(key, 10)) < 2:
            assert time.monotonic() < deadline, f"no reply stored; the chat shows {server.bot_texts(BOB.id)}"
            await asyncio.sleep(0.2)
    reply = stored[-1]
    assert reply.role == "assistant" and "Paris" in reply.content
    assert server.bot_texts(BOB.id) == [reply.content]  # the chat shows exactly what was stored
    assert reply.platform_message_id == str(server.bot_messages(BOB.id)[0].message_id)
    assert 1 <= reply.token_count <= 16
