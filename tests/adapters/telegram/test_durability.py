"""Nothing lost, nothing twice, on the Telegram side: updates confirmed only once the
core accepted them, a 409 Conflict that lasts, the failures that keep a reply for
later (and those that never will), recovery targets, and files (`/export`).

The real adapter on python-telegram-bot against the fake Bot API server; the handlers
are test-local (the manager's side is tested in `test_with_manager.py`)."""

from __future__ import annotations

import asyncio
import datetime as dtm
from collections.abc import Awaitable, Callable

import pytest

from adapters.telegram.adapter import TelegramAdapter
from adapters.telegram.delivery import DeliveryChannel, ReplyAddress, TelegramReplyTarget
from bot.chat.commands import COMMANDS
from bot.errors import ConfigError, DeliveryError
from bot.events import IncomingMessage, Platform
from bot.ports import ReplyTarget
from tests.adapters.telegram.chats import ALICE, BOB, GROUP, PRIVATE_ALICE, PRIVATE_BOB
from tests.adapters.telegram.conftest import FAST_RETRY, EchoHandler, RunAdapter, free_port, telegram_settings
from tests.fakes.echo_handler import TestHandler
from tests.fakes.telegram import Chat, FakeTelegramServer

pytestmark = pytest.mark.filterwarnings("ignore:.*attribute `retry_after`:DeprecationWarning")

CONFLICT = "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"


