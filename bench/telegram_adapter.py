"""Telegram adapter throughput and latency: many chats at once through the whole bot.

The bot process runs the real adapter (python-telegram-bot, long polling), the real
ConversationManager, Worker(FakeEngine) and SQLite in a temp dir. The fake Bot API
server and the simulated users run in a second process, as Telegram would be
another machine. The adapter's rate limiter only retries (the fake never answers 429);
the default edit interval (1 s), so a reply is one sendMessage then one final
editMessageText.

Two phases, after a warm-up:
1. capacity: every chat sends its next message as soon as the previous reply is
   complete (closed loop); messages/s is completed replies over elapsed time.
2. latency: the chats together send `--rate` messages/s at a steady pace (open loop);
   latency runs from the update being available on the server to the
   sendMessage/editMessageText that makes the chat show the full reply.

Run from the repository root: ``python bench/telegram_adapter.py``. Prints human
lines, then as the last line one JSON:
{"chats": 50, "msgs_per_s": …, "p50_ms": …, "p99_ms": …}
(msgs_per_s from phase 1, the percentiles from phase 2).

``--controls``: the capacity phase with the public-bot controls off, then all on —
`RATE_LIMIT` and `CHAT_RATE_LIMIT` (set high enough never to refuse, so that each
message still pays for its checks), `DAILY_TOKEN_QUOTA` (likewise) and the metrics
(`METRICS_PORT`: the HTTP server, the observer and the timed model stream) — alternating
`--rounds` times in one run (after a warm-up run that is not counted; off-on, then
on-off, ... so that drift hits both alike), each on a fresh database and core. The last line is
{"msgs_per_s_off": …, "msgs_per_s_on": …, "ratio": …} (means over the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import multiprocessing as mp
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fakes.telegram import Chat, FakeTelegramServer, StoredMessage, User  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass(frozen=True, slots=True)
class Plan:
    chats: int
    warmup: int  # messages per chat, closed loop, not measured
    per_chat: int  # messages per chat in the capacity phase
    rate: float  # messages/s offered in the latency phase
    seconds: float  # length of the latency phase


# --------------------------------------------------------------------------- users + server


class Users:
    """The simulated users, one per group chat: send messages mentioning the bot, and
    notice when the reply quoting each one shows the full answer (or another answer,
    such as "You're writing faster than I can answer", which counts as rejected)."""

    def __init__(self, server: FakeTelegramServer, chats: int) -> None:
        self.server = server
        self.users = [User(10_000 + i, f"User{i}") for i in range(chats)]
        self.chats = {u.id: Chat.group(-u.id, f"Chat of {u.first_name}") for u in self.users}
        self.pending: dict[tuple[int, int], tuple[str, int, asyncio.Future[bool]]] = {}
        self.latencies: list[float] = []
        self.rejected = 0
        server.on_bot_text = self._on_bot_text

    def _on_bot_text(self, message: StoredMessage) -> None:
        if message.reply_to is None:
            return
        key = (message.chat_id, message.reply_to)
        entry = self.pending.get(key)
        if entry is None:
            return
        expected, update_id, future = entry
        text = message.text or ""
        if text == expected:
            self.latencies.append(time.perf_counter() - self.server.update_available_at[update_id])
        elif expected.startswith(text):
            return  # still streaming
        else:
            self.rejected += 1
        del self.pending[key]
        future.set_result(text == expected)

    def send(self, user: User, text: str) -> asyncio.Future[bool]:
        """The user sends `text`; the future says whether the full reply came."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        chat = self.chats[user.id]
        sent = self.server.user_sends(chat, user, f"@{self.server.bot.username} {text}")
        assert sent.update_id is not None
        self.pending[(chat.id, sent.message_id)] = (f"Echo: {text}", sent.update_id, future)
        return future

    async def closed_loop(self, per_chat: int, tag: str) -> float:
        async def chat(user: User) -> None:
            for i in range(per_chat):
                await asyncio.wait_for(self.send(user, f"{tag} {i} from {user.id}"), timeout=120)

        started = time.perf_counter()
        await asyncio.gather(*(chat(u) for u in self.users))
        return time.perf_counter() - started

    async def open_loop(self, rate: float, seconds: float) -> float:
        period = len(self.users) / rate  # each chat's gap between messages
        count = max(1, round(seconds / period))
        start = time.perf_counter() + 0.05

        async def chat(index: int, user: User) -> None:
            replies = []
            for i in range(count):
                due = start + (index / len(self.users) + i) * period
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                replies.append(self.send(user, f"steady {i} from {user.id}"))
            await asyncio.wait_for(asyncio.gather(*replies), timeout=120)

        await asyncio.gather(*(chat(i, u) for i, u in enumerate(self.users)))
        return time.perf_counter() - start


