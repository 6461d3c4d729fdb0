"""Recovery under load: 200 users x 5 messages through the real bot process, killed
with `kill -9` twice mid-run and restarted each time.

The bot is `python -m tests.fakes.bot_process` (the real bot: the Telegram adapter with
python-telegram-bot, the conversation manager, the worker and SQLite in a temporary
directory, around the fake engine, whose replies are "bench echo: <message>"). The fake
Bot API server and the users run here, in this process, so they outlive the bot.

Each user has a group chat with the bot and sends 5 messages mentioning it, spread over
the first seconds of the run; the bot is killed while replies are streaming, restarted at
once, killed again, restarted again. Then the run waits until every message is answered
(or the user told it was missed), or until `--settle` seconds pass.

Counted from what the chats show at the end:
- answered: messages with a reply quoting them whose final text is the expected answer;
- told_missed: messages the bot said it missed (older than RECOVER_MAX_AGE);
- lost: messages with neither;
- duplicated: messages with more than one reply quoting them (a frozen partial reply
  beside a full one counts);
- out_of_order: messages whose reply began before the reply to an earlier message of
  the same chat;
- recover_s_max: over the restarts, from spawning the new process until every message
  sent before the kill had its final reply.

Run from the repository root: ``python bench/recovery.py``. Prints human lines, then as
the last line one JSON:
{"users": 200, "messages": 1000, "answered": …, "told_missed": …, "lost": 0,
 "duplicated": 0, "out_of_order": 0, "restarts": 2, "recover_s_max": …}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fakes.processes import BotProcess, base_env  # noqa: E402
from tests.fakes.telegram import Chat, FakeTelegramServer, StoredMessage, User  # noqa: E402

BOT_NAME = "bench"
MISSED_MARK = "missed"  # in the notice for a turn too old to answer after a restart


@dataclass(slots=True)
class Sent:
    """One user message and what became of it."""

    chat_id: int
    message_id: int
    index: int  # its place among its chat's messages
    expected: str
    sent_at: float
    done_at: float | None = None  # when its final reply (or the missed notice) showed


@dataclass(slots=True)
class Ledger:
    """Every message sent, looked up by (chat, message id); completion noted as the
    bot's messages change."""

    sent: dict[tuple[int, int], Sent] = field(default_factory=dict)

    def on_bot_text(self, message: StoredMessage) -> None:
        if message.reply_to is None:
            return
        entry = self.sent.get((message.chat_id, message.reply_to))
        if entry is None or entry.done_at is not None:
            return
        text = message.text or ""
        if text == entry.expected or MISSED_MARK in text.lower():
            entry.done_at = time.perf_counter()

    def unfinished(self, before: float | None = None) -> list[Sent]:
        return [s for s in self.sent.values() if s.done_at is None and (before is None or s.sent_at <= before)]


