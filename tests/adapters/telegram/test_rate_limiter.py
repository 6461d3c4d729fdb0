"""Retries of Bot API calls (`RetryingRateLimiter`): through the adapter against the fake
Bot API server, and the limiter alone."""

from __future__ import annotations

import asyncio
import datetime as dtm
from typing import Any

import pytest
from telegram.error import BadRequest, ChatMigrated, Forbidden, NetworkError, RetryAfter, TelegramError, TimedOut

from adapters.telegram.rate_limiter import ApiResult, RetryingRateLimiter, RetryPolicy
from adapters.telegram.transport import NotSent, ReadTimedOut
from bot.errors import DeliveryError
from tests.adapters.telegram.chats import ALICE, PRIVATE_ALICE
from tests.adapters.telegram.conftest import FAST_RETRY, EchoHandler, RunAdapter
from tests.fakes.telegram import FakeTelegramServer

# PTB itself warns when it builds a RetryAfter (its int/timedelta migration), not our code.
pytestmark = pytest.mark.filterwarnings("ignore:.*attribute `retry_after`:DeprecationWarning")


# --------------------------------------------------------------------------- through the adapter


async def test_flood_control_is_honoured_before_retrying(server: FakeTelegramServer, run_adapter: RunAdapter) -> None:
    server.fail_next("sendMessage", status=429, retry_after=1)
    async with run_adapter(EchoHandler()):
        server.user_sends(PRIVATE_ALICE, ALICE, "hurry")
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["Echo: hurry"], timeout=10)
    first, second = server.calls_to("sendMessage")
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.done_at >= 1.0


async def test_server_errors_are_retried(server: FakeTelegramServer, run_adapter: RunAdapter) -> None:
    server.fail_next("sendMessage", status=500, times=2)
    server.fail_next("editMessageText", status=502)
    async with run_adapter(EchoHandler()):
        server.user_sends(PRIVATE_ALICE, ALICE, "are you ok")
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["Echo: are you ok"])
    assert [c.status for c in server.calls_to("sendMessage")] == [500, 500, 200]
    assert server.calls_to("editMessageText")[0].status == 502
    assert len(server.bot_messages(ALICE.id)) == 1


async def test_a_request_that_times_out_is_retried(server: FakeTelegramServer, run_adapter: RunAdapter) -> None:
    server.delay_next("editMessageText", 1.5)
    async with run_adapter(EchoHandler(), request_timeout=0.3):
        server.user_sends(PRIVATE_ALICE, ALICE, "slow network")
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["Echo: slow network"])
        await server.wait_for(lambda: all(c.status for c in server.calls_to("editMessageText")))
    edits = server.calls_to("editMessageText")
    first_retry = next(c for c in edits[1:] if c.at > edits[0].at)
    assert first_retry.at - edits[0].at >= 0.3  # the client gave up on the slow answer first
    assert len(server.bot_messages(ALICE.id)) == 1


