"""The health and metrics HTTP server (`METRICS_PORT`, `METRICS_HOST`): aiohttp in the
bot's own event loop, off unless `METRICS_PORT` is set, in every mode (the terminal
chat included).

- `GET /healthz`: 200 while the process serves HTTP at all (a liveness probe). It is up
  from the start of `open_core`, so a slow first model load is not mistaken for a hang.
- `GET /readyz`: 200 when the database answers (`Repository.ping`), the model is loaded
  (local) or its server lists its models (`ModelBackend.models`), every adapter is
  `connected`, and the bot is not shutting down; otherwise 503. Either way the JSON
  body names each check, e.g. ``{"ready": false, "not_ready": ["database"], "checks":
  {"database": "StorageError: …", "model": "ok", "adapter:telegram": "ok"}}``.
- `GET /metrics`: `bot.metrics.Metrics` in the Prometheus text format.

The checks of one `/readyz` run concurrently, each bounded by `CHECK_TIMEOUT`, so a
hung database cannot hang the probe.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from aiohttp import web

from bot.errors import BotError, ConfigError, first_line
from bot.metrics import CONTENT_TYPE, Metrics
from bot.ports import ModelBackend, Repository

logger = logging.getLogger(__name__)

# A check that has not answered in this many seconds counts as not ready; give the probe
# a longer timeout of its own (Kubernetes' timeoutSeconds defaults to 1).
CHECK_TIMEOUT = 3.0


class AdapterStatus(Protocol):
    """What `/readyz` reads of a `bot.ports.Adapter`."""

    @property
    def name(self) -> str: ...

    @property
    def connected(self) -> bool: ...


class HealthServer:
    """The HTTP server. What it checks is attached as the bot opens: `repository`, then
    `model`, then `adapters`; until each is there, `/readyz` says it is not ready."""

    def __init__(self, host: str, port: int, metrics: Metrics) -> None:
        self.host = host
        self.metrics = metrics
        self.repository: Repository | None = None
        self.model: ModelBackend | None = None
        self.adapters: Sequence[AdapterStatus] | None = None
        self.stopping = False
        """Set when the bot begins to shut down: from then on `/readyz` is 503, so a load
        balancer sends nothing new while the replies in progress are wrapped up."""
        self._requested_port = port
        self._port: int | None = None
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the chosen one when `METRICS_PORT=0`)."""
        if self._port is None:
            raise RuntimeError("the health server is not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> HealthServer:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        # access_log=None: a scraper every few seconds would drown the bot's own log.
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            no_such_address = isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
            setting = "METRICS_HOST" if no_such_address else "METRICS_PORT"
            raise ConfigError(
                setting, f"cannot listen on {self.host}:{self._requested_port}: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        self._port = int(runner.addresses[0][1])  # the port the OS chose for METRICS_PORT=0
        logger.info("Health and metrics on %s (/healthz, /readyz, /metrics)", self.url)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def readiness(self) -> dict[str, str]:
        """Each check's result: "ok", or why it is not ready."""
        checks: dict[str, Awaitable[str]] = {
            "database": self._check_database(),
            "model": self._check_model(),
        }
        names = list(checks)
        results = await asyncio.gather(*(_bounded(check) for check in checks.values()))
        out = dict(zip(names, results, strict=True))
        if self.adapters is None:
            out["adapters"] = "not started"
        else:
            for adapter in self.adapters:
                out[f"adapter:{adapter.name}"] = "ok" if adapter.connected else "not connected"
        if self.stopping:
            out["shutdown"] = "shutting down"
        return out

    async def _check_database(self) -> str:
        if self.repository is None:
            return "not opened"
        await self.repository.ping()
        return "ok"

    async def _check_model(self) -> str:
        if self.model is None:
            return "loading"
        await self.model.models()  # a local model answers at once; a server must list its models
        return "ok"

    # ------------------------------------------------------------------ handlers

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        checks = await self.readiness()
        failing = [name for name, result in checks.items() if result != "ok"]
        body: dict[str, Any] = {"ready": not failing, "not_ready": failing, "checks": checks}
        return web.Response(text=json.dumps(body), status=503 if failing else 200, content_type="application/json")

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _bounded(check: Awaitable[str]) -> str:
    try:
        return await asyncio.wait_for(check, CHECK_TIMEOUT)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT:g} s"
    except BotError as exc:
        return f"{type(exc).__name__}: {first_line(exc, limit=200)}"
    except Exception as exc:  # a probe must answer whatever a check does; the log keeps it
        logger.exception("readiness check failed")
        return f"{type(exc).__name__}: {first_line(exc, limit=200)}"
