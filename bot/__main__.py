"""The entry point: settings → logging → `bot.app.serve` in the one event loop.

Run with `python -m bot` (or the `llm-chat-bot` command).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from bot.app import EXIT_CONFIG, serve
from bot.config import load_settings
from bot.errors import ConfigError
from bot.model.native import share_heap_arenas

logger = logging.getLogger("bot")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Libraries that log request URLs would print bot tokens (Telegram puts it in the path).
    for noisy in ("httpx", "httpcore", "telegram.ext.Updater", "discord.http", "discord.gateway"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def main() -> None:
    """Console entry point."""
    share_heap_arenas()  # before any thread allocates (see `bot.model.native`)
    try:
        settings = load_settings()
    except ConfigError as exc:
        configure_logging("WARNING")  # LOG_LEVEL itself may be the bad setting
        logger.error("Configuration error: %s", exc)
        sys.exit(EXIT_CONFIG)
    configure_logging(settings.log_level)
    try:
        code = asyncio.run(serve(settings))
    except ConfigError as exc:
        logger.error("Configuration error: %s", exc)
        code = EXIT_CONFIG
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
