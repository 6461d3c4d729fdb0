"""Telegram answered by a real model server: the fake Bot API, the real adapter and
core, and `transformers serve` with the default model (slow: marked `model`)."""

from __future__ import annotations

import pytest

from tests.adapters.telegram.chats import BOB
from tests.adapters.telegram.conftest import RunAdapter, private_question_is_answered_and_stored
from tests.conftest import Harness
from tests.fakes.telegram import FakeTelegramServer
from tests.transformers_serve import ServedModel


@pytest.mark.model
async def test_a_model_server_answers_a_private_message_through_telegram(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness, transformers_serve: ServedModel
) -> None:
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
        reply = await private_question_is_answered_and_stored(
            server, harness.repo, BOB, "What is the capital of France?"
        )
    assert "Paris" in reply.content
    assert 1 <= reply.token_count <= 16