async def test_errors_that_do_not_go_away_become_a_delivery_error(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    server.fail_next("sendMessage", status=500, times=100)
    handler = EchoHandler()
    async with run_adapter(handler):
        server.user_sends(PRIVATE_ALICE, ALICE, "hello?")
        await server.wait_for(lambda: bool(handler.errors))
    assert isinstance(handler.errors[0], DeliveryError)
    assert len(server.calls_to("sendMessage")) == 1 + FAST_RETRY.attempts


# --------------------------------------------------------------------------- the limiter alone


class Script:
    """A Bot API call that fails with `errors`, in order, then answers True; and the
    waits the limiter made between the attempts."""

    def __init__(self, *errors: TelegramError) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.waits: list[float] = []

    async def __call__(self, endpoint: str, data: dict[str, Any]) -> bool:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return True

    async def run(
        self, policy: RetryPolicy, monkeypatch: pytest.MonkeyPatch, endpoint: str = "sendMessage"
    ) -> ApiResult:
        async def no_wait(seconds: float) -> None:
            self.waits.append(seconds)

        monkeypatch.setattr(asyncio, "sleep", no_wait)
        limiter = RetryingRateLimiter(policy)
        return await limiter.process_request(self, (endpoint, {"chat_id": 1}), {}, endpoint, {}, None)


def flood(seconds: float) -> RetryAfter:
    return RetryAfter(dtm.timedelta(seconds=seconds))


def test_backoff_doubles_up_to_the_maximum() -> None:
    assert [RetryPolicy().backoff(retry) for retry in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


async def test_network_errors_are_retried_with_backoff_and_succeed(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(TimedOut(), NetworkError("Bad Gateway"))
    assert await script.run(RetryPolicy(), monkeypatch, endpoint="editMessageText") is True
    assert (script.calls, script.waits) == (3, [0.5, 1.0])


def _from_transport(error: NetworkError) -> NetworkError:
    """`error` as the transport raises it: from the aiohttp exception underneath."""
    error.__cause__ = OSError("underneath")
    return error


async def test_a_send_is_retried_only_when_it_cannot_have_reached_telegram(monkeypatch: pytest.MonkeyPatch) -> None:
    never_sent = Script(
        _from_transport(NotSent("aiohttp.ClientConnectorError: refused")),
        NetworkError("Internal Server Error (500)"),  # Telegram's own answer: not carried out
        flood(1),
    )
    assert await never_sent.run(RetryPolicy(), monkeypatch) is True
    assert never_sent.calls == 4

    for maybe_sent in (_from_transport(ReadTimedOut()), _from_transport(NetworkError("aiohttp.ServerDisconnected"))):
        script = Script(maybe_sent)
        with pytest.raises(NetworkError) as caught:
            await script.run(RetryPolicy(), monkeypatch)
        assert caught.value is maybe_sent and script.calls == 1
        assert caught.value.__notes__ == ["not retried: Telegram may have carried it out"]
    # An edit shows the same text however often it is repeated.
    edit = Script(_from_transport(ReadTimedOut()))
    assert await edit.run(RetryPolicy(), monkeypatch, endpoint="editMessageText") is True


async def test_network_errors_that_do_not_go_away_are_raised_noting_the_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = Script(*[NetworkError("Internal Server Error (500)")] * 4)
    with pytest.raises(NetworkError) as caught:
        await script.run(RetryPolicy(attempts=2), monkeypatch)
    assert caught.value.__notes__ == ["gave up after 2 retries"]
    assert (script.calls, script.waits) == (3, [0.5, 1.0])


@pytest.mark.parametrize(
    "error",
    [BadRequest("Message to edit not found"), Forbidden("Forbidden: bot was blocked by the user"), ChatMigrated(-100)],
    ids=["bad-request", "forbidden", "chat-migrated"],
)
async def test_permanent_errors_are_raised_at_once(error: TelegramError, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(error)
    with pytest.raises(type(error)) as caught:
        await script.run(RetryPolicy(), monkeypatch)
    assert caught.value is error and not getattr(error, "__notes__", None)
    assert (script.calls, script.waits) == (1, [])


async def test_flood_control_waits_as_long_as_telegram_says(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(flood(2), flood(3))
    assert await script.run(RetryPolicy(), monkeypatch) is True
    assert (script.calls, script.waits) == (3, [2.0, 3.0])


async def test_flood_control_gives_up_after_its_attempts_or_a_too_long_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    too_often = Script(flood(1), flood(1), flood(1))
    with pytest.raises(RetryAfter):
        await too_often.run(RetryPolicy(flood_attempts=2), monkeypatch)
    assert (too_often.calls, too_often.waits) == (3, [1.0, 1.0])

    too_long = Script(flood(61))
    with pytest.raises(RetryAfter):
        await too_long.run(RetryPolicy(max_flood_wait=60), monkeypatch)
    assert (too_long.calls, too_long.waits) == (1, [])
