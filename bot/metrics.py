"""Prometheus metrics (`prometheus_client`), named after vLLM's with an `llm_chat_bot_`
prefix so that dashboards made for vLLM or TGI read them with the prefix swapped.

`Metrics` owns one `CollectorRegistry` (one per core: tests and benchmarks open several
cores in one process, and the library's global registry would mix them). It is the
manager's `Observer` (messages by outcome, platform errors); `MeteredBackend` wraps any
`ModelBackend` and times its streams; the model's gauges are read from
`ModelBackend.stats()` when `/metrics` is scraped (a custom collector), so the hot path
pays nothing for them.

| metric | type | labels |
|---|---|---|
| `llm_chat_bot_messages_total` | counter | platform, outcome (`bot.ports.MessageOutcome`) |
| `llm_chat_bot_platform_errors_total` | counter | platform, kind |
| `llm_chat_bot_prompt_tokens_total`, `llm_chat_bot_generation_tokens_total` | counter | model_name |
| `llm_chat_bot_time_to_first_token_seconds` | histogram | model_name |
| `llm_chat_bot_inter_token_latency_seconds` | histogram | model_name |
| `llm_chat_bot_e2e_request_latency_seconds` | histogram | model_name |
| `llm_chat_bot_request_queue_time_seconds` | histogram | model_name |
| `llm_chat_bot_num_requests_running`, `_waiting`, `llm_chat_bot_batch_size` | gauge | model_name |

Queue time: the `ModelBackend` port does not say when a request leaves the queue, so it
is estimated as time to first token minus the prefill's share, the prefill being timed
(per prompt token, a moving average) on requests that found the backend idle; until such
a request was seen it equals the time to first token (an upper bound).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.events import ChatTurn, Platform
from bot.ports import (
    GenerationParams,
    MessageOutcome,
    ModelBackend,
    RenderedPrompt,
    ReplyChunk,
    WorkerStats,
)

PREFIX = "llm_chat_bot_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets: from milliseconds (a cached prompt, a fast GPU) to minutes (a CPU under load).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
_PREFILL_SMOOTHING = 0.2  # weight of the newest idle request in the prefill estimate


class Metrics:
    """The process's metrics in their own registry; an `Observer` for the manager."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = Counter(
            f"{PREFIX}messages", "Incoming messages by how they ended.", ["platform", "outcome"], registry=r
        )
        self.platform_errors = Counter(
            f"{PREFIX}platform_errors", "Failed platform calls, after retries.", ["platform", "kind"], registry=r
        )
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens prefilled.", ["model_name"], registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated.", ["model_name"], registry=r)
        self.time_to_first_token = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "Seconds from a request to its first generated token.",
            ["model_name"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            f"{PREFIX}inter_token_latency_seconds",
            "Seconds between two generated tokens of a reply.",
            ["model_name"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            f"{PREFIX}e2e_request_latency_seconds",
            "Seconds from a request to its last token, for replies that ended by themselves.",
            ["model_name"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.request_queue_time = Histogram(
            f"{PREFIX}request_queue_time_seconds",
            "Seconds a request waited before its prefill (estimated: time to first token minus prefill).",
            ["model_name"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )

    # Observer ---------------------------------------------------------------------------

    def message(self, platform: Platform, outcome: MessageOutcome) -> None:
        self.messages.labels(platform, outcome).inc()

    def platform_error(self, platform: Platform, kind: str) -> None:
        self.platform_errors.labels(platform, kind).inc()

    # Reading ----------------------------------------------------------------------------

    def watch(self, model: ModelBackend) -> None:
        """Report `model.stats()` as gauges, read at each scrape."""
        self.registry.register(_BackendGauges(model))

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def message_counts(self) -> dict[str, int]:
        """Messages by outcome, over every platform (what `/stats` shows)."""
        counts: dict[str, int] = {}
        for metric in self.messages.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    outcome = sample.labels["outcome"]
                    counts[outcome] = counts.get(outcome, 0) + int(sample.value)
        return counts

    def stats_lines(self) -> list[str]:
        """`/stats` lines for the counters (the same numbers `/metrics` serves)."""
        counts = self.message_counts()
        shown = ", ".join(f"{outcome} {n}" for outcome, n in sorted(counts.items())) or "none yet"
        errors = sum(
            int(s.value) for m in self.platform_errors.collect() for s in m.samples if s.name.endswith("_total")
        )
        return [f"Messages since start: {shown}", f"Platform errors since start: {errors}"]


class _BackendGauges(Collector):
    """The model's queue, read from `stats()` at scrape time."""

    def __init__(self, model: ModelBackend) -> None:
        self._model = model

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._model.stats())

    def _families(self, stats: WorkerStats | None) -> Iterator[Metric]:
        running = waiting = 0
        if stats is not None:
            running, waiting = stats.active, stats.queue_depth
        for name, doc, value in (
            ("num_requests_running", "Requests generating right now.", running),
            ("num_requests_waiting", "Requests waiting for a place in the batch.", waiting),
            # The scheduler batches every running request (remote: those in flight).
            ("batch_size", "Sequences in the running batch.", running),
        ):
            family = GaugeMetricFamily(f"{PREFIX}{name}", doc, labels=["model_name"])
            if stats is not None:
                family.add_metric([self._model.model_name], float(value))
            yield family


class MeteredBackend:
    """A `ModelBackend` that times every stream of the one it wraps into `metrics`."""

    def __init__(self, model: ModelBackend, metrics: Metrics) -> None:
        self._model = model
        self.metrics = metrics
        self._prefill_s_per_token: float | None = None

    @property
    def wrapped(self) -> ModelBackend:
        return self._model

    @property
    def context_length(self) -> int:
        return self._model.context_length

    @property
    def model_name(self) -> str:
        return self._model.model_name

    async def count_tokens(self, text: str) -> int:
        return await self._model.count_tokens(text)

    async def render(self, system: str | None, turns: Sequence[ChatTurn]) -> RenderedPrompt:
        return await self._model.render(system, turns)

    async def models(self) -> tuple[str, ...] | None:
        return await self._model.models()

    def stats(self) -> WorkerStats:
        return self._model.stats()

    def stats_lines(self) -> list[str]:
        """`/stats` lines from the metrics (see `Metrics.stats_lines`)."""
        return self.metrics.stats_lines()

    async def generate(self, prompt: RenderedPrompt, params: GenerationParams) -> AsyncGenerator[ReplyChunk, None]:
        m = self.metrics
        name = params.model or self._model.model_name
        before = self._model.stats()
        idle = before.active == 0 and before.queue_depth == 0
        start = time.perf_counter()
        first: float | None = None
        last = start
        tokens = 0
        itl = m.inter_token_latency.labels(name)
        # aclosing: closing this stream (a /reset, shutdown) closes the backend's too.
        async with contextlib.aclosing(self._model.generate(prompt, params)) as stream:
            try:
                async for chunk in stream:
                    if chunk.tokens:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            self._first_token(name, now - start, prompt.length, idle)
                        else:  # a piece of several tokens: each waited its share of the gap
                            gap = (now - last) / chunk.tokens
                            for _ in range(chunk.tokens):
                                itl.observe(gap)
                        last = now
                        tokens += chunk.tokens
                    if chunk.finish_reason is not None:
                        m.e2e_request_latency.labels(name).observe(time.perf_counter() - start)
                    yield chunk
            finally:
                if first is not None or tokens:
                    m.prompt_tokens.labels(name).inc(prompt.length)
                if tokens:
                    m.generation_tokens.labels(name).inc(tokens)

    def _first_token(self, name: str, ttft: float, prompt_tokens: int, idle: bool) -> None:
        m = self.metrics
        m.time_to_first_token.labels(name).observe(ttft)
        per_token = ttft / max(prompt_tokens, 1)
        if idle:  # nothing ahead of it: the whole wait was the prefill
            old = self._prefill_s_per_token
            self._prefill_s_per_token = per_token if old is None else old + _PREFILL_SMOOTHING * (per_token - old)
        prefill = (self._prefill_s_per_token or 0.0) * prompt_tokens
        m.request_queue_time.labels(name).observe(0.0 if idle else max(0.0, ttft - prefill))