async def serve_users(conn: Connection, plan: Plan) -> None:
    loop = asyncio.get_running_loop()
    async with FakeTelegramServer() as server:
        users = Users(server, plan.chats)
        conn.send((server.api_base, server.token))
        await loop.run_in_executor(None, conn.recv)  # the bot is up
        await users.closed_loop(plan.warmup, "warm-up")
        calls_before = len(server.calls)
        users.latencies.clear()
        elapsed = await users.closed_loop(plan.per_chat, "message")
        capacity = {
            "messages": plan.chats * plan.per_chat,
            "elapsed": elapsed,
            "latencies": list(users.latencies),
            "calls": [c.method for c in server.calls[calls_before:]],
        }
        users.latencies.clear()
        elapsed = await users.open_loop(plan.rate, plan.seconds)
        steady = {
            "messages": len(users.latencies),
            "elapsed": elapsed,
            "latencies": list(users.latencies),
            "rejected": users.rejected,
        }
        conn.send({"capacity": capacity, "steady": steady})
        await loop.run_in_executor(None, conn.recv)  # the bot has stopped


async def serve_users_controls(conn: Connection, plan: Plan, runs: int) -> None:
    """`--controls`: per run, once the bot is up, a warm-up then the capacity phase."""
    loop = asyncio.get_running_loop()
    async with FakeTelegramServer() as server:
        users = Users(server, plan.chats)
        conn.send((server.api_base, server.token))
        for run in range(runs):
            await loop.run_in_executor(None, conn.recv)  # this run's bot is up
            users.rejected = 0
            await users.closed_loop(plan.warmup, f"warm-up {run}")
            elapsed = await users.closed_loop(plan.per_chat, f"run {run}")
            conn.send({"messages": plan.chats * plan.per_chat, "elapsed": elapsed, "rejected": users.rejected})
        await loop.run_in_executor(None, conn.recv)  # the bot has stopped


def users_process(conn: Connection, plan: Plan, runs: int = 0) -> None:
    logging.basicConfig(level=logging.WARNING, format="users %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_users_controls(conn, plan, runs) if runs else serve_users(conn, plan))


# --------------------------------------------------------------------------- the bot


class DirectEcho:
    """For ``--adapter-only``: answers without the core (no storage, no model)."""

    async def handle(self, event: Any, target: Any) -> None:
        await target.send(f"Echo: {event.text}")

    async def submit(self, event: Any, target: Any) -> Awaitable[None]:
        # Nothing to store: "accepted" at once; the adapter awaits the reply's task.
        return asyncio.create_task(self.handle(event, target), name="bench:direct-echo")

    async def recover(self, platform: Any, make_target: Any) -> None:
        return None  # nothing was ever stored

    async def move_chat(self, platform: Any, old_chat_id: str, new_chat_id: str) -> None:
        return None  # the benchmark's chats never migrate


async def run_bot(conn: Connection, api_base: str, token: str, chats: int, adapter_only: bool) -> dict[str, Any]:
    from pydantic import SecretStr

    from adapters.telegram.adapter import TelegramAdapter
    from bot.chat.commands import COMMANDS
    from bot.config import Settings
    from bot.core import open_core
    from bot.ports import IncomingHandler
    from tests.fakes.fake_engine import FakeEngine

    loop = asyncio.get_running_loop()

    async def serve(handler: IncomingHandler) -> dict[str, Any]:
        adapter = TelegramAdapter(settings, COMMANDS)
        gc.collect()  # as bot/app.py does before serving
        gc.freeze()
        task = asyncio.create_task(adapter.run(handler), name="bench:telegram")
        await asyncio.wait_for(adapter.started.wait(), timeout=30)
        conn.send("go")
        results: dict[str, Any] = await loop.run_in_executor(None, conn.recv)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        results["settings"] = settings
        return results

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            telegram_token=SecretStr(token),
            telegram_api_base=api_base,
            database_url=url,
            temperature=0.0,
            queue_size=max(64, chats * 4),
        )
        if adapter_only:
            return await serve(DirectEcho())
        async with open_core(settings, FakeEngine) as core:
            return await serve(core.manager)


