"""The composition root: settings → logging → storage → model → worker → manager → adapters.

Run with `python -m bot` (or the `llm-chat-bot` command). Owns the one event loop,
the signal handlers and the shutdown order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Sequence

from bot.config import Settings, load_settings
from bot.errors import ConfigError
from bot.ports import Adapter

logger = logging.getLogger("bot")

EXIT_CONFIG = 2


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


def build_adapters(settings: Settings) -> list[Adapter]:
    """The platform adapters whose tokens are set, or the terminal chat when none is."""
    from bot.chat.commands import COMMANDS

    adapters: list[Adapter] = []
    if settings.telegram_token is not None:
        from adapters.telegram.adapter import TelegramAdapter

        adapters.append(TelegramAdapter(settings, COMMANDS))
    if settings.discord_token is not None:
        from adapters.discord.adapter import DiscordAdapter

        adapters.append(DiscordAdapter(settings, COMMANDS))
    if not adapters:
        from adapters.console import ConsoleAdapter

        logger.info("no TELEGRAM_TOKEN or DISCORD_TOKEN set: starting the terminal chat")
        adapters.append(ConsoleAdapter())
    return adapters


async def serve(settings: Settings, adapters: Sequence[Adapter] | None = None) -> int:
    """Run the bot until the adapters finish or SIGINT/SIGTERM arrives. Returns the exit code."""
    from bot.chat.conversation import ConversationManager
    from bot.model.hf import load_engine
    from bot.model.scheduler import Worker
    from storage.database import create_engine, init_db
    from storage.repository import SqlRepository

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    db = create_engine(settings.database_url)
    repo = SqlRepository.from_engine(db)
    try:
        await init_db(db)  # fail fast on a bad DATABASE_URL, before the slow model load
        model = await asyncio.to_thread(
            load_engine,
            settings.model,
            dtype=settings.model_dtype,
            device=settings.model_device,
            cache_dir=settings.model_cache_dir,
            context_tokens=settings.model_context_tokens,
            allow_download=settings.model_allow_download,
            progress=lambda line: logger.info("%s", line),
        )
        if stop.is_set():
            return 0
        adapters = list(adapters) if adapters is not None else build_adapters(settings)
        # What is loaded by now (libraries, the model) lives as long as the process. Left
        # to the collector, every full pass walks it all: ~0.2 s with the default model,
        # during which the loop and the model thread both stand still.
        gc.collect()
        gc.freeze()
        async with (
            Worker(model, max_batch_size=settings.max_batch_size, queue_size=settings.queue_size) as worker,
            ConversationManager(settings, repo, worker) as manager,
        ):
            tasks = {asyncio.create_task(a.run(manager), name=f"adapter:{a.name}") for a in adapters}
            stopper = asyncio.create_task(stop.wait(), name="signal-wait")
            logger.info("ready: %s", ", ".join(a.name for a in adapters))
            done, _ = await asyncio.wait(tasks | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            code = 0
            for task in done - {stopper}:
                if task.cancelled() or (exc := task.exception()) is None:
                    continue
                if isinstance(exc, ConfigError):  # e.g. a rejected token: one clear line
                    logger.error("Configuration error: %s", exc)
                    code = EXIT_CONFIG
                else:
                    logger.error("%s stopped with an error", task.get_name(), exc_info=exc)
                    code = 1
            logger.info("shutting down")
            # Replies in progress end with a note while the adapters can still deliver it.
            await manager.close()
            for task in tasks | {stopper}:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
        return code
    finally:
        await repo.close()
        await db.dispose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def main() -> None:
    """Console entry point."""
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
