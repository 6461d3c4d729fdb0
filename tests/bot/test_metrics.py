"""Prometheus metrics (bot/metrics.py), scraped over HTTP from the real core (manager,
worker, SQLite) around the fake engine while it converses: the counters move by the
right amounts, the histograms get samples, the gauges show the queue, and `/stats`
reads the same numbers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.config import Settings
from bot.core import Core
from bot.events import ChatTurn
from bot.metrics import MeteredBackend, Metrics
from bot.ports import GenerationParams
from tests.conftest import Harness
from tests.fakes.events import incoming
from tests.fakes.targets import RecordingTarget

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(core: Core) -> Samples:
    """Every sample /metrics serves, by name and labels."""
    assert core.health is not None
    async with aiohttp.ClientSession() as http, http.get(f"{core.health.url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def model_labels(core: Core) -> dict[str, str]:
    return {"model_name": core.model.model_name}


@contextlib.asynccontextmanager
async def metered_core(harness: Harness, **overrides: Any) -> AsyncIterator[Core]:
    async with harness.core(metrics_port=0, **overrides) as core:
        assert isinstance(core.model, MeteredBackend) and core.metrics is not None
        yield core


async def test_counters_move_by_what_a_conversation_did(harness: Harness) -> None:
    # A few ms per token: the tokens of a reply reach the manager as several pieces (an
    # instant fake can hand over a whole reply as one, leaving no gap between tokens).
    harness.engine.step_delay = 0.005
    async with metered_core(harness) as core:
        model = model_labels(core)
        before = await scrape(core)
        assert value(before, "llm_chat_bot_messages_total", platform="telegram", outcome="answered") == 0
        for text in ("first question", "second, longer question", "third"):
            await core.manager.handle(incoming(text), RecordingTarget())
        await core.manager.handle(incoming("/help"), RecordingTarget())
        after = await scrape(core)

    answered = value(after, "llm_chat_bot_messages_total", platform="telegram", outcome="answered")
    assert answered == 3
    assert value(after, "llm_chat_bot_messages_total", platform="telegram", outcome="command") == 1
    # Tokens: what the engine was given and what it produced, exactly.
    prompt_tokens = sum(len(ids) for ids in harness.engine.added_ids)
    assert value(after, "llm_chat_bot_prompt_tokens_total", **model) == prompt_tokens
    history = await harness.repo.recent_messages(incoming("x").key, 100)
    generated = sum(m.token_count for m in history if m.role == "assistant")
    assert generated > 3
    assert value(after, "llm_chat_bot_generation_tokens_total", **model) == generated
    # Histograms: one sample per request.
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert value(after, f"llm_chat_bot_{histogram}_seconds_count", **model) == 3, histogram
        assert value(after, f"llm_chat_bot_{histogram}_seconds_sum", **model) >= 0
    # One per token after each reply's first piece (a piece carries the tokens made while
    # the manager was busy; the fake engine is fast enough to put several in one).
    assert 0 < value(after, "llm_chat_bot_inter_token_latency_seconds_count", **model) <= generated - 3
    assert value(after, "llm_chat_bot_e2e_request_latency_seconds_sum", **model) > 0
    # Buckets are cumulative and end in +Inf with the count.
    assert value(after, "llm_chat_bot_time_to_first_token_seconds_bucket", le="+Inf", **model) == 3


async def test_gauges_show_the_requests_running_and_waiting(harness: Harness) -> None:
    harness.engine.step_delay = 0.05  # replies take a while
    async with metered_core(harness, max_batch_size=1) as core:
        model = model_labels(core)
        idle = await scrape(core)
        assert value(idle, "llm_chat_bot_num_requests_running", **model) == 0
        assert value(idle, "llm_chat_bot_num_requests_waiting", **model) == 0
        targets = [RecordingTarget() for _ in range(3)]
        tasks = [
            asyncio.create_task(core.manager.handle(incoming(f"question {i}", user=f"user{i}"), target))
            for i, target in enumerate(targets)
        ]
        await targets[0].first_send.wait()
        for _ in range(500):  # the other two reach the worker's queue
            busy = await scrape(core)
            if value(busy, "llm_chat_bot_num_requests_waiting", **model) == 2:
                break
            await asyncio.sleep(0.01)
        assert value(busy, "llm_chat_bot_num_requests_waiting", **model) == 2
        assert value(busy, "llm_chat_bot_num_requests_running", **model) == 1  # one batch slot
        assert value(busy, "llm_chat_bot_batch_size", **model) == 1
        await asyncio.gather(*tasks)
        done = await scrape(core)
        assert value(done, "llm_chat_bot_num_requests_running", **model) == 0
        # Waiting behind others shows in the queue time (the first found the worker idle).
        assert value(done, "llm_chat_bot_request_queue_time_seconds_sum", **model) > 0.05


async def test_stats_reads_the_same_numbers(harness: Harness) -> None:
    async with metered_core(harness) as core:
        for text in ("one", "two"):
            await core.manager.handle(incoming(text), RecordingTarget())
        await core.manager.handle(incoming(""), RecordingTarget())  # refused: empty
        assert core.metrics is not None
        core.metrics.platform_error("telegram", "timeout")
        samples = await scrape(core)
        stats = RecordingTarget()
        await core.manager.handle(incoming("/stats", user="admin"), stats)

    counts = {
        dict(labels)["outcome"]: int(v)
        for (name, labels), v in samples.items()
        if name == "llm_chat_bot_messages_total"
    }
    assert counts == {"answered": 2, "refused_input": 1}
    assert "Messages since start: answered 2, refused_input 1" in stats.text
    assert "Platform errors since start: 1" in stats.text
    assert value(samples, "llm_chat_bot_platform_errors_total", platform="telegram", kind="timeout") == 1


async def test_a_stream_closed_early_closes_the_backends_and_is_no_finished_request(harness: Harness) -> None:
    harness.engine.step_delay = 0.02
    async with harness.core() as core:
        metrics = Metrics()
        metered = MeteredBackend(core.model, metrics)
        prompt = await metered.render(None, [ChatTurn("user", "tell me a long story")])
        stream = metered.generate(prompt, GenerationParams(max_new_tokens=50))
        first = await anext(stream)
        assert first.tokens >= 1
        await stream.aclose()  # a /reset or shutdown
        for _ in range(100):
            if core.model.stats().active == 0:
                break
            await asyncio.sleep(0.01)
        assert core.model.stats().active == 0  # the worker stopped generating it
    samples = {
        s.name: s.value for family in metrics.registry.collect() for s in family.samples if not s.labels.get("le")
    }
    assert samples["llm_chat_bot_time_to_first_token_seconds_count"] == 1
    assert samples.get("llm_chat_bot_e2e_request_latency_seconds_count", 0) == 0  # it did not finish
    assert samples["llm_chat_bot_generation_tokens_total"] == first.tokens


def test_metrics_are_off_by_default() -> None:
    assert Settings(_env_file=None).metrics_port is None  # type: ignore[call-arg]


@pytest.mark.parametrize("outcome", ["refused_busy", "refused_rate", "blocked", "failed", "undelivered"])
def test_every_outcome_is_its_own_series(outcome: str) -> None:
    metrics = Metrics()
    metrics.message("discord", outcome)  # type: ignore[arg-type]
    metrics.message("discord", outcome)  # type: ignore[arg-type]
    text = metrics.render().decode()
    assert f'llm_chat_bot_messages_total{{outcome="{outcome}",platform="discord"}} 2.0' in text


async def test_a_reply_the_platform_refuses_counts_as_a_platform_error(harness: Harness) -> None:
    async with metered_core(harness) as core:
        target = RecordingTarget()
        target.fail_sends = True  # the bot was blocked: a permanent DeliveryError, kind "forbidden"
        await core.manager.handle(incoming("hello"), target)
        samples = await scrape(core)
    assert value(samples, "llm_chat_bot_platform_errors_total", platform="telegram", kind="forbidden") == 1
    assert value(samples, "llm_chat_bot_messages_total", platform="telegram", outcome="failed") == 1
    assert value(samples, "llm_chat_bot_messages_total", platform="telegram", outcome="answered") == 0