# Every control on, with limits no bench user reaches: the checks run, nothing is refused.
CONTROLS_ON: dict[str, Any] = {
    "rate_limit": "1000/second",
    "chat_rate_limit": "1000/second",
    "daily_token_quota": 1_000_000_000,
    "metrics_port": 0,  # any free port: the server runs, nobody scrapes it during the run
}


async def run_bot_controls(
    conn: Connection, api_base: str, token: str, chats: int, schedule: list[bool]
) -> list[dict[str, Any]]:
    """`--controls`: one bot after another, each with the controls on or off as `schedule` says."""
    from pydantic import SecretStr

    from adapters.telegram.adapter import TelegramAdapter
    from bot.chat.commands import COMMANDS
    from bot.config import Settings
    from bot.core import open_core
    from tests.fakes.fake_engine import FakeEngine

    loop = asyncio.get_running_loop()
    results = []
    for run, on in enumerate(schedule):
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(
                _env_file=None,  # type: ignore[call-arg]
                telegram_token=SecretStr(token),
                telegram_api_base=api_base,
                database_url=f"sqlite+aiosqlite:///{tmp}/bench.db",
                temperature=0.0,
                queue_size=max(64, chats * 4),
                **(CONTROLS_ON if on else {}),
            )
            async with open_core(settings, FakeEngine) as core:
                adapter = TelegramAdapter(settings, COMMANDS)
                gc.collect()
                gc.freeze()
                task = asyncio.create_task(adapter.run(core.manager), name=f"bench:telegram:{run}")
                await asyncio.wait_for(adapter.started.wait(), timeout=30)
                conn.send("go")
                result: dict[str, Any] = await loop.run_in_executor(None, conn.recv)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                if core.metrics is not None:  # the metrics did count every answer
                    result["metrics_answered"] = core.metrics.message_counts().get("answered", 0)
            result["on"] = on
            results.append(result)
    return results


