"""The core of the bot, opened and closed in one place: (the health and metrics server
with `METRICS_PORT`) → storage → model backend (the local worker, or an
OpenAI-compatible server with `MODEL_BACKEND=openai`) → conversation manager. The
entry point, the tests' fixtures and the benchmarks all open it with `open_core`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from bot.chat.conversation import ConversationManager
from bot.config import Settings
from bot.health import HealthServer
from bot.metrics import MeteredBackend, Metrics
from bot.model.scheduler import Worker
from bot.ports import Engine, ModelBackend, Repository
from storage.database import open_database
from storage.repository import SqlRepository


@dataclass(frozen=True, slots=True)
class Core:
    """The opened core. `manager` is what adapters call; `model` is the backend (timed
    by `metrics` when `METRICS_PORT` is set; `health` is then the HTTP server, whose
    `adapters` the composition root attaches)."""

    settings: Settings
    repository: Repository
    model: ModelBackend
    manager: ConversationManager
    metrics: Metrics | None = None
    health: HealthServer | None = None

    @property
    def worker(self) -> Worker:
        """The local model worker (`MODEL_BACKEND=local`)."""
        model = self.model.wrapped if isinstance(self.model, MeteredBackend) else self.model
        if not isinstance(model, Worker):
            raise TypeError(f"MODEL_BACKEND={self.settings.model_backend}: there is no local worker")
        return model


@asynccontextmanager
async def open_core(
    settings: Settings, load_engine: Callable[[], Engine], *, repository: Repository | None = None
) -> AsyncIterator[Core]:
    """Open the database (`settings.database_url`, or the given `repository`), then the
    model backend, then the manager. The backend is `settings.model_backend`: "local"
    loads the model with `load_engine` off the event loop and starts its worker;
    "openai" connects to `OPENAI_BASE_URL` (`load_engine` is not called).

    The database comes first so that a bad `DATABASE_URL` fails before a slow model
    load. On exit the manager stops every conversation (replies in progress end with a
    note), then the worker stops, then pending writes are flushed and the database is
    closed.
    """
    async with AsyncExitStack() as stack:
        metrics = health = None
        if settings.metrics_port is not None:  # first: /healthz answers during a slow model load
            metrics = Metrics()
            health = await stack.enter_async_context(
                HealthServer(settings.metrics_host, settings.metrics_port, metrics)
            )
        if repository is None:
            database = await stack.enter_async_context(open_database(settings.database_url))
            sql = SqlRepository.from_engine(database)
            stack.push_async_callback(sql.close)  # runs before the engine is disposed
            repository = sql
        if health is not None:
            health.repository = repository
        model: ModelBackend
        if settings.model_backend == "openai":
            from bot.model.remote import OpenAIBackend  # the openai client only when used

            model = await stack.enter_async_context(
                OpenAIBackend(
                    base_url=settings.openai_base_url,
                    api_key=settings.openai_api_key,
                    model=settings.openai_model,
                    context_length=settings.model_context_tokens,
                    timeout=settings.openai_timeout,
                    max_concurrency=settings.openai_max_concurrency,
                    queue_size=settings.queue_size,
                    max_retries=settings.openai_max_retries,
                    tokenizer=settings.openai_tokenizer,
                )
            )
        else:
            engine = await asyncio.to_thread(load_engine)
            model = await stack.enter_async_context(
                Worker(
                    engine,
                    max_batch_size=settings.max_batch_size,
                    queue_size=settings.queue_size,
                    model_name=settings.model or "SmolLM2-135M-Instruct",
                )
            )
        if metrics is not None and health is not None:
            model = MeteredBackend(model, metrics)
            metrics.watch(model)
            health.model = model
        manager = await stack.enter_async_context(ConversationManager(settings, repository, model, observer=metrics))
        yield Core(settings, repository, model, manager, metrics, health)
