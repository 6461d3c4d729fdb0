"""The OpenAI-compatible backend's overhead over a bare client, in one run.

The fake SSE server (tests/fakes/openai_server.py) runs in its own process and streams
every reply at a fixed token rate. Two paths stream from it, one after the other, each
with 32 streams in flight: 32 users each send `REQUESTS` messages back to back, their
first ones spread evenly over one reply's duration, so that requests keep arriving while
32 streams run (a burst of 32 at the same instant would measure the burst instead):
- direct: a bare `AsyncOpenAI` client, streaming chat completions;
- bot: the manager + `OpenAIBackend` + a no-op reply target (SQLite in a temp dir): the
  user's message is stored, the prompt built, the reply streamed and stored.
TTFT is from the start of a request to its first text (the first content delta, or the
target's first `send`). Overhead is bot minus direct at the same percentile; tokens/s
is every stream's tokens over the whole run's wall time.

Then, unless --no-real, one line against the real `transformers serve` with the default
model (the user's model cache): TTFT and tokens/s for 1 and 4 users through the bot.

Prints human lines, then one JSON line last:
{"streams": 32, "direct_ttft_ms_p50": …, "bot_ttft_ms_p50": …, "overhead_ms_p50": …,
 "overhead_ms_p99": …, "agg_tok_s_direct": …, "agg_tok_s_bot": …}
Targets: overhead p50 ≤ 5 ms and p99 ≤ 20 ms; agg_tok_s_bot ≥ 0.95 × direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from common import ROOT, TimingTarget, event

from bot.config import Settings, default_cache_dir
from bot.core import Core, open_core
from tests.fakes.openai_server import FakeOpenAIServer

STREAMS = 32
TOKENS = 64
TOKENS_PER_S = 30.0  # per stream, as a busy GPU server gives each of 32 streams
REQUESTS = 8  # per user


def _serve_fake(conn: Connection) -> None:
    """The fake server's process: report the port, serve until told to stop."""

    async def run() -> None:
        server = FakeOpenAIServer(models=("bench-model",))
        server.tokens_per_s = TOKENS_PER_S
        server.reply = lambda _m: " ".join(f"w{i}" for i in range(TOKENS))
        await server.start()
        conn.send(server.port)
        await asyncio.to_thread(conn.recv)
        await server.close()

    asyncio.run(run())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class NoOpTarget(TimingTarget):
    """Delivers nothing, but throttles edits like a platform (Telegram's default 1 s):
    the manager's streaming does what it does in production."""

    edit_interval = 1.0


def _stagger(user: int, users: int) -> float:
    """When `user` sends its first message: spread over one reply's duration."""
    return user * (TOKENS / TOKENS_PER_S) / users


async def direct_run(base_url: str, requests: int = REQUESTS) -> tuple[list[float], int, float]:
    """32 users' streams through a bare client: TTFTs (s), tokens, wall time (s)."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0) as client:

        async def one(i: int) -> tuple[float, int]:
            started = time.perf_counter()
            first: float | None = None
            tokens = 0
            stream = await client.chat.completions.create(
                model="bench-model",
                messages=[{"role": "system", "content": "You are a bench."}, {"role": "user", "content": f"q{i}"}],
                stream=True,
                max_tokens=TOKENS,
                temperature=0.0,
                top_p=0.9,
            )
            async for chunk in stream:
                for choice in chunk.choices or ():
                    if choice.delta is not None and choice.delta.content:
                        tokens += 1
                        if first is None:
                            first = time.perf_counter() - started
            assert first is not None
            return first, tokens

        async def user(i: int) -> list[tuple[float, int]]:
            await asyncio.sleep(_stagger(i, STREAMS))
            return [await one(i) for _ in range(requests)]

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(user(i) for i in range(STREAMS))) for r in rs]
        wall = time.perf_counter() - started
    return [r[0] for r in results], sum(r[1] for r in results), wall


@asynccontextmanager
async def bot_core(base_url: str, **overrides: Any) -> AsyncIterator[Core]:
    with tempfile.TemporaryDirectory() as tmp:
        values: dict[str, Any] = {
            "database_url": f"sqlite+aiosqlite:///{tmp}/bench.db",
            "model_backend": "openai",
            "openai_base_url": base_url,
            "openai_max_concurrency": STREAMS,
            "openai_max_retries": 0,
            "system_prompt": "You are a bench.",
            "temperature": 0.0,
            "max_new_tokens": TOKENS,
            "history_turns": 0,
        }
        values.update(overrides)
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        async with open_core(settings, lambda: None) as core:  # type: ignore[arg-type,return-value]
            yield core


async def bot_run(
    core: Core, users: int = STREAMS, requests: int = REQUESTS, *, stagger: bool = True, question: str = "q"
) -> tuple[list[float], int, float]:
    """`users` users' turns through the manager: TTFTs (s), tokens, wall time (s)."""
    before = core.model.stats().tokens_generated
    message_ids = iter(range(10**9))

    async def user(i: int) -> list[float]:
        if stagger:
            await asyncio.sleep(_stagger(i, users))
        ttfts = []
        for _ in range(requests):
            target = NoOpTarget()
            await core.manager.handle(event(f"{question}{i}", f"user{i}", next(message_ids)), target)
            ttfts.append(target.ttft)
        return ttfts

    started = time.perf_counter()
    ttfts = [t for ts in await asyncio.gather(*(user(i) for i in range(users))) for t in ts]
    wall = time.perf_counter() - started
    return ttfts, core.model.stats().tokens_generated - before, wall