async def run(users_count: int, per_user: int, spread: float, kills: list[float], settle: float) -> dict[str, object]:
    ledger = Ledger()
    async with FakeTelegramServer() as server:
        server.on_bot_text = ledger.on_bot_text
        users = [User(20_000 + i, f"User{i}") for i in range(users_count)]
        chats = {u.id: Chat.group(-(20_000 + u.id), f"Chat of {u.first_name}") for u in users}
        with tempfile.TemporaryDirectory() as tmp:
            env = base_env(f"sqlite+aiosqlite:///{tmp}/bot.db") | {
                "TELEGRAM_TOKEN": server.token,
                "TELEGRAM_API_BASE": server.api_base,
                "TELEGRAM_EDIT_INTERVAL": "0.2",
                "LOG_LEVEL": "INFO",  # the ready marker is an INFO line
                "MAX_BATCH_SIZE": "32",
            }
            bot = BotProcess(BOT_NAME, env, Path(tmp), step_delay=0.02, ready_marker="Telegram: serving")
            await bot.start()
            await bot.wait_ready()
            started = time.perf_counter()

            async def user(index: int, who: User) -> None:
                chat = chats[who.id]
                for i in range(per_user):
                    due = started + (i + index / users_count) * spread / per_user
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                    text = f"message {i} of user {who.id}"
                    sent = server.user_sends(chat, who, f"@{server.bot.username} {text}")
                    ledger.sent[(chat.id, sent.message_id)] = Sent(
                        chat.id, sent.message_id, i, f"{BOT_NAME} echo: {text}", time.perf_counter()
                    )

            sending = asyncio.gather(*(user(i, u) for i, u in enumerate(users)))
            recoveries: list[float] = []
            watchers: list[asyncio.Task[None]] = []
            for at in kills:
                await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
                killed_at = time.perf_counter()
                in_flight = len(ledger.unfinished(killed_at))
                await bot.kill()
                print(f"kill -9 at {killed_at - started:.1f} s with {in_flight} messages unanswered", flush=True)
                spawned = time.perf_counter()
                await bot.start()
                waiting = ledger.unfinished(killed_at)

                async def recovered(waiting: list[Sent] = waiting, spawned: float = spawned) -> None:
                    await server.wait_for(lambda: all(s.done_at is not None for s in waiting), timeout=settle)
                    recoveries.append(max([s.done_at or spawned for s in waiting], default=spawned) - spawned)

                watchers.append(asyncio.create_task(recovered(), name="bench:recovered"))
            await sending
            with contextlib.suppress(AssertionError):  # what is left unanswered is counted below
                await server.wait_for(lambda: not ledger.unfinished(), timeout=settle)
            await asyncio.gather(*watchers, return_exceptions=True)
            await asyncio.sleep(1.0)  # late duplicates would show now
            elapsed = time.perf_counter() - started
            code = await bot.stop()
            errors = bot.errors()

        answered = told_missed = lost = duplicated = out_of_order = 0
        for chat in chats.values():
            replies: dict[int, list[StoredMessage]] = {}
            for message in server.bot_messages(chat.id):
                if message.reply_to is not None:
                    replies.setdefault(message.reply_to, []).append(message)
            previous_first = 0
            for (chat_id, message_id), sent in sorted(ledger.sent.items(), key=lambda kv: kv[1].index):
                if chat_id != chat.id:
                    continue
                mine = replies.get(message_id, [])
                texts = [m.text or "" for m in mine]
                if sent.expected in texts:
                    answered += 1
                elif any(MISSED_MARK in t.lower() for t in texts):
                    told_missed += 1
                else:
                    lost += 1
                if len(mine) > 1:
                    duplicated += 1
                if mine:
                    first = min(m.message_id for m in mine)
                    if first < previous_first:
                        out_of_order += 1
                    previous_first = max(previous_first, first)
    return {
        "users": users_count,
        "messages": users_count * per_user,
        "answered": answered,
        "told_missed": told_missed,
        "lost": lost,
        "duplicated": duplicated,
        "out_of_order": out_of_order,
        "restarts": len(kills),
        "recover_s_max": round(max(recoveries, default=float("nan")), 2),
        "_elapsed": elapsed,
        "_exit_code": code,
        "_errors": errors[:10],
        "_recoveries": [round(r, 2) for r in recoveries],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--messages", type=int, default=5, help="messages per user")
    parser.add_argument("--spread", type=float, default=10.0, help="seconds over which each user's messages go out")
    parser.add_argument(
        "--kill-at", type=float, nargs="*", default=[3.0, 8.0], help="seconds into the run of each kill -9"
    )
    parser.add_argument("--settle", type=float, default=120.0, help="seconds to wait for the last answers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="bench %(levelname)s %(name)s: %(message)s")
    result = asyncio.run(run(args.users, args.messages, args.spread, sorted(args.kill_at), args.settle))
    print(
        f"{result['messages']} messages from {result['users']} users in {result['_elapsed']:.1f} s; "
        f"bot restarted {result['restarts']} times after kill -9; recovery per restart "
        f"{result['_recoveries']} s; final SIGTERM exit code {result['_exit_code']}"
    )
    errors = result["_errors"]
    if isinstance(errors, list) and errors:
        print("bot log errors (first 10):")
        for line in errors:
            print(f"  {line}")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}))


if __name__ == "__main__":
    main()
