"""The remote model backend: any OpenAI-compatible chat completions server (vLLM, TGI,
Ollama, a llama.cpp server, `transformers serve`, a hosted API) behind the same
`bot.ports.ModelBackend` port as the in-process `Worker`.

The official `openai` client does the HTTP, the SSE parsing and the retries: a 429 or a
5xx before the stream starts is retried with backoff, honouring `Retry-After`, up to
`OPENAI_MAX_RETRIES` times (the client logs each retry). This module adds what a chat
bot needs on top: a bounded queue in front of `OPENAI_MAX_CONCURRENCY` requests in
flight, a token count for the prompt budget, one harder-trimmed retry when the server
says the prompt is too long, the quirks of real servers' streams, and errors from the
one error tree with a clear message for the user.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Final

import httpx
import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from pydantic import SecretStr

from bot.errors import BotError, BusyError, ConfigError, GenerationError, InputRejected, ModelUnavailable, ReplyCutOff
from bot.events import ChatTurn
from bot.ports import FinishReason, GenerationParams, RenderedPrompt, ReplyChunk, WorkerStats

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN: Final = 3.0
"""Without `OPENAI_TOKENIZER`, a token is counted for every 3 characters. Common BPE
tokenizers average about 4 characters per token on English prose, so this errs on the
side of a shorter prompt; text that tokenizes denser (some scripts, long numbers) is
caught by the server's own check and the harder-trimmed retry."""

MESSAGE_OVERHEAD: Final = 4
"""Template tokens around each message (role markers, separators), as chat templates add."""

REPLY_PRIMING: Final = 3
"""Template tokens that open the assistant's reply."""

LIST_TIMEOUT_S: Final = 10.0
"""At most this long for one `/v1/models` call (start-up, `/model`, `/config set model`)."""

RECONNECT_FIRST_S: Final = 1.0
RECONNECT_MAX_S: Final = 30.0

_CONTEXT_TOO_LONG = re.compile(
    r"context[_ ](length|size|window)|maximum context|too long|too many tokens|exceeds?\b.*\btokens?"
    r"|tokens?\b.*\bexceed|must be <= \d+",
    re.IGNORECASE,
)

SLOW_SERVER = "The model server took too long to answer. Please try again in a moment."


def _is_context_too_long(exc: openai.APIStatusError) -> bool:
    """Whether a 400/413/422 says the prompt does not fit (each server words it its own way:
    OpenAI's `context_length_exceeded`, vLLM's "maximum context length", llama.cpp's
    "exceeds the available context size", TGI's "`inputs` tokens + `max_new_tokens`
    must be <= N")."""
    if exc.status_code not in (400, 413, 422):
        return False
    if getattr(exc, "code", None) == "context_length_exceeded":
        return True
    return bool(_CONTEXT_TOO_LONG.search(str(exc.message)) or _CONTEXT_TOO_LONG.search(str(exc.body)))