async def fake_server_figures() -> dict[str, Any]:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_serve_fake, args=(child,), daemon=True)
    proc.start()
    try:
        port = await asyncio.to_thread(parent.recv)
        base_url = f"http://127.0.0.1:{port}/v1"
        async with bot_core(base_url) as core:
            await direct_run(base_url, requests=1)  # warm-up: connections, imports, sessions
            await bot_run(core, requests=1)
            direct_ttft, direct_tok, direct_wall = await direct_run(base_url)
            bot_ttft, bot_tok, bot_wall = await bot_run(core)
        for name, ttfts in (("direct", direct_ttft), ("bot", bot_ttft)):
            print(
                f"{name}: TTFT p50 {1000 * percentile(ttfts, 0.5):.1f} ms, "
                f"p99 {1000 * percentile(ttfts, 0.99):.1f} ms over {len(ttfts)} streams"
            )
    finally:
        parent.send("stop")
        proc.join(timeout=10)
    assert direct_tok == bot_tok == REQUESTS * STREAMS * TOKENS, (direct_tok, bot_tok)
    return {
        "streams": STREAMS,
        "direct_ttft_ms_p50": round(1000 * percentile(direct_ttft, 0.5), 2),
        "bot_ttft_ms_p50": round(1000 * percentile(bot_ttft, 0.5), 2),
        "overhead_ms_p50": round(1000 * (percentile(bot_ttft, 0.5) - percentile(direct_ttft, 0.5)), 2),
        "overhead_ms_p99": round(1000 * (percentile(bot_ttft, 0.99) - percentile(direct_ttft, 0.99)), 2),
        "agg_tok_s_direct": round(direct_tok / direct_wall, 1),
        "agg_tok_s_bot": round(bot_tok / bot_wall, 1),
    }


def _model_dir() -> Path:
    """The default model's de-quantized cache directory (built on first use)."""
    cache = default_cache_dir()
    found = [p for p in cache.glob("SmolLM2-135M-Instruct*") if (p / "config.json").is_file()]
    if not found:
        from bot.model.hf import load_engine

        load_engine(None, cache_dir=cache, context_tokens=2048, progress=print)
        found = [p for p in cache.glob("SmolLM2-135M-Instruct*") if (p / "config.json").is_file()]
    return found[0]


def _start_transformers_serve() -> tuple[subprocess.Popen[bytes], str]:
    """`transformers serve` on the default model's cache directory, offline, ready."""
    model_dir = _model_dir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cli = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, f"http://127.0.0.1:{port}/v1"
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("transformers serve did not start") from None
            time.sleep(0.25)


async def real_server_figures() -> dict[str, Any]:
    proc, base_url = await asyncio.to_thread(_start_transformers_serve)
    figures: dict[str, Any] = {}
    try:
        async with bot_core(base_url, max_new_tokens=32, openai_timeout=120.0, system_prompt="You are a poet.") as core:
            await bot_run(core, users=1, requests=1)  # warm-up
            for users in (1, 4):
                ttfts, tokens, wall = await bot_run(
                    core, users=users, requests=2, stagger=False, question="Write a short poem about the sea, number "
                )
                figures[f"users_{users}_ttft_ms_p50"] = round(1000 * percentile(ttfts, 0.5), 1)
                figures[f"users_{users}_tok_s"] = round(tokens / wall, 1)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 20)
    return figures


async def main(real: bool) -> None:
    logging.basicConfig(level=logging.WARNING)
    figures = await fake_server_figures()
    print(
        f"fake server, {STREAMS} streams in flight, {TOKENS} tokens each at {TOKENS_PER_S:.0f} tokens/s: "
        f"overhead p50 {figures['overhead_ms_p50']} ms (target <= 5), p99 {figures['overhead_ms_p99']} ms "
        f"(target <= 20); tokens/s bot/direct {figures['agg_tok_s_bot'] / figures['agg_tok_s_direct']:.3f} "
        "(target >= 0.95)"
    )
    if real:
        print("transformers serve (default model, through the bot):", json.dumps(await real_server_figures()))
    print(json.dumps(figures))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-real", action="store_true", help="skip the line against transformers serve")
    args = parser.parse_args()
    assert ROOT.is_dir()
    asyncio.run(main(real=not args.no_real))
