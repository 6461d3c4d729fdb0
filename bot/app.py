"""The composition root: settings → core (storage, model, manager) → adapters, and the
shutdown order. `bot.__main__` runs `serve` in the one event loop.

Adapters are supervised: one that stops with an unexpected error is logged with its
traceback and run again after a backoff (1 s, doubling to 60 s, back to 1 s once a
run lasted a minute), while the other adapters and the turns in flight go on. Only a
`ConfigError` (a rejected token, a missing intent, another instance on the token)
stops the bot."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from bot.chat.commands import COMMANDS
from bot.config import Settings
from bot.core import open_core
from bot.errors import ConfigError
from bot.ports import Adapter, Engine, IncomingHandler

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2


@dataclass(frozen=True, slots=True)
class Backoff:
    """How a failed adapter is restarted: after `first` seconds, doubling up to `most`;
    a run that lasted `stable` seconds counts as healthy and resets the wait."""

    first: float = 1.0
    most: float = 60.0
    stable: float = 60.0


async def supervise(adapter: Adapter, handler: IncomingHandler, backoff: Backoff = Backoff()) -> None:
    """Run `adapter` until it returns (the terminal at the end of its input) or raises
    `ConfigError`; restart it after any other error."""
    loop = asyncio.get_running_loop()
    delay = backoff.first
    while True:
        started = loop.time()
        try:
            await adapter.run(handler)
            return
        except ConfigError:
            raise
        except Exception:
            if loop.time() - started >= backoff.stable:
                delay = backoff.first
            logger.exception("%s adapter stopped with an error; restarting it in %g s", adapter.name, delay)
        await asyncio.sleep(delay)
        delay = min(backoff.most, delay * 2)


def build_adapters(settings: Settings) -> list[Adapter]:
    """The platform adapters whose tokens are set, or the terminal chat when none is."""
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


def load_local_engine(settings: Settings) -> Engine:
    """The configured transformers model (blocking: run it off the event loop)."""
    from bot.model.hf import load_engine

    return load_engine(
        settings.model,
        dtype=settings.model_dtype,
        device=settings.model_device,
        cache_dir=settings.model_cache_dir,
        context_tokens=settings.model_context_tokens,
        allow_download=settings.model_allow_download,
        progress=lambda line: logger.info("%s", line),
        compile_mode=settings.model_compile,
        weight_dtype=settings.model_weight_dtype,
    )


async def serve(settings: Settings, adapters: Sequence[Adapter] | None = None, *, backoff: Backoff = Backoff()) -> int:
    """Run the bot until the adapters finish or SIGINT/SIGTERM arrives. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with open_core(settings, functools.partial(load_local_engine, settings)) as core:
            if stop.is_set():
                return 0
            adapters = list(adapters) if adapters is not None else build_adapters(settings)
            if core.health is not None:  # /readyz: every adapter connected
                core.health.adapters = adapters
            # What is loaded by now (libraries, the model) lives as long as the process. Left
            # to the collector, every full pass walks it all: ~0.2 s with the default model,
            # during which the loop and the model thread both stand still.
            gc.collect()
            gc.freeze()
            tasks = {
                asyncio.create_task(supervise(a, core.manager, backoff), name=f"adapter:{a.name}") for a in adapters
            }
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
            if core.health is not None:
                core.health.stopping = True
            # Replies in progress end with a note while the adapters can still deliver it.
            await core.manager.close()
            for task in tasks | {stopper}:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
        return code
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
