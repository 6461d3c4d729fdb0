"""Benchmark: the Discord adapter under load, end to end except the model.

The bot process runs the real `DiscordAdapter` on the real discord.py client, the
real `ConversationManager`, `Worker(FakeEngine)` and SQLite in a temporary
directory. A second process plays Discord: the fake server
(`tests/fakes/discord/`) on 127.0.0.1 and the users, so that, as in
production, Discord's own work does not share the bot's interpreter.

By default it runs twice: capacity, with each of N channels keeping one question in
flight (a user @mentions the bot, waits for the whole answer, asks again), which gives
msgs_per_s; then latency under a steady 200 questions/s spread over the channels, which
gives p50/p99 (with every channel always waiting, latency would only be N / throughput).
`--rate R` runs the steady phase alone at R. Latency runs from the fake dispatching
MESSAGE_CREATE to the first create/edit request carrying the complete reply
(both times taken in the fake's process).

The fake sends no rate-limit headers, so discord.py's per-route limiter never
waits, and the edit interval is 50 ms. Run from the repository root:

    python bench/discord_adapter.py [--channels 50] [--seconds 10] [--rate R] [--profile]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import logging
import multiprocessing
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.discord.rest import RestCall  # noqa: E402
from tests.fakes.discord.server import FakeDiscordServer  # noqa: E402
from tests.fakes.discord.world import FakeChannel, FakeUser  # noqa: E402


@dataclass(frozen=True)
class Plan:
    channels: int
    seconds: float
    rate: float | None  # total questions per second; None = one in flight per channel
    core: bool  # False: a direct streaming echo instead of manager + worker + SQLite


class StreamingEcho:
    """`--no-core`: answers "Echo: <text>" through the core's `ReplyStreamer` (typing,
    send, edits) without storage or model, to measure the Discord layer alone."""

    async def handle(self, event: Any, target: Any) -> None:
        from bot.chat.streaming import ReplyStreamer

        await target.typing()
        streamer = ReplyStreamer(target)
        for piece in ("Echo:", " ", event.text):
            await streamer.push(piece)
        await streamer.finish()

    async def submit(self, event: Any, target: Any) -> Awaitable[None]:
        return asyncio.ensure_future(self.handle(event, target))

    async def recover(self, platform: Any, make_target: Any) -> None:
        return None  # nothing is stored, so nothing is left over from a restart

    async def move_chat(self, platform: Any, old_chat_id: str, new_chat_id: str) -> None:
        return None  # Discord never gives a channel a new id


# --------------------------------------------------------------------------- Discord's side


class Load:
    """The users: ask questions and time the answers (in the fake's process)."""

    def __init__(self, server: FakeDiscordServer, channels: list[FakeChannel], users: list[FakeUser]) -> None:
        self.server = server
        self.channels = channels
        self.users = users
        self.expected: dict[str, tuple[str, float, asyncio.Future[None]]] = {}
        self.latencies: list[float] = []
        self.recording = False
        server.add_listener(self._on_call)

    def _on_call(self, call: RestCall) -> None:
        if call.method not in ("POST", "PATCH") or not call.path.startswith("/channels/"):
            return
        channel_id = call.path.split("/")[2]
        pending = self.expected.get(channel_id)
        if pending is None or not isinstance(call.json, dict) or call.json.get("content") != pending[0]:
            return
        del self.expected[channel_id]
        if self.recording:
            self.latencies.append(call.at - pending[1])
        if not pending[2].done():
            pending[2].set_result(None)

    async def ask(self, index: int, question: str) -> None:
        channel, user = self.channels[index], self.users[index]
        done = asyncio.get_running_loop().create_future()
        # FakeEngine's reply is "Echo: " + the text the core received (mention stripped).
        self.expected[str(channel.id)] = (f"Echo: {question}", time.monotonic(), done)
        await self.server.user_sends(channel, user, f"{self.server.bot.mention} {question}")
        await asyncio.wait_for(done, 60)

    async def closed_loop(self, index: int, until: float) -> int:
        count = 0
        while time.monotonic() < until:
            await self.ask(index, f"question {count} in room {index}")
            count += 1
        return count

    async def open_loop(self, rate: float, until: float) -> int:
        """Questions at `rate` per second in total, round-robin over the channels. A
        channel still busy with its previous question skips its turn (counted)."""
        tasks: dict[int, asyncio.Task[None]] = {}
        count, skipped, tick = 0, 0, time.monotonic()
        while tick < until:
            index = count % len(self.channels)
            busy = tasks.get(index)
            if busy is not None and not busy.done():
                skipped += 1
            else:
                tasks[index] = asyncio.create_task(self.ask(index, f"question {count} in room {index}"))
            count += 1
            tick += 1 / rate
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
        await asyncio.gather(*tasks.values())
        return count - skipped


async def discord_side(plan: Plan, pipe: Connection) -> dict[str, Any]:
    async with FakeDiscordServer() as server:
        guild = server.add_guild("Bench")
        rooms = [server.add_text_channel(guild, f"room-{i}") for i in range(plan.channels)]
        users = [server.add_user(f"user{i}") for i in range(plan.channels)]
        for user in users:
            server.add_member(guild, user)
        pipe.send({"token": server.token, "api": server.base_url, "gateway": server.gateway_url})
        await server.wait_identified(timeout=60)
        load = Load(server, rooms, users)
        # Warm-up: every conversation exists, connections and caches are hot.
        await asyncio.gather(*(load.ask(i, f"warm-up {i}") for i in range(plan.channels)))
        pipe.send("measuring")
        load.recording = True
        calls_before = len(server.calls)
        started = time.monotonic()
        until = started + plan.seconds
        if plan.rate is None:
            total = sum(await asyncio.gather(*(load.closed_loop(i, until) for i in range(plan.channels))))
        else:
            total = await load.open_loop(plan.rate, until)
        elapsed = time.monotonic() - started
        lat = sorted(load.latencies)
        result = {
            "channels": plan.channels,
            "messages": total,
            "seconds": round(elapsed, 2),
            "msgs_per_s": round(total / elapsed, 1),
            "p50_ms": round(statistics.median(lat) * 1000, 1),
            "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 1),
            "requests_per_message": round((len(server.calls) - calls_before) / max(1, total), 2),
            "unknown_routes": len(server.unknown_routes),
        }
        pipe.send(result)
        # Stay up until the bot has disconnected, or it would try to reconnect.
        await asyncio.to_thread(pipe.recv)
        return result


def discord_process(plan: Plan, pipe: Connection) -> None:
    try:
        asyncio.run(discord_side(plan, pipe))
    except BaseException as exc:  # report, then let the parent fail loudly
        pipe.send({"error": repr(exc)})
        raise


# --------------------------------------------------------------------------- the bot's side


async def bot_side(plan: Plan, pipe: Connection, profile: cProfile.Profile | None) -> dict[str, Any]:
    from adapters.discord.adapter import DiscordAdapter
    from bot.chat.commands import COMMANDS
    from bot.config import Settings
    from bot.core import open_core
    from bot.ports import IncomingHandler
    from tests.fakes.fake_engine import FakeEngine

    endpoints = await asyncio.to_thread(pipe.recv)
    with tempfile.TemporaryDirectory() as tmp:
        db_url = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            discord_token=endpoints["token"],
            discord_api_base=endpoints["api"],
            discord_gateway_url=endpoints["gateway"],
            discord_edit_interval=0.05,
            database_url=db_url,
            temperature=0.0,
            max_batch_size=max(8, plan.channels),
            queue_size=max(64, 4 * plan.channels),
        )
        adapter = DiscordAdapter(settings, COMMANDS)
        async with open_core(settings, FakeEngine) as core:
            handler: IncomingHandler = core.manager if plan.core else StreamingEcho()
            gc.collect()  # as bot/app.py does before serving
            gc.freeze()
            task = asyncio.create_task(adapter.run(handler), name="bench:discord-adapter")
            try:
                message = await asyncio.to_thread(pipe.recv)
                assert message == "measuring", message
                cpu = time.process_time()
                if profile is not None:
                    profile.enable()
                result: dict[str, Any] = await asyncio.to_thread(pipe.recv)
                if profile is not None:
                    profile.disable()
                cpu = time.process_time() - cpu
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                pipe.send("stop")
    if "error" in result:
        raise RuntimeError(f"the fake Discord failed: {result['error']}")
    result["bot_cpu_ms_per_message"] = round(cpu * 1000 / max(1, result["messages"]), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=None, help="open loop: questions per second in total")
    parser.add_argument("--profile", action="store_true", help="profile the bot's event loop thread")
    parser.add_argument(
        "--no-core", action="store_true", help="answer with a streaming echo: the Discord layer alone, no storage/model"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("discord").setLevel(logging.ERROR)  # no "PyNaCl is not installed"

    if args.rate is not None:
        result = run_once(Plan(args.channels, args.seconds, args.rate, core=not args.no_core), args.profile)
        print(json.dumps({k: result[k] for k in ("channels", "msgs_per_s", "p50_ms", "p99_ms")}))
        return
    # Default: capacity (every channel asks again as soon as its answer is complete),
    # then latency under a steady 200 msgs/s offered over the same channels.
    capacity = run_once(Plan(args.channels, args.seconds, None, core=not args.no_core), args.profile)
    steady = run_once(Plan(args.channels, args.seconds, 200.0, core=not args.no_core), False)
    print(
        json.dumps(
            {
                "channels": capacity["channels"],
                "msgs_per_s": capacity["msgs_per_s"],
                "p50_ms": steady["p50_ms"],
                "p99_ms": steady["p99_ms"],
            }
        )
    )


def run_once(plan: Plan, profiled: bool) -> dict[str, Any]:
    """One run: the fake Discord in a second process, the bot here. Prints a summary."""
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    fake = multiprocessing.get_context("spawn").Process(
        target=discord_process, args=(plan, theirs), name="fake-discord"
    )
    fake.start()
    profile = cProfile.Profile() if profiled else None
    try:
        result = asyncio.run(bot_side(plan, ours, profile))
    finally:
        fake.join(timeout=10)
        if fake.is_alive():
            fake.terminate()
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue())
    load = f"{plan.rate:g} questions/s offered" if plan.rate else "one question in flight per channel"
    core = "manager + Worker(FakeEngine) + SQLite" if plan.core else "streaming echo, no core"
    print(f"channels: {result['channels']} ({load}; {core}); answered {result['messages']} in {result['seconds']} s")
    print(f"  throughput: {result['msgs_per_s']} messages/s, {result['requests_per_message']} REST requests each")
    print(f"  latency to the complete reply: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
    print(f"  bot process CPU: {result['bot_cpu_ms_per_message']} ms per message")
    return result


if __name__ == "__main__":
    main()
