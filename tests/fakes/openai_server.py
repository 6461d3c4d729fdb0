"""A small fake OpenAI-compatible server (chat completions over SSE, `/v1/models`) for
the faults a real server will not make on demand.

It serves 127.0.0.1 on a free port. By default a streamed reply is ``"Echo: " + the
last user message``, one word per SSE chunk, `tokens_per_s` chunks a second, ending
with a usage chunk and ``data: [DONE]``. Tests script the next requests' faults with
`fail_next` (an HTTP error, with headers such as ``Retry-After``), and pick how streams
end and break with the attributes below. Every request is recorded (`requests`), and
the server counts streams the client closed before the end (`client_closed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

Ending = Literal["done_with_usage", "usage_then_done_vllm", "done_no_usage", "no_done", "usage_no_done"]
"""How a stream ends: usage on the last chunk then ``[DONE]`` (OpenAI with include_usage),
a separate usage chunk with ``choices: []`` and then one with ``choices: null`` (vLLM),
``[DONE]`` with no usage at all, no ``[DONE]`` (transformers serve), usage on the last
chunk and no ``[DONE]`` (llama.cpp)."""


@dataclass(frozen=True, slots=True)
class Failure:
    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    code: str | None = None


@dataclass
class Recorded:
    """One chat completions request: its JSON body and when it arrived."""

    body: dict[str, Any]
    at: float
    authorization: str | None


def echo(messages: list[dict[str, Any]]) -> str:
    last = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    return f"Echo: {last}"


class FakeOpenAIServer:
    """Use as ``async with FakeOpenAIServer() as server:``; `server.base_url` ends in /v1."""

    def __init__(self, *, models: tuple[str, ...] = ("fake-model", "other-model"), api_key: str | None = None) -> None:
        self.models = models
        self.api_key = api_key
        self.reply: Callable[[list[dict[str, Any]]], str] = echo
        self.tokens_per_s: float = 0.0  # 0: as fast as possible
        self.first_token_delay: float = 0.0
        self.ending: Ending = "done_with_usage"
        self.drop_after: int | None = None  # close the connection after this many text chunks
        self.malformed_after: int | None = None  # send a broken ``data:`` line after this many
        self.extra_fields = True  # unknown fields in every chunk, as servers add them
        self.tokens_per_chunk = 1  # what usage reports per text chunk
        self.context_limit: int | None = None  # prompts longer (in characters) get a 400
        self.requests: list[Recorded] = []
        self.model_list_calls = 0
        self.client_closed = 0
        self.completed = 0
        self.streaming_now = 0
        self._failures: deque[Failure] = deque()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None and isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAIServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ scripting

    def fail_next(
        self, status: int, message: str = "", *, times: int = 1, headers: dict[str, str] | None = None
    ) -> None:
        """The next `times` chat completions requests get this HTTP error."""
        for _ in range(times):
            self._failures.append(Failure(status, message or f"fake error {status}", dict(headers or {})))

    def user_texts(self) -> list[str]:
        """The last user message of each request, in arrival order."""
        return [echo(r.body.get("messages", [])).removeprefix("Echo: ") for r in self.requests]

    # ------------------------------------------------------------------ handlers

    def _authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    @staticmethod
    def _error(
        status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> web.Response:
        body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
        return web.json_response(body, status=status, headers=headers)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        self.model_list_calls += 1
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.", code="invalid_api_key")
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Recorded(body, time.monotonic(), request.headers.get("Authorization")))
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.", code="invalid_api_key")
        if self._failures:
            failure = self._failures.popleft()
            return self._error(failure.status, failure.message, headers=failure.headers)
        if body.get("model") not in self.models:
            return self._error(404, f"The model `{body.get('model')}` does not exist.", code="model_not_found")
        messages = body.get("messages", [])
        if self.context_limit is not None and sum(len(m.get("content", "")) for m in messages) > self.context_limit:
            return self._error(
                400,
                f"This model's maximum context length is {self.context_limit} tokens. "
                "However, you requested more tokens. Please reduce the length of the messages.",
                code="context_length_exceeded",
            )
        words = self._words(self.reply(messages), body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        self.streaming_now += 1
        try:
            await self._stream(request, response, body, words)
        except (ConnectionResetError, ConnectionError):
            self.client_closed += 1
        finally:
            self.streaming_now -= 1
        return response

    @staticmethod
    def _words(text: str, body: dict[str, Any]) -> list[str]:
        words = [w + " " for w in text.split(" ")]
        if words:
            words[-1] = words[-1][:-1]
        words = [w for w in words if w]
        for stop in body.get("stop") or []:
            joined = "".join(words)
            if stop in joined:
                kept = joined[: joined.index(stop)]
                words = [w + " " for w in kept.split(" ")]
                words[-1] = words[-1][:-1]
                words = [w for w in words if w]
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        return words[: int(limit)] if limit else words

    def _chunk(self, body: dict[str, Any], choices: list[dict[str, Any]] | None, **more: Any) -> bytes:
        chunk: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": choices,
            **more,
        }
        if self.extra_fields:
            chunk["system_fingerprint"] = "fp_fake"
            chunk["x_fake_server"] = {"unknown": True}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, body: dict[str, Any], words: list[str]
    ) -> None:
        await response.write(self._chunk(body, [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]))
        if self.first_token_delay:
            await asyncio.sleep(self.first_token_delay)
        delay = 1.0 / self.tokens_per_s if self.tokens_per_s > 0 else 0.0
        limit = body.get("max_tokens")
        for sent, word in enumerate(words):
            if self.drop_after is not None and sent >= self.drop_after:
                transport = request.transport
                if transport is not None:
                    transport.abort()  # no terminating chunk: the client sees a broken stream
                return
            if self.malformed_after is not None and sent >= self.malformed_after:
                await response.write(b'data: {"choices": [{"delta": {"content": "oops"\n\n')
                await response.write_eof()
                return
            if delay and sent:
                await asyncio.sleep(delay)
            await response.write(self._chunk(body, [{"index": 0, "delta": {"content": word}, "finish_reason": None}]))
        finish = "length" if limit and len(words) >= int(limit) else "stop"
        completion = len(words) * self.tokens_per_chunk
        usage = {"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 10 + completion}
        last = [{"index": 0, "delta": {}, "finish_reason": finish}]
        if self.ending == "done_with_usage":
            await response.write(self._chunk(body, last, usage=usage) + b"data: [DONE]\n\n")
        elif self.ending == "usage_then_done_vllm":
            await response.write(self._chunk(body, last))
            await response.write(self._chunk(body, [], usage=usage))
            await response.write(self._chunk(body, None, usage=usage) + b"data: [DONE]\n\n")
        elif self.ending == "done_no_usage":
            await response.write(self._chunk(body, last) + b"data: [DONE]\n\n")
        elif self.ending == "usage_no_done":
            await response.write(self._chunk(body, last, usage=usage))
        else:  # no_done
            await response.write(self._chunk(body, last))
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        self.completed += 1