def controls_main(plan: Plan, rounds: int) -> None:
    # A first run to warm up (not counted), then off-on, on-off, ... so drift hits both alike.
    schedule = [False] + [on for r in range(rounds) for on in ((False, True) if r % 2 == 0 else (True, False))]
    ours, theirs = mp.get_context("spawn").Pipe()
    users = mp.get_context("spawn").Process(
        target=users_process, args=(theirs, plan, len(schedule)), name="telegram-users"
    )
    users.start()
    try:
        api_base, token = ours.recv()
        results = asyncio.run(run_bot_controls(ours, api_base, token, plan.chats, schedule))
        ours.send("stop")
    finally:
        users.join(timeout=30)
        if users.is_alive():
            users.terminate()
    rates: dict[bool, list[float]] = {False: [], True: []}
    print(
        f"capacity, {plan.chats} chats x {plan.per_chat} messages (closed loop), controls off and on in turn; "
        f"on = {', '.join(f'{k.upper()}={v}' for k, v in CONTROLS_ON.items())}"
    )
    for i, result in enumerate(results):
        rate = result["messages"] / result["elapsed"]
        if i > 0:
            rates[result["on"]].append(rate)
        label = "warm-up (not counted)" if i == 0 else f"controls {'on ' if result['on'] else 'off'}"
        counted = f", metrics counted {result['metrics_answered']} answered" if "metrics_answered" in result else ""
        print(
            f"  {label}: {result['messages']} in {result['elapsed']:.2f} s "
            f"= {rate:.1f} msgs/s, {result['rejected']} refused{counted}"
        )
    off, on = statistics.fmean(rates[False]), statistics.fmean(rates[True])
    print(json.dumps({"msgs_per_s_off": round(off, 1), "msgs_per_s_on": round(on, 1), "ratio": round(on / off, 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--messages", type=int, default=60, help="messages per chat in the capacity phase")
    parser.add_argument("--warmup", type=int, default=2, help="messages per chat before measuring")
    parser.add_argument("--rate", type=float, default=200.0, help="messages/s offered in the latency phase")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the latency phase")
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="answer without the core (no storage, no model): the adapter's own ceiling",
    )
    parser.add_argument(
        "--controls",
        action="store_true",
        help="capacity with rate limits, quotas and metrics off vs on, in one run (see the module docstring)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="with --controls: off/on pairs to average")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="bot %(levelname)s %(name)s: %(message)s")
    plan = Plan(args.chats, args.warmup, args.messages, args.rate, args.seconds)
    if args.controls:
        controls_main(plan, args.rounds)
        return

    ours, theirs = mp.get_context("spawn").Pipe()
    users = mp.get_context("spawn").Process(target=users_process, args=(theirs, plan), name="telegram-users")
    users.start()
    try:
        api_base, token = ours.recv()
        results = asyncio.run(run_bot(ours, api_base, token, plan.chats, args.adapter_only))
        ours.send("stop")
    finally:
        users.join(timeout=30)
        if users.is_alive():
            users.terminate()

    settings = results["settings"]
    capacity, steady = results["capacity"], results["steady"]
    methods: dict[str, int] = {}
    for method in capacity["calls"]:
        methods[method] = methods.get(method, 0) + 1
    msgs_per_s = capacity["messages"] / capacity["elapsed"]
    core = (
        "adapter only, no core"
        if args.adapter_only
        else (f"adapter + manager + Worker(FakeEngine, max batch {settings.max_batch_size}) + SQLite")
    )
    print(
        f"bot: {core}; edit interval {settings.telegram_edit_interval} s; "
        f"fake Bot API server and users in a separate process"
    )
    print(
        f"capacity: {plan.chats} chats x {plan.per_chat} messages, each sent when the previous reply was "
        f"complete: {capacity['messages']} in {capacity['elapsed']:.2f} s = {msgs_per_s:.1f} msgs/s"
    )
    cap_ms = [x * 1000 for x in capacity["latencies"]]
    print(
        f"  latency at saturation ms: p50 {percentile(cap_ms, 0.5):.1f}, p99 {percentile(cap_ms, 0.99):.1f} "
        f"(about chats / throughput)"
    )
    print(f"  Bot API calls: {', '.join(f'{m} {n}' for m, n in sorted(methods.items()))}")
    ms = [x * 1000 for x in steady["latencies"]]
    print(
        f"steady load: {plan.rate:g} msgs/s offered over {plan.chats} chats for {plan.seconds:g} s: "
        f"{steady['messages']} replies in {steady['elapsed']:.2f} s, {steady['rejected']} refused"
    )
    print(
        f"  latency ms: p50 {percentile(ms, 0.5):.1f}, p90 {percentile(ms, 0.9):.1f}, "
        f"p99 {percentile(ms, 0.99):.1f}, max {max(ms):.1f}, mean {statistics.fmean(ms):.1f}"
    )
    print(
        json.dumps(
            {
                "chats": plan.chats,
                "msgs_per_s": round(msgs_per_s, 1),
                "p50_ms": round(percentile(ms, 0.5), 1),
                "p99_ms": round(percentile(ms, 0.99), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
