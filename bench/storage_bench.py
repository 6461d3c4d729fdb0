"""Storage under load: 50 conversations at once through the real manager and worker
(around the fake engine, so the model costs nothing), on SQLite and on PostgreSQL.

Every conversation sends its next message as soon as the previous reply is complete
(closed loop); a message's latency runs from `manager.handle` to the end of its turn
(user message stored, reply generated and stored). Three runs, each on a new database,
after one warm-up message per conversation:
1. SQLite (a file in a temp dir), one process;
2. PostgreSQL (a throwaway cluster this script starts, as the tests do), one process;
3. PostgreSQL, two processes of 25 conversations each, started together: turns take
   the per-conversation advisory lock and settings are read at every turn, as they
   must when processes share the database.

Targets: PostgreSQL >= 0.5x SQLite msgs/s on one process; two processes on PostgreSQL
>= 1.5x one. Run from the repository root: ``python bench/storage.py [--messages 40]``
(which runs this file).
Prints human lines, then as the last line one JSON:
{"sqlite_msgs_per_s": …, "postgres_msgs_per_s": …, "sqlite_p99_ms": …,
 "postgres_p99_ms": …, "two_process_postgres_msgs_per_s": …}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bot.config import Settings  # noqa: E402
from bot.core import open_core  # noqa: E402
from bot.events import IncomingMessage  # noqa: E402
from tests.fakes.events import incoming  # noqa: E402
from tests.fakes.fake_engine import FakeEngine  # noqa: E402
from tests.pg import throwaway_cluster  # noqa: E402

CONVERSATIONS = 50


class NullTarget:
    """A ReplyTarget that takes everything at once (delivery is not what is measured)."""

    max_chars = 4096
    edit_interval = 0.05

    def __init__(self) -> None:
        self._sent = 0

    async def send(self, text: str) -> str:
        self._sent += 1
        return str(self._sent)

    async def edit(self, message_id: str, text: str) -> None:
        return None

    async def typing(self) -> None:
        return None

    async def send_file(self, filename: str, data: bytes, caption: str) -> str:
        return await self.send(caption)

    async def sender_is_chat_admin(self) -> bool:
        return False


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def message(conversation: int, number: int) -> IncomingMessage:
    return incoming(f"question {number} of conversation {conversation}", user=f"user-{conversation}", chat="bench")


async def run_load(
    url: str, conversations: range, per_conversation: int, start_at: float | None = None
) -> dict[str, Any]:
    """Run the closed loop on `url`; returns messages, wall-clock start/end and latencies."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=url,
        max_new_tokens=32,
        history_turns=10,
        max_batch_size=64,
        queue_size=1024,
    )
    async with open_core(settings, FakeEngine) as core:
        manager = core.manager
        await asyncio.gather(*(manager.handle(message(c, -1), NullTarget()) for c in conversations))  # warm-up
        if start_at is not None:  # the two processes start together
            await asyncio.sleep(max(0.0, start_at - time.time()))
        latencies: list[float] = []

        async def converse(conversation: int) -> None:
            target = NullTarget()
            for number in range(per_conversation):
                began = time.perf_counter()
                await manager.handle(message(conversation, number), target)
                latencies.append(time.perf_counter() - began)

        started = time.time()
        await asyncio.gather(*(converse(c) for c in conversations))
        ended = time.time()
    return {"messages": len(latencies), "started": started, "ended": ended, "latencies": latencies}


def summary(result: dict[str, Any]) -> tuple[float, float]:
    """(messages/s, p99 latency in ms)."""
    seconds = result["ended"] - result["started"]
    return result["messages"] / seconds, 1000 * percentile(result["latencies"], 0.99)


def two_processes(url: str, per_conversation: int) -> float:
    """Half the conversations in each of two processes on `url`; messages/s together."""
    start_at = time.time() + 8.0  # both are set up by then
    half = CONVERSATIONS // 2
    children = []
    for first in (0, half):
        command = [sys.executable, __file__, "--child", url, "--first", str(first), "--count", str(half)]
        command += ["--messages", str(per_conversation), "--start-at", str(start_at)]
        children.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT))
    results = []
    for child in children:
        out, _ = child.communicate(timeout=600)
        if child.returncode != 0:
            raise SystemExit(f"a bench process failed (exit {child.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    if min(r["started"] for r in results) < start_at - 0.5:
        print("warning: a process was not ready at the agreed start", file=sys.stderr)
    messages = sum(r["messages"] for r in results)
    return float(messages / (max(r["ended"] for r in results) - min(r["started"] for r in results)))


async def measure(per_conversation: int) -> dict[str, float]:
    everyone = range(CONVERSATIONS)
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = summary(await run_load(f"sqlite+aiosqlite:///{tmp}/bench.db", everyone, per_conversation))
    print(f"SQLite, one process:       {sqlite[0]:7.1f} msgs/s, p99 {sqlite[1]:6.1f} ms")
    with throwaway_cluster() as cluster:
        postgres = summary(await run_load(await cluster.create_database(), everyone, per_conversation))
        print(f"PostgreSQL, one process:   {postgres[0]:7.1f} msgs/s, p99 {postgres[1]:6.1f} ms")
        two = await asyncio.to_thread(two_processes, await cluster.create_database(), per_conversation)
        print(f"PostgreSQL, two processes: {two:7.1f} msgs/s")
    ratio, scale = postgres[0] / sqlite[0], two / postgres[0]
    print(f"target PostgreSQL >= 0.5x SQLite: {ratio:.2f}x ({'met' if ratio >= 0.5 else 'MISSED'})")
    print(f"target two processes >= 1.5x one: {scale:.2f}x ({'met' if scale >= 1.5 else 'MISSED'})")
    return {
        "sqlite_msgs_per_s": round(sqlite[0], 1),
        "postgres_msgs_per_s": round(postgres[0], 1),
        "sqlite_p99_ms": round(sqlite[1], 1),
        "postgres_p99_ms": round(postgres[1], 1),
        "two_process_postgres_msgs_per_s": round(two, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=40, help="messages per conversation (measured)")
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=CONVERSATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        conversations = range(args.first, args.first + args.count)
        result = asyncio.run(run_load(args.child, conversations, args.messages, args.start_at))
        print(json.dumps({k: result[k] for k in ("messages", "started", "ended")}))
        return
    print(json.dumps(asyncio.run(measure(args.messages))))


if __name__ == "__main__":
    main()
