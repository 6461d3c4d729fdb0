"""The real default model answering through Telegram (slow: loads SmolLM2-135M)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.adapters.telegram.chats import BOB
from tests.adapters.telegram.conftest import RunAdapter, private_question_is_answered_and_stored
from tests.conftest import Harness
from tests.fakes.telegram import FakeTelegramServer

if TYPE_CHECKING:
    from bot.model.hf import HFEngine


@pytest.mark.model
async def test_the_default_model_answers_a_private_message_through_telegram(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness, default_engine: HFEngine
) -> None:
    async with (
        harness.core(
            default_engine,
            telegram_token=server.token,
            telegram_api_base=server.api_base,
            telegram_edit_interval=0.2,
            max_new_tokens=16,
            temperature=0.0,
            max_batch_size=2,
            queue_size=4,
        ) as core,
        run_adapter(core.manager, settings=core.settings),
    ):
        reply = await private_question_is_answered_and_stored(
            server, harness.repo, BOB, "What is the capital of France?"
        )
    assert reply.content.strip()
    assert 1 <= reply.token_count <= 16  # the tokens the model generated, within max_new_tokens