class OpenAIBackend:
    """Implements `bot.ports.ModelBackend` with an OpenAI-compatible server.

    Use as ``async with OpenAIBackend(...) as backend:``. Entering checks the server
    once: a refused key or an `OPENAI_MODEL` the server does not list raises
    `ConfigError` naming the setting; a server that cannot be reached (or answers 5xx)
    does not stop start-up: a background task keeps trying with backoff, logging each
    try, and users are told the model server is unavailable meanwhile.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: SecretStr | None = None,
        model: str | None = None,
        context_length: int = 2048,
        timeout: float = 60.0,
        max_concurrency: int = 16,
        queue_size: int = 64,
        max_retries: int = 3,
        tokenizer: Path | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        # Servers that need no key still get a placeholder: the client insists on one.
        key = api_key.get_secret_value() if api_key is not None else "none"
        self._client = AsyncOpenAI(
            base_url=self._base_url,
            api_key=key,
            timeout=httpx.Timeout(timeout, connect=min(timeout, LIST_TIMEOUT_S)),
            max_retries=max_retries,
        )
        self._configured_model = model.strip() if model and model.strip() else None
        self._default_model: str | None = self._configured_model
        self._context_length = context_length
        self._tokenizer_path = tokenizer
        self._encode: Callable[[str], int] | None = None
        self._max_concurrency = max_concurrency
        self._queue_size = queue_size
        self._slots = asyncio.Semaphore(max_concurrency)
        self._waiting = 0
        self._active = 0
        self._tokens = 0
        self._busy_s = 0.0
        self._busy_since: float | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> OpenAIBackend:
        if self._tokenizer_path is not None:
            self._encode = await asyncio.to_thread(_load_tokenizer, self._tokenizer_path)
        try:
            await self._connect()
        except ModelUnavailable as exc:
            logger.warning(
                "model server at %s is not reachable yet (%s); retrying in the background", self._base_url, exc
            )
            self._reconnect = asyncio.create_task(self._keep_connecting(), name="openai-backend:connect")
        except BaseException:
            await self._client.close()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._reconnect is not None:
            self._reconnect.cancel()
            try:
                await self._reconnect
            except asyncio.CancelledError:
                if (current := asyncio.current_task()) is not None and current.cancelling():
                    raise
        await self._client.close()
        logger.info("model server client closed")

    async def _connect(self) -> None:
        """List the server's models once: resolves the default model and checks the key
        and `OPENAI_MODEL`. Raises `ConfigError` for those, `ModelUnavailable` when the
        server cannot be reached."""
        try:
            available = await self._list_models()
        except openai.NotFoundError:
            # Some servers have no /v1/models; a configured model id is then taken on trust.
            if self._configured_model is None:
                raise ConfigError(
                    "OPENAI_MODEL", f"the server at {self._base_url} lists no models (no /v1/models); set OPENAI_MODEL"
                ) from None
            logger.info("model server at %s has no model list; using %s", self._base_url, self._configured_model)
            self._connected.set()
            return
        if self._configured_model is not None:
            if self._configured_model not in available:
                listed = ", ".join(available) or "none"
                raise ConfigError(
                    "OPENAI_MODEL",
                    f"the server at {self._base_url} does not serve {self._configured_model!r} (it lists: {listed})",
                )
        elif not available:
            raise ConfigError("OPENAI_MODEL", f"the server at {self._base_url} lists no models; set OPENAI_MODEL")
        else:
            self._default_model = available[0]
        self._connected.set()
        logger.info("model server at %s: model %s", self._base_url, self._default_model)

    async def _keep_connecting(self) -> None:
        delay = RECONNECT_FIRST_S
        attempt = 1
        while True:
            await asyncio.sleep(delay)
            attempt += 1
            try:
                await self._connect()
                return
            except ModelUnavailable as exc:
                next_delay = min(delay * 2, RECONNECT_MAX_S)
                logger.warning(
                    "model server at %s still unreachable (try %d: %s); next try in %.0f s",
                    self._base_url,
                    attempt,
                    exc,
                    next_delay,
                )
            except ConfigError as exc:  # reachable now, but the key or the model is wrong
                next_delay = RECONNECT_MAX_S
                logger.error("model server at %s refuses the configuration: %s", self._base_url, exc)
            delay = next_delay

    async def _list_models(self) -> tuple[str, ...]:
        """The ids `/v1/models` lists. Raises `ConfigError` (key refused),
        `ModelUnavailable` (unreachable, 5xx, 429), or `openai.NotFoundError`."""
        client = self._client.with_options(max_retries=0, timeout=LIST_TIMEOUT_S)
        try:
            page = await client.models.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise ConfigError(
                "OPENAI_API_KEY", f"the model server at {self._base_url} refused the key ({exc.status_code})"
            ) from None
        except openai.NotFoundError:
            raise
        except (openai.APIConnectionError, openai.APIStatusError) as exc:
            raise ModelUnavailable(_describe(exc)) from None
        return tuple(m.id for m in page.data if getattr(m, "id", None))

    # ------------------------------------------------------------------ ModelBackend

    @property
    def context_length(self) -> int:
        """`MODEL_CONTEXT_TOKENS`: the server's own window is not reported by the API."""
        return self._context_length

    @property
    def model_name(self) -> str:
        return self._default_model or "(not known yet: the model server has not answered)"

    async def count_tokens(self, text: str) -> int:
        """Tokens by `OPENAI_TOKENIZER`, or the stated characters-per-token estimate."""
        if self._encode is not None:
            return self._encode(text)
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    async def render(self, system: str | None, turns: Sequence[ChatTurn]) -> RenderedPrompt:
        """The chat as messages are sent, with its estimated length in tokens."""
        length = REPLY_PRIMING
        for text in ([system] if system else []) + [t.content for t in turns]:
            length += await self.count_tokens(text) + MESSAGE_OVERHEAD
        return RenderedPrompt(system, tuple(turns), length)

    async def models(self) -> tuple[str, ...]:
        """What the server lists now. Raises `ModelUnavailable` when it cannot be asked."""
        try:
            return await self._list_models()
        except openai.NotFoundError:
            return (self._configured_model,) if self._configured_model else ()
        except ConfigError as exc:
            raise ModelUnavailable(str(exc)) from None

    def stats(self) -> WorkerStats:
        busy = self._busy_s + (time.monotonic() - self._busy_since if self._busy_since is not None else 0.0)
        return WorkerStats(
            queue_depth=self._waiting,
            active=self._active,
            tokens_generated=self._tokens,
            tokens_per_s=self._tokens / busy if busy > 0 else 0.0,
        )

    async def generate(self, prompt: RenderedPrompt, params: GenerationParams) -> AsyncGenerator[ReplyChunk, None]:
        """Stream the reply from the server as it arrives.

        Raises `BusyError` when `QUEUE_SIZE` requests already wait for one of the
        `OPENAI_MAX_CONCURRENCY` slots (or the server still answers 429 after the
        retries), `ModelUnavailable` when the server cannot be reached, `InputRejected`
        when even a harder-trimmed prompt is too long for it, `ReplyCutOff` when the
        stream breaks after text was streamed, `GenerationError` otherwise. Closing the
        generator (or cancelling its consumer) closes the HTTP stream, which tells the
        server to stop generating.
        """
        if params.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
        await self._take_slot()
        try:
            model = params.model or await self._resolve_default_model()
            stream = await self._open(model, prompt, params)
            reader = self._read(stream)
            try:
                async for chunk in reader:
                    yield chunk
            finally:
                await reader.aclose()
                await stream.close()  # an unfinished stream: the server sees the client go
        finally:
            self._release_slot()

    # ------------------------------------------------------------------ the request

    async def _take_slot(self) -> None:
        if self._slots.locked() and self._waiting >= self._queue_size:
            raise BusyError(f"{self._waiting} requests waiting for the model server")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._active += 1
        if self._busy_since is None:
            self._busy_since = time.monotonic()

    def _release_slot(self) -> None:
        self._active -= 1
        self._slots.release()
        if self._active == 0 and self._busy_since is not None:
            self._busy_s += time.monotonic() - self._busy_since
            self._busy_since = None

    async def _resolve_default_model(self) -> str:
        if self._default_model is not None:
            return self._default_model
        await self._connect()  # the server was down at start-up: one try now
        if self._default_model is None:
            raise ModelUnavailable("no model known yet")
        return self._default_model

    async def _open(
        self, model: str, prompt: RenderedPrompt, params: GenerationParams
    ) -> openai.AsyncStream[ChatCompletionChunk]:
        """Start the streaming request; once more with a harder-trimmed history when the
        server says the prompt is too long."""
        try:
            return await self._create(model, prompt, params)
        except openai.APIStatusError as exc:
            if not _is_context_too_long(exc):
                raise self._status_error(exc, model) from None
            trimmed = await self._trim_harder(prompt)
            if trimmed is None:
                raise _too_long() from None
            logger.warning(
                "the model server says the prompt is too long (%s); retrying with %d of %d turns "
                "(is MODEL_CONTEXT_TOKENS above the server's context?)",
                exc.message,
                len(trimmed.turns),
                len(prompt.turns),
            )
        try:
            return await self._create(model, trimmed, params)
        except openai.APIStatusError as exc:
            if _is_context_too_long(exc):
                raise _too_long() from None
            raise self._status_error(exc, model) from None

    async def _create(
        self, model: str, prompt: RenderedPrompt, params: GenerationParams
    ) -> openai.AsyncStream[ChatCompletionChunk]:
        messages = _messages(prompt)
        try:
            stream = await self._client.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
                max_tokens=params.max_new_tokens,
                temperature=params.sampling.temperature,
                top_p=params.sampling.top_p,
                # Sent only when set: some servers refuse fields they do not know.
                seed=params.sampling.seed if params.sampling.seed is not None else openai.omit,
                stop=list(params.stop) if params.stop else openai.omit,
            )
        except openai.APITimeoutError:
            raise GenerationError("the model server did not answer in time", user_message=SLOW_SERVER) from None
        except openai.APIConnectionError as exc:
            raise ModelUnavailable(_describe(exc)) from None
        return stream

    def _status_error(self, exc: openai.APIStatusError, model: str) -> BotError:
        """The error an HTTP error answer (after the client's retries) becomes."""
        if isinstance(exc, openai.RateLimitError):
            return BusyError(f"the model server still answers 429 after retries: {exc.message}")
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            logger.error("OPENAI_API_KEY: the model server at %s refused the key (%d)", self._base_url, exc.status_code)
            return ModelUnavailable(f"key refused ({exc.status_code})")
        if isinstance(exc, openai.NotFoundError):
            return GenerationError(
                f"model {model!r} not found: {exc.message}",
                user_message=f"The model {model!r} is not available on the model server. "
                "An admin can pick another with /config set model <id>.",
            )
        if exc.status_code >= 500:
            return ModelUnavailable(_describe(exc))
        return GenerationError(f"the model server refused the request: {_describe(exc)}")

    async def _trim_harder(self, prompt: RenderedPrompt) -> RenderedPrompt | None:
        """The prompt with the oldest turns dropped until it is at most half as long (the
        newest turn always stays), or without the system prompt when it is one turn.
        None when there is nothing left to drop."""
        turns = list(prompt.turns)
        system = prompt.system
        if len(turns) > 1:
            target = prompt.length // 2
            trimmed = await self.render(system, turns)
            while len(turns) > 1 and trimmed.length > target:
                turns.pop(0)
                trimmed = await self.render(system, turns)
            return trimmed
        if system:
            return await self.render(None, turns)
        return None

    async def _read(self, stream: openai.AsyncStream[ChatCompletionChunk]) -> AsyncGenerator[ReplyChunk, None]:
        """The stream as `ReplyChunk`s, whatever the server's dialect: with or without
        `[DONE]`, usage on the last chunk or never, `choices` empty or null in a usage
        chunk, unknown fields. Each text delta counts as one token until the server's
        usage (when it sends one) corrects the total on the last chunk."""
        counted = 0
        usage: int | None = None
        finish: str | None = None
        try:
            async for chunk in stream:
                chunk_usage = getattr(chunk, "usage", None)
                if chunk_usage is not None and isinstance(getattr(chunk_usage, "completion_tokens", None), int):
                    usage = chunk_usage.completion_tokens
                for choice in getattr(chunk, "choices", None) or ():
                    delta = getattr(choice, "delta", None)
                    text = getattr(delta, "content", None) if delta is not None else None
                    if isinstance(text, str) and text:
                        counted += 1
                        self._tokens += 1
                        yield ReplyChunk(text, 1)
                    ended = getattr(choice, "finish_reason", None)
                    if isinstance(ended, str) and ended:
                        finish = ended
        except (httpx.TimeoutException, openai.APITimeoutError) as exc:
            if counted:
                raise ReplyCutOff(f"the model server stopped sending after {counted} tokens: {exc!r}") from exc
            raise GenerationError(f"no token within the timeout: {exc!r}", user_message=SLOW_SERVER) from exc
        except Exception as exc:  # the edge: whatever broke the stream becomes our error
            logger.warning("model server stream broke after %d tokens: %s", counted, _describe(exc))
            if counted:
                raise ReplyCutOff(f"stream broke after {counted} tokens: {_describe(exc)}") from exc
            raise ModelUnavailable(f"stream broke before the first token: {_describe(exc)}") from exc
        extra = max(0, usage - counted) if usage is not None else 0
        self._tokens += extra
        reason: FinishReason = "length" if finish == "length" else "stop"
        yield ReplyChunk("", extra, reason)


def _messages(prompt: RenderedPrompt) -> list[ChatCompletionMessageParam]:
    messages: list[ChatCompletionMessageParam] = []
    if prompt.system:
        messages.append({"role": "system", "content": prompt.system})
    for turn in prompt.turns:
        if turn.role == "assistant":
            messages.append({"role": "assistant", "content": turn.content})
        elif turn.role == "system":
            messages.append({"role": "system", "content": turn.content})
        else:
            messages.append({"role": "user", "content": turn.content})
    return messages


def _too_long() -> InputRejected:
    return InputRejected("Your message is too long for the model's context window. Please send a shorter one.")


def _describe(exc: BaseException) -> str:
    """One line about a client error, never with the request's headers (the key)."""
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {str(exc.message)[:200]}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _load_tokenizer(path: Path) -> Callable[[str], int]:
    """`OPENAI_TOKENIZER`: a `tokenizer.json`, or a directory holding one (the
    `tokenizers` library, no model framework)."""
    from tokenizers import Tokenizer

    file = path if path.is_file() else path / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:
        raise ConfigError("OPENAI_TOKENIZER", f"{file} is not a tokenizer file: {exc}") from None
    logger.info("counting prompt tokens with %s", file)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return count