class GatedAccept(TestHandler):
    """Accepts each message only once its gate (by text) is opened; records the order in
    which messages were submitted and accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, asyncio.Event] = {}
        self.submitted: list[str] = []
        self.accepted: list[str] = []

    async def submit(self, event: IncomingMessage, target: ReplyTarget) -> Awaitable[None]:
        self.submitted.append(event.text)
        gate = self.gates.get(event.text)
        if gate is not None:
            await gate.wait()
        self.accepted.append(event.text)
        return await super().submit(event, target)

    async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
        await target.send(f"got {event.text}")


# --------------------------------------------------------------------------- confirming updates


async def test_a_batch_is_confirmed_only_once_every_update_in_it_was_accepted(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    handler = GatedAccept()
    handler.gates["slow to store"] = asyncio.Event()
    async with run_adapter(handler):
        server.user_sends(PRIVATE_BOB, BOB, "quick")
        held = server.user_sends(PRIVATE_ALICE, ALICE, "slow to store")
        await server.wait_for(lambda: server.bot_texts(BOB.id) == ["got quick"])
        await asyncio.sleep(0.2)  # long enough for another poll, had the adapter made one
        assert held.update_id is not None and server.confirmed <= held.update_id
        assert server.pending_updates >= 1
        handler.gates["slow to store"].set()
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["got slow to store"])
        await server.wait_for(lambda: server.confirmed > held.update_id)  # type: ignore[operator]
    assert server.pending_updates == 0


async def test_an_update_not_yet_accepted_when_the_adapter_stops_comes_again_after_a_restart(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    first = GatedAccept()
    first.gates["lost in the crash?"] = asyncio.Event()  # never opened: the process "dies"
    async with run_adapter(first):
        server.user_sends(PRIVATE_ALICE, ALICE, "lost in the crash?")
        await server.wait_for(lambda: first.submitted == ["lost in the crash?"])
    assert first.accepted == []
    second = GatedAccept()
    async with run_adapter(second):
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["got lost in the crash?"])
    assert second.accepted == ["lost in the crash?"]
    assert server.pending_updates == 0


async def test_one_conversation_is_submitted_in_order_while_others_go_ahead(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    handler = GatedAccept()
    handler.gates["alice 1"] = asyncio.Event()
    async with run_adapter(handler):
        for text in ("alice 1", "alice 2", "alice 3"):
            server.user_sends(PRIVATE_ALICE, ALICE, text)
        server.user_sends(PRIVATE_BOB, BOB, "bob 1")
        await server.wait_for(lambda: server.bot_texts(BOB.id) == ["got bob 1"])
        assert handler.submitted.count("alice 2") == 0  # waits for "alice 1" to be accepted
        handler.gates["alice 1"].set()
        await server.wait_for(lambda: len(server.bot_texts(ALICE.id)) == 3)
    assert [t for t in handler.accepted if t.startswith("alice")] == ["alice 1", "alice 2", "alice 3"]


# --------------------------------------------------------------------------- 409 Conflict


async def test_a_409_conflict_that_lasts_stops_the_adapter_naming_the_token(server: FakeTelegramServer) -> None:
    server.fail_next("getUpdates", status=409, description=CONFLICT, times=1000)
    adapter = TelegramAdapter(
        telegram_settings(server), COMMANDS, retry=FAST_RETRY, conflict_timeout=0.5, poll_backoff=0.05
    )
    with pytest.raises(ConfigError) as caught:
        await asyncio.wait_for(adapter.run(EchoHandler()), timeout=10)
    assert caught.value.setting == "TELEGRAM_TOKEN"
    assert "another bot instance uses this token" in str(caught.value)
    assert len(server.calls_to("getUpdates")) >= 3  # retried for the whole window first
    assert not adapter.connected


async def test_a_short_409_conflict_is_ridden_out(server: FakeTelegramServer, run_adapter: RunAdapter) -> None:
    server.fail_next("getUpdates", status=409, description=CONFLICT, times=2)
    handler = EchoHandler()
    async with run_adapter(handler) as adapter:
        assert adapter.connected
        server.user_sends(PRIVATE_ALICE, ALICE, "only one of us now")
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["Echo: only one of us now"])
    assert [c.status for c in server.calls_to("getUpdates")][:2] == [409, 409]
    assert not adapter.connected


# --------------------------------------------------------------------------- recovery targets


async def test_recovery_is_asked_for_once_connected_with_targets_that_reach_the_chat(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    forum = Chat.supergroup(-1_000_000_000_555, "Forum")
    asked = server.user_sends(forum, ALICE, "@LlmTestBot an old question")  # a message Telegram knows
    handler = EchoHandler()
    async with run_adapter(handler):
        await server.wait_for(lambda: len(handler.recoveries) == 1)
        ((platform, make_target),) = handler.recoveries
        assert platform == "telegram"
        accepted_before = IncomingMessage(
            platform="telegram",
            chat_id=f"{forum.id}/77",
            user_id=str(ALICE.id),
            display_name="Alice",
            message_id=str(asked.message_id),
            text="an old question",
            is_private=False,
            timestamp=dtm.datetime.now(dtm.UTC),
            thread_id="77",
        )
        target = make_target(accepted_before)
        message_id = await target.send("the answer at last")
        await target.edit(message_id, "the answer at last, edited")
    (reply,) = server.bot_messages(forum.id)[-1:]
    assert reply.text == "the answer at last, edited" and str(reply.message_id) == message_id
    assert (reply.reply_to, reply.thread_id) == (asked.message_id, 77)
    assert len(handler.recoveries) == 1


async def test_targets_outlive_a_restart_of_the_adapter(server: FakeTelegramServer) -> None:
    handler = EchoHandler()
    adapter = TelegramAdapter(telegram_settings(server), COMMANDS, retry=FAST_RETRY, poll_timeout=1.0)

    async def run_once() -> asyncio.Task[None]:
        task = asyncio.create_task(adapter.run(handler), name="test:telegram-adapter")
        await asyncio.wait_for(adapter.started.wait(), 10)
        return task

    async def stop(task: asyncio.Task[None]) -> None:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    first = await run_once()
    server.user_sends(PRIVATE_ALICE, ALICE, "hi")
    await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["Echo: hi"])
    await stop(first)
    (target,) = handler.targets
    with pytest.raises(DeliveryError) as caught:
        await target.send("while stopped")
    assert (caught.value.permanent, caught.value.kind) == (False, "stopped")
    assert not adapter.connected
    # The supervisor runs the same adapter again; the core delivers what it kept
    # through the target it has.
    second = await run_once()
    assert adapter.connected
    await target.send("delivered after the restart")
    assert server.bot_texts(ALICE.id) == ["Echo: hi", "delivered after the restart"]
    await stop(second)
    assert len(handler.recoveries) == 2  # asked again after each (re)connection


# --------------------------------------------------------------------------- failures


async def _send_fails(server: FakeTelegramServer, run_adapter: RunAdapter, **kwargs: float) -> DeliveryError:
    handler = EchoHandler()
    async with run_adapter(handler, **kwargs):
        server.user_sends(PRIVATE_ALICE, ALICE, "hello?")
        await server.wait_for(lambda: bool(handler.errors), timeout=10)
    (error,) = handler.errors
    return error


async def test_a_send_failing_with_5xx_after_the_retries_is_kept_for_later(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    server.fail_next("sendMessage", status=500, times=4)
    error = await _send_fails(server, run_adapter)
    assert (error.permanent, error.kind) == (False, "server_error")
    assert [c.status for c in server.calls_to("sendMessage")] == [500] * 4
    assert server.bot_texts(ALICE.id) == []


async def test_a_long_flood_wait_is_not_waited_out_but_kept_for_later(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    server.fail_next("sendMessage", status=429, retry_after=90)
    error = await _send_fails(server, run_adapter)
    assert (error.permanent, error.kind) == (False, "rate_limited")
    assert "retry after 90 s" in str(error)
    assert len(server.calls_to("sendMessage")) == 1


async def test_a_send_whose_answer_times_out_is_not_sent_again(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    server.delay_next("sendMessage", 1.0)  # Telegram carries it out, but answers late
    handler = EchoHandler()
    async with run_adapter(handler, send_timeout=0.3):
        server.user_sends(PRIVATE_ALICE, ALICE, "slow answer")
        await server.wait_for(lambda: bool(handler.errors), timeout=10)
        await asyncio.sleep(1.0)  # time for a retry, had there been one
    (error,) = handler.errors
    assert (error.permanent, error.kind) == (False, "timeout")
    assert len(server.calls_to("sendMessage")) == 1
    assert server.bot_texts(ALICE.id) == ["Echo:"]  # the first piece, once: no second copy


@pytest.mark.parametrize(
    ("status", "description", "kind"),
    [
        (403, "Forbidden: bot was blocked by the user", "forbidden"),
        (400, "Bad Request: chat not found", "not_found"),
        (400, "Bad Request: can't parse entities", "bad_request"),
    ],
)
async def test_a_chat_that_refuses_the_bot_is_a_permanent_failure(
    server: FakeTelegramServer, run_adapter: RunAdapter, status: int, description: str, kind: str
) -> None:
    server.fail_next("sendMessage", status=status, description=description)
    error = await _send_fails(server, run_adapter)
    assert (error.permanent, error.kind) == (True, kind)
    assert len(server.calls_to("sendMessage")) == 1


# --------------------------------------------------------------------------- files


async def test_a_file_is_sent_as_a_document_quoting_the_message_in_groups(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    sent: list[str] = []

    class Exporter(TestHandler):
        async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
            text = "# Conversation\n\n**You:** héllo\n"
            sent.append(await target.send_file("conversation.md", text.encode(), "Your conversation"))

    async with run_adapter(Exporter()):
        asked = server.user_sends(GROUP, ALICE, "/export")
        await server.wait_for(lambda: bool(sent))
    (upload,) = server.uploads
    assert (upload.chat_id, upload.filename, upload.caption) == (GROUP.id, "conversation.md", "Your conversation")
    assert upload.text == "# Conversation\n\n**You:** héllo\n"
    assert upload.reply_to == asked.message_id and sent == [str(upload.message_id)]
    assert server.bot_texts(GROUP.id) == []  # a document, not a text message


async def test_a_closed_channel_is_a_stop_the_core_may_retry_after() -> None:
    channel = DeliveryChannel(None, edit_interval=1.0, admin_cache_ttl=60.0)
    target = TelegramReplyTarget(channel, ReplyAddress(ALICE.id, ALICE.id, is_private=True))
    with pytest.raises(DeliveryError) as caught:
        await target.send_file("a.md", b"x", "")
    assert str(caught.value) == "sendDocument: the Telegram adapter has stopped"
    assert (caught.value.permanent, caught.value.kind) == (False, "stopped")


class SlowRecovery(GatedAccept):
    """Recovery that takes until `recovered` is set (reading many open turns)."""

    def __init__(self) -> None:
        super().__init__()
        self.recovered = asyncio.Event()

    async def recover(self, platform: Platform, make_target: Callable[[IncomingMessage], ReplyTarget]) -> None:
        await super().recover(platform, make_target)
        await self.recovered.wait()


async def test_no_update_is_accepted_before_the_turns_left_by_a_restart_are_queued(
    server: FakeTelegramServer,
) -> None:
    server.user_sends(PRIVATE_ALICE, ALICE, "newer than what the restart left")
    handler = SlowRecovery()
    adapter = TelegramAdapter(telegram_settings(server), COMMANDS, retry=FAST_RETRY, poll_timeout=1.0)
    task = asyncio.create_task(adapter.run(handler), name="test:telegram-adapter")
    try:
        await server.wait_for(lambda: len(handler.recoveries) == 1)
        await asyncio.sleep(0.2)
        assert handler.submitted == []  # it would be answered before older turns of its chat
        handler.recovered.set()
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["got newer than what the restart left"])
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_webhook_call_is_answered_only_once_its_update_was_accepted(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    port = free_port()
    handler = GatedAccept()
    handler.gates["hold on"] = asyncio.Event()
    async with run_adapter(
        handler,
        telegram_webhook_url=f"http://127.0.0.1:{port}/hook",
        telegram_webhook_listen="127.0.0.1",
        telegram_webhook_port=port,
    ):
        server.user_sends(PRIVATE_ALICE, ALICE, "hold on")
        await server.wait_for(lambda: handler.submitted == ["hold on"])
        await asyncio.sleep(0.2)
        assert server.webhook_deliveries == []  # no 200 yet: a crash now and Telegram sends it again
        handler.gates["hold on"].set()
        await server.wait_for(lambda: server.webhook_deliveries != [])
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["got hold on"])
    assert [status for _, status in server.webhook_deliveries] == [200]


async def test_two_bots_polling_one_token_end_with_a_config_error_though_both_get_updates(
    server: FakeTelegramServer,
) -> None:
    def instance() -> TelegramAdapter:
        return TelegramAdapter(
            telegram_settings(server),
            COMMANDS,
            retry=FAST_RETRY,
            poll_timeout=0.2,
            conflict_timeout=1.0,
            poll_backoff=0.05,
        )

    pairs = [(instance(), EchoHandler()) for _ in range(2)]
    tasks = [asyncio.create_task(a.run(h), name=f"test:instance-{i}") for i, (a, h) in enumerate(pairs)]
    try:
        for i in range(20):  # updates keep coming: each poller gets some between its 409s
            server.user_sends(PRIVATE_ALICE, ALICE, f"message {i}")
            await asyncio.sleep(0.1)
        done, _ = await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_EXCEPTION)
        assert done, "neither bot noticed the other"
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    stopped = [r for r in results if isinstance(r, ConfigError)]
    assert stopped and all(r.setting == "TELEGRAM_TOKEN" and "another bot instance" in str(r) for r in stopped)
    assert any(c.status == 409 for c in server.calls_to("getUpdates"))
    assert all(handler.events for _, handler in pairs)  # the conflict outlasted updates to both
