"""Retries of Bot API calls, in python-telegram-bot's own extension point for them.

PTB sends every Bot API request but ``getUpdates`` through the `BaseRateLimiter` given
to ``ApplicationBuilder.rate_limiter``, as its `AIORateLimiter` does; this one does not
throttle, it retries what is worth retrying and re-raises the rest unchanged, so PTB
and the reply target still see Telegram's own errors.

Nothing is shown twice: a call that creates a message (``sendMessage``,
``sendDocument``, ...) is retried only when Telegram provably did not carry it out:
flood control (429), a 5xx answer (Telegram answers those for requests it did not
process), or no connection made at all (`NotSent`). A send whose answer timed out or
whose connection broke mid-request may have arrived, so it is not retried; the caller
gets the error (and the reply target a non-permanent `DeliveryError`). Edits, chat
actions and reads are idempotent and are retried after timeouts too.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import logging
import warnings
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from telegram.error import BadRequest, NetworkError, RetryAfter
from telegram.ext import BaseRateLimiter

from adapters.telegram.transport import NotSent

logger = logging.getLogger(__name__)

ApiResult = bool | dict[str, Any] | list[dict[str, Any]]


def retry_after_seconds(exc: RetryAfter) -> float:
    """How long Telegram's flood control asks to wait."""
    with warnings.catch_warnings():  # PTB 22 warns that the int form is deprecated
        warnings.simplefilter("ignore")
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)


# Bot API methods whose repetition would show something twice.
NOT_IDEMPOTENT = frozenset(
    {
        "sendMessage",
        "sendDocument",
        "sendPhoto",
        "sendAudio",
        "sendVoice",
        "sendVideo",
        "sendAnimation",
        "sendSticker",
        "sendMediaGroup",
        "sendPoll",
        "sendLocation",
        "sendContact",
        "sendDice",
        "copyMessage",
        "copyMessages",
        "forwardMessage",
        "forwardMessages",
    }
)


def answered_by_server(exc: NetworkError) -> bool:
    """Whether the error is Telegram's own answer (a 5xx status), not a transport failure.

    PTB raises a plain `NetworkError` without a cause for a 5xx answer; every transport
    failure (ours or PTB's wrapper) is raised *from* the underlying exception."""
    return type(exc) is NetworkError and exc.__cause__ is None


def safe_to_retry(endpoint: str, exc: NetworkError) -> bool:
    """Whether repeating `endpoint` after `exc` can never show anything twice."""
    return endpoint not in NOT_IDEMPOTENT or isinstance(exc, NotSent) or answered_by_server(exc)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How every Bot API call is retried.

    Flood control (429) waits as long as Telegram says, up to `flood_attempts` times and
    `max_flood_wait` seconds; timeouts, network errors and 5xx are retried `attempts`
    times with exponential backoff (sends only when `safe_to_retry`); everything else
    is permanent and raised at once.
    """

    attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0
    flood_attempts: int = 5
    max_flood_wait: float = 60.0

    def backoff(self, retry: int) -> float:
        """Seconds before transient retry number `retry` (1-based)."""
        return float(min(self.max_delay, self.base_delay * 2 ** (retry - 1)))


class RetryingRateLimiter(BaseRateLimiter[None]):
    """A `telegram.ext.BaseRateLimiter` that retries each request under a `RetryPolicy`.

    When it gives up it raises the last error; a network error then carries the note
    ``"gave up after N retries"``.
    """

    __slots__ = ("_policy",)

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to release."""

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, ApiResult]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: None,
    ) -> ApiResult:
        """Run `callback` until it succeeds or the policy gives up."""
        policy = self._policy
        transient = floods = 0
        while True:
            try:
                return await callback(*args, **kwargs)
            except RetryAfter as exc:
                wait = retry_after_seconds(exc)
                floods += 1
                if floods > policy.flood_attempts or wait > policy.max_flood_wait:
                    raise
                logger.warning("Telegram %s: flood control, retrying in %g s", endpoint, wait)
                await asyncio.sleep(wait)
            except BadRequest:  # before NetworkError, its base class: permanent
                raise
            except NetworkError as exc:  # timeouts, connection failures, 5xx
                if not safe_to_retry(endpoint, exc):
                    exc.add_note("not retried: Telegram may have carried it out")
                    raise
                transient += 1
                if transient > policy.attempts:
                    exc.add_note(f"gave up after {policy.attempts} retries")
                    raise
                delay = policy.backoff(transient)
                logger.warning(
                    "Telegram %s failed (%s); retry %d/%d in %g s",
                    endpoint,
                    exc.message,
                    transient,
                    policy.attempts,
                    delay,
                )
                await asyncio.sleep(delay)
