"""The real bot in a process of its own, around the fake engine instead of a model:
`python -m tests.fakes.bot_process --name A`. Everything else is the real thing:
settings from the environment, the adapters, storage, `serve`'s shutdown on SIGTERM.

Replies are ``"<name> echo: <text>"``, so a test sees which process answered.
"""

from __future__ import annotations

import argparse

import bot.app
from bot.__main__ import main
from bot.config import Settings
from tests.fakes.fake_engine import FakeEngine


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.bot_process")
    parser.add_argument("--name", required=True, help="put in front of every reply")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds per generated token")
    args = parser.parse_args(argv)
    name: str = args.name

    def fake_engine(_settings: Settings) -> FakeEngine:
        return FakeEngine(reply=lambda text: f"{name} echo: {text}", step_delay=args.step_delay)

    bot.app.load_local_engine = fake_engine  # type: ignore[assignment]
    main()


if __name__ == "__main__":
    run()
