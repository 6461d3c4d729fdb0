"""A fake Telegram Bot API server: the real python-telegram-bot talks to it over HTTP.

It serves ``/bot{token}/{method}`` on 127.0.0.1 (a free port), keeps chats and their
messages as Telegram would (`TelegramWorld`), and answers with the same JSON, status
codes and error descriptions as the real API for the methods the adapter uses
(`BotApiMethods`). Anything else gets the real API's ``404 Not Found``.

Tests act as users (`user_sends`, `user_sends_media`, `user_edits`, `channel_post`),
script failures (`fail_next`, `block`), set chat members' statuses, and read back
every call (`calls`) and what each chat shows (`bot_texts`). Every injected update is
delivered whatever ``allowed_updates`` asked for, so the adapter's own filtering is
what gets tested. With a webhook set, updates are POSTed to it like Telegram does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from tests.fakes.telegram.methods import BotApiMethods
from tests.fakes.telegram.objects import JSON, ApiError, Call, FilePart
from tests.fakes.telegram.world import TelegramWorld

logger = logging.getLogger(__name__)

# Fields that stay strings even when they look like JSON ("123" typed by a user is text).
_STRING_FIELDS = frozenset({"text", "secret_token", "url", "language_code", "action", "parse_mode", "caption"})


class FakeTelegramServer(TelegramWorld):
    """The Bot API of one bot, in process. Use as ``async with FakeTelegramServer() as server``."""

    def __init__(
        self,
        *,
        token: str = "123456789:TEST-token_for-the-fake-server",
        bot_id: int = 7_000_001,
        bot_username: str = "LlmTestBot",
        bot_name: str = "LLM Test Bot",
    ) -> None:
        super().__init__(token=token, bot_id=bot_id, bot_username=bot_username, bot_name=bot_name)
        self.unknown_methods: list[str] = []
        self.webhook_deliveries: list[tuple[int, int]] = []  # (update_id, HTTP status)
        self.port = 0
        self._methods = BotApiMethods(self)
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self.webhook_backends: list[str] = []
        """When set, updates go to these URLs in turn instead of the webhook's URL: a load
        balancer in front of several bot processes."""
        self._next_backend = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        app = web.Application(client_max_size=2**20)
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.closed = True
        self.new_update.fire()  # release open long polls
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeTelegramServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def api_base(self) -> str:
        """What ``TELEGRAM_API_BASE`` should be set to."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ HTTP

    async def _dispatch(self, request: web.Request) -> web.Response:
        path = request.path
        if not path.startswith("/bot") or path.count("/") != 2:
            return self._error(404, "Not Found")
        token, _, method = path[len("/bot") :].partition("/")
        params = await self._read_params(request)
        call = Call(method, params, time.perf_counter())
        self.calls.append(call)
        try:
            if token != self.token:
                raise ApiError(401, "Unauthorized")
            self.take_failure(method, params)
            handler = self._methods.get(method)
            if handler is None:
                self.unknown_methods.append(method)
                logger.warning("fake Telegram: unknown method %s", method)
                raise ApiError(404, "Not Found")
            result = await handler(params)
            delay = self.take_delay(method)
            if delay is not None:
                self.changed.fire()
                await asyncio.sleep(delay)
            response = web.json_response({"ok": True, "result": result})
        except ApiError as exc:
            response = self._error(exc.status, exc.description, exc.parameters)
        call.status = response.status
        call.done_at = time.perf_counter()
        self.changed.fire()
        return response

    @staticmethod
    def _error(status: int, description: str, parameters: JSON | None = None) -> web.Response:
        body: JSON = {"ok": False, "error_code": status, "description": description}
        if parameters:
            body["parameters"] = parameters
        return web.json_response(body, status=status)

    @staticmethod
    async def _read_params(request: web.Request) -> JSON:
        """JSON bodies, or form fields (what PTB sends) whose values are JSON-encoded."""
        raw: dict[str, Any]
        if request.content_type == "application/json":
            body = await request.json()
            return dict(body) if isinstance(body, dict) else {}
        raw = dict(request.query)
        params: JSON = {}
        if request.can_read_body:
            form = await request.post()
            raw.update({k: v for k, v in form.items() if isinstance(v, str)})
            for key, value in form.items():
                if isinstance(value, web.FileField):  # a multipart upload
                    params[key] = FilePart(value.filename, value.content_type, value.file.read())
        for key, value in raw.items():
            if key in _STRING_FIELDS:
                params[key] = value
                continue
            try:
                params[key] = json.loads(value)
            except ValueError:
                params[key] = value
        return params

    # ------------------------------------------------------------------ webhook delivery

    def deliver_to_webhook(self, update: JSON) -> None:
        task = asyncio.create_task(self._post_update(update), name=f"fake-telegram:deliver:{update['update_id']}")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _post_update(self, update: JSON) -> None:
        assert self.webhook is not None
        if self._client is None:
            self._client = aiohttp.ClientSession()
        headers = {}
        secret = self.webhook.get("secret_token")
        if secret:
            headers["X-Telegram-Bot-Api-Secret-Token"] = str(secret)
        url = str(self.webhook["url"])
        if self.webhook_backends:
            url = self.webhook_backends[self._next_backend % len(self.webhook_backends)]
            self._next_backend += 1
        for _ in range(20):  # the webhook server may still be starting
            try:
                async with self._client.post(url, json=update, headers=headers) as response:
                    self.webhook_deliveries.append((int(update["update_id"]), response.status))
                    self.changed.fire()
                    return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        self.webhook_deliveries.append((int(update["update_id"]), 0))
