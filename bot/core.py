"""The core of the bot, opened and closed in one place: storage → model worker →
conversation manager. The entry point, the tests' fixtures and the benchmarks all
open it with `open_core`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from bot.chat.conversation import ConversationManager
from bot.config import Settings
from bot.model.scheduler import Worker
from bot.ports import Engine, Repository
from storage.database import open_database
from storage.repository import SqlRepository


@dataclass(frozen=True, slots=True)
class Core:
    """The opened core. `manager` is what adapters call."""

    settings: Settings
    repository: Repository
    worker: Worker
    manager: ConversationManager


@asynccontextmanager
async def open_core(
    settings: Settings, load_engine: Callable[[], Engine], *, repository: Repository | None = None
) -> AsyncIterator[Core]:
    """Open the database (`settings.database_url`, or the given `repository`), then load
    the model with `load_engine` off the event loop, start its worker and the manager.

    The database comes first so that a bad `DATABASE_URL` fails before a slow model
    load. On exit the manager stops every conversation (replies in progress end with a
    note), then the worker stops, then pending writes are flushed and the database is
    closed.
    """
    async with AsyncExitStack() as stack:
        if repository is None:
            database = await stack.enter_async_context(open_database(settings.database_url))
            sql = SqlRepository.from_engine(database)
            stack.push_async_callback(sql.close)  # runs before the engine is disposed
            repository = sql
        engine = await asyncio.to_thread(load_engine)
        worker = await stack.enter_async_context(
            Worker(engine, max_batch_size=settings.max_batch_size, queue_size=settings.queue_size)
        )
        manager = await stack.enter_async_context(ConversationManager(settings, repository, worker))
        yield Core(settings, repository, worker, manager)
