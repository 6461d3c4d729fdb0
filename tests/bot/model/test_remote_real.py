"""The OpenAI-compatible backend against a real server: `transformers serve` with the
default model, on 127.0.0.1, offline (slow: marked `model`)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from bot.core import Core
from bot.events import ChatTurn, ConversationKey
from bot.ports import GenerationParams
from tests.conftest import Harness, run_bot_process
from tests.fakes.events import incoming
from tests.fakes.targets import RecordingTarget
from tests.transformers_serve import ServedModel

pytestmark = pytest.mark.model


def served(model: ServedModel, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "model_backend": "openai",
        "openai_base_url": model.base_url,
        "openai_timeout": 120.0,
        "max_new_tokens": 16,
        "temperature": 0.0,
    }
    values.update(overrides)
    return values


async def say(core: Core, text: str, *, user: str = "u1") -> RecordingTarget:
    target = RecordingTarget()
    await core.manager.handle(incoming(text, user=user, chat="g1"), target)
    return target


def test_terminal_chat_answers_through_transformers_serve_without_loading_a_model(
    transformers_serve: ServedModel, tmp_path: Path
) -> None:
    env = {
        "MODEL_BACKEND": "openai",
        "OPENAI_BASE_URL": transformers_serve.base_url,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
        "MAX_NEW_TOKENS": "24",
        "LOG_LEVEL": "INFO",
    }
    proc = run_bot_process(tmp_path, "What is the capital of France?\n/model\n/reset\n", env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    assert f"Model: {transformers_serve.model_id} (the default)" in proc.stdout
    assert "forgot our conversation (2 messages)" in proc.stdout
    assert "Loading model" not in proc.stderr  # no local model in this mode


async def test_reset_mid_reply_ends_the_generation_on_the_server(
    harness: Harness, transformers_serve: ServedModel
) -> None:
    server = psutil.Process(transformers_serve.pid)
    async with harness.core(**served(transformers_serve, max_new_tokens=400)) as core:
        target = RecordingTarget()
        long = asyncio.create_task(
            core.manager.handle(incoming("Write a very long story about a cat.", chat="g1"), target)
        )
        await asyncio.wait_for(target.first_send.wait(), 120)
        await say(core, "/reset")
        await asyncio.wait_for(long, 10)
        # transformers serve generates one request at a time: had the story gone on, this
        # short request would wait behind its ~400 tokens.
        prompt = await core.model.render(None, [ChatTurn("user", "Say hello.")])
        started = time.monotonic()
        short = [c async for c in core.model.generate(prompt, GenerationParams(max_new_tokens=4))]
        short_s = time.monotonic() - started
        await asyncio.sleep(0.5)
        before = sum(server.cpu_times()[:2])
        await asyncio.sleep(2.0)
        idle_cpu = sum(server.cpu_times()[:2]) - before
    assert "[stopped]" in target.text
    assert short[-1].finish_reason is not None
    assert short_s < 10, f"the short request waited {short_s:.1f} s: the cancelled story kept generating"
    assert idle_cpu < 0.5, f"the server used {idle_cpu:.2f} s of CPU in 2 s after the stream was closed"
    assert await harness.repo.recent_messages(ConversationKey("telegram", "g1", "u1"), 5) == []


async def test_four_users_at_once_all_get_answers(harness: Harness, transformers_serve: ServedModel) -> None:
    questions = {
        "u1": "What is the capital of France?",
        "u2": "What is 2 + 2?",
        "u3": "Name a colour.",
        "u4": "Say hello.",
    }
    async with harness.core(**served(transformers_serve, max_new_tokens=12)) as core:
        targets = await asyncio.gather(*(say(core, q, user=u) for u, q in questions.items()))
        stats = core.model.stats()
    assert all(t.text.strip() and "Sorry" not in t.text and "unavailable" not in t.text for t in targets)
    assert "Paris" in targets[0].text
    for user in questions:
        history = await harness.repo.recent_messages(ConversationKey("telegram", "g1", user), 5)
        assert [m.role for m in history] == ["user", "assistant"]
        assert 1 <= history[-1].token_count <= 12
    assert stats.tokens_generated >= 4 and stats.active == 0


async def test_config_set_model_accepts_only_an_id_the_server_lists(
    harness: Harness, transformers_serve: ServedModel
) -> None:
    async with harness.core(**served(transformers_serve)) as core:
        refused = (await say(core, "/config set model gpt-4o", user="admin")).text
        accepted = (await say(core, f"/config set model {transformers_serve.model_id}", user="admin")).text
    assert "Unknown model 'gpt-4o'" in refused and transformers_serve.model_id in refused
    assert "model is now" in accepted
    key = ConversationKey("telegram", "g1", "admin")
    assert await harness.repo.get_settings(key) == {"model": transformers_serve.model_id}
