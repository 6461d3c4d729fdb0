"""A burst with the default model: 200 users send 5 messages each, all at once, through
the conversation manager with the bot's default queue bounds.

The real core (manager, worker with continuous batching, SQLite in a temp dir) around
the real default model (greedy). Each user's 5 messages arrive together, in order; every
user's arrive at the same moment. A message is "answered" when its reply target shows a
model reply, "refused" when it got the busy notice instead.

    python bench/burst.py [--users 200] [--messages 5] [--max-new-tokens 32]

The token budget only sets how long the run takes; which messages are admitted depends
on the queue bounds alone. Prints human lines, then one JSON line:
{"users": 200, "messages": 1000, "answered": …, "refused_busy": …, "other": …,
 "elapsed_s": …, "msgs_per_s": …, "tok_s": …, "queue_size": …, "max_pending_messages": …,
 "max_waiting_per_conversation": …}
Target: answered == messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from common import TimingTarget, event, load_default_engine, real_stack

from bot.chat.conversation import MAX_WAITING_PER_CONVERSATION

BUSY_MARKS = ("busy", "faster than I can answer")


async def run(users: int, per_user: int, max_new_tokens: int) -> dict[str, object]:
    engine = load_default_engine("off", "float32")
    async with real_stack(engine, max_new_tokens=max_new_tokens) as core:
        settings = core.settings
        targets: list[TimingTarget] = []
        calls = []
        for u in range(users):
            for i in range(per_user):
                target = TimingTarget()
                targets.append(target)
                text = f"Say one short sentence about the number {u * per_user + i}."
                calls.append(core.manager.handle(event(text, f"user{u}", u * per_user + i), target))
        started = time.perf_counter()
        await asyncio.gather(*calls)
        elapsed = time.perf_counter() - started
        tokens = core.model.stats().tokens_generated
    answered = refused = other = 0
    for target in targets:
        text = target.text
        if any(mark in text for mark in BUSY_MARKS):
            refused += 1
        elif text.strip():
            answered += 1
        else:
            other += 1
    return {
        "users": users,
        "messages": users * per_user,
        "answered": answered,
        "refused_busy": refused,
        "other": other,
        "elapsed_s": round(elapsed, 1),
        "msgs_per_s": round(answered / elapsed, 2),
        "tok_s": round(tokens / elapsed, 1),
        "queue_size": settings.queue_size,
        "max_pending_messages": settings.max_pending_messages,
        "max_waiting_per_conversation": MAX_WAITING_PER_CONVERSATION,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--messages", type=int, default=5, help="messages per user, sent together")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    result = asyncio.run(run(args.users, args.messages, args.max_new_tokens))
    print(
        f"{result['messages']} messages from {result['users']} users at once, default queue bounds: "
        f"{result['answered']} answered, {result['refused_busy']} refused as busy, {result['other']} other, "
        f"in {result['elapsed_s']} s ({result['tok_s']} tokens/s generated)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
