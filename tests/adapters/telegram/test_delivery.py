"""`TelegramReplyTarget` against the fake Bot API server: long replies, permanent
errors, a group upgraded mid-reply, edits, typing and the chat-admin check."""

from __future__ import annotations

import asyncio
import datetime as dtm
import time
from collections.abc import Awaitable, Callable

import pytest
from telegram import Bot
from telegram.error import Forbidden, NetworkError, RetryAfter

from adapters.telegram.delivery import DeliveryChannel, ReplyAddress, TelegramReplyTarget, delivery_error
from bot.errors import DeliveryError
from bot.events import IncomingMessage
from bot.ports import ReplyTarget
from tests.adapters.telegram.chats import ALICE, BOB, CAROL, GROUP, PRIVATE_ALICE, PRIVATE_BOB, SUPERGROUP
from tests.adapters.telegram.conftest import EchoHandler, RunAdapter
from tests.fakes.echo_handler import TestHandler
from tests.fakes.telegram import Chat, FakeTelegramServer

# --------------------------------------------------------------------------- long replies


async def test_a_reply_longer_than_4096_chars_continues_in_new_messages(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    paragraph = " ".join(["lorem ipsum dolor sit amet"] * 30)  # 809 chars
    long_reply = "\n\n".join([paragraph] * 12)  # ~9.7k chars
    handler = EchoHandler(reply_for=lambda _text: long_reply, piece_delay=0.0)
    async with run_adapter(handler, telegram_edit_interval=0.02):
        server.user_sends(PRIVATE_ALICE, ALICE, "write a lot")
        await server.wait_for(lambda: handler.finished == ["write a lot"], timeout=15)
    texts = server.bot_texts(ALICE.id)
    assert len(texts) == 3
    assert all(len(t) <= 4096 for t in texts)
    assert "\n\n".join(texts) == long_reply  # cut at paragraph boundaries, nothing lost
    rejected = [c for c in server.calls if c.status == 400]
    assert not rejected, "the fake server refused a message as too long"


# --------------------------------------------------------------------------- platform errors


async def test_a_group_upgraded_to_a_supergroup_mid_reply_gets_the_reply_there_and_its_chat_moved(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    upgraded = Chat.supergroup(-1_000_000_000_777, "Tea party, upgraded")
    handler = EchoHandler()
    handler.gates["hello"] = asyncio.Event()
    async with run_adapter(handler):
        server.user_sends(GROUP, ALICE, "@LlmTestBot hello")
        await asyncio.wait_for(handler.started.setdefault("hello", asyncio.Event()).wait(), timeout=5)
        server.upgrade(GROUP, upgraded, by=ALICE)
        await server.wait_for(lambda: len(handler.moves) == 2)
        handler.gates["hello"].set()
        await server.wait_for(lambda: server.bot_texts(upgraded.id) == ["Echo: hello"])

    # Both service messages name the same move; the repository makes the second a no-op.
    assert handler.moves == [("telegram", str(GROUP.id), str(upgraded.id))] * 2
    assert server.bot_messages(GROUP.id) == [] and not handler.errors


async def test_a_blocked_chat_raises_delivery_error_and_other_chats_are_still_served(
    server: FakeTelegramServer, run_adapter: RunAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    server.block(ALICE.id)
    handler = EchoHandler()
    async with run_adapter(handler):
        server.user_sends(PRIVATE_ALICE, ALICE, "you there?")
        await server.wait_for(lambda: bool(handler.errors))
        server.user_sends(PRIVATE_BOB, BOB, "hello")
        await server.wait_for(lambda: server.bot_texts(BOB.id) == ["Echo: hello"])
    (error,) = handler.errors
    assert isinstance(error, DeliveryError) and "blocked" in str(error)
    assert [c.status for c in server.calls_to("sendMessage") if c.params["chat_id"] == ALICE.id] == [403]
    assert any("not delivered" in r.getMessage() for r in caplog.records)


async def test_edits_of_unchanged_text_are_ignored_and_of_deleted_messages_fail(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    outcomes: list[str] = []

    class Editor(TestHandler):
        async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
            message_id = await target.send("same")
            await target.edit(message_id, "same")  # Telegram: 400 message is not modified
            outcomes.append("unchanged edit ignored")
            try:
                await target.edit("999", "gone")
            except DeliveryError as exc:
                outcomes.append(str(exc))

    async with run_adapter(Editor()):
        server.user_sends(PRIVATE_ALICE, ALICE, "edit me")
        await server.wait_for(lambda: len(outcomes) == 2)
    assert outcomes == ["unchanged edit ignored", "editMessageText: Message to edit not found"]
    assert [c.status for c in server.calls_to("editMessageText")] == [400, 400]  # not retried


async def test_typing_sends_the_typing_chat_action_to_the_chat(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    done = asyncio.Event()

    class Typist(TestHandler):
        async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
            await target.typing()
            done.set()

    async with run_adapter(Typist()):
        server.user_sends(SUPERGROUP, ALICE, "@LlmTestBot think")
        await asyncio.wait_for(done.wait(), 5)
    (call,) = server.calls_to("sendChatAction")
    assert call.params == {"chat_id": SUPERGROUP.id, "action": "typing"}


# --------------------------------------------------------------------------- chat admins


class AdminCheck(TestHandler):
    """Answers no message: asks `times` times whether its sender is a chat admin, and
    keeps the answers in order and by sender (``"<chat id>:<user id>"``)."""

    def __init__(self, times: int = 1) -> None:
        super().__init__()
        self.times = times
        self.answers: list[bool] = []
        self.by_sender: dict[str, list[bool]] = {}

    async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
        asked = [await target.sender_is_chat_admin() for _ in range(self.times)]
        self.answers += asked
        self.by_sender[f"{event.chat_id}:{event.user_id}"] = asked


async def test_chat_admin_status_comes_from_get_chat_member_and_is_cached(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    server.set_member_status(GROUP.id, ALICE.id, "creator")
    server.set_member_status(GROUP.id, BOB.id, "administrator")
    checks = AdminCheck(times=2)
    async with run_adapter(checks):
        for user in (ALICE, BOB, CAROL):
            server.user_sends(GROUP, user, "/config set temperature 1")
        server.user_sends(PRIVATE_ALICE, ALICE, "/config set temperature 1")
        await server.wait_for(lambda: len(checks.by_sender) == 4)
    assert checks.by_sender == {
        f"{GROUP.id}:{ALICE.id}": [True, True],
        f"{GROUP.id}:{BOB.id}": [True, True],
        f"{GROUP.id}:{CAROL.id}": [False, False],
        f"{ALICE.id}:{ALICE.id}": [False, False],  # private chats have no chat admins
    }
    asked = sorted(c.params["user_id"] for c in server.calls_to("getChatMember"))
    assert asked == [ALICE.id, BOB.id, CAROL.id]  # once each: the second answer was cached


async def test_an_anonymous_group_admin_counts_as_chat_admin(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    checks = AdminCheck()
    anonymous = {
        "message_id": 1,
        "date": int(time.time()),
        "chat": SUPERGROUP.to_json(),
        "from": {"id": 1087968824, "is_bot": True, "first_name": "Group", "username": "GroupAnonymousBot"},
        "sender_chat": SUPERGROUP.to_json(),
        "text": "/reset chat",
        "entities": [{"type": "bot_command", "offset": 0, "length": 6}],
    }
    async with run_adapter(checks):
        server.inject("message", anonymous)
        await server.wait_for(lambda: bool(checks.answers))
    assert checks.answers == [True] and not server.calls_to("getChatMember")


async def test_a_failed_admin_lookup_means_not_an_admin(server: FakeTelegramServer, run_adapter: RunAdapter) -> None:
    server.set_member_status(GROUP.id, ALICE.id, "administrator")
    server.fail_next("getChatMember", status=403, description="Forbidden: bot was kicked from the group chat")
    checks = AdminCheck()
    async with run_adapter(checks):
        server.user_sends(GROUP, ALICE, "/stats")
        await server.wait_for(lambda: len(checks.answers) == 1)
        server.user_sends(GROUP, ALICE, "/stats")  # the failure was not cached
        await server.wait_for(lambda: len(checks.answers) == 2)
    assert checks.answers == [False, True]


# --------------------------------------------------------------------------- without a server


@pytest.mark.filterwarnings("ignore:.*attribute `retry_after`:DeprecationWarning")
def test_errors_left_after_the_retries_say_which_call_failed_and_why() -> None:
    gave_up = NetworkError("Internal Server Error (500)")
    gave_up.add_note("gave up after 3 retries")
    assert str(delivery_error("sendMessage", gave_up)) == (
        "sendMessage: Internal Server Error (500) (gave up after 3 retries)"
    )
    flood = RetryAfter(dtm.timedelta(seconds=90))
    assert str(delivery_error("editMessageText", flood)) == "editMessageText: flood control, retry after 90 s"
    blocked = Forbidden("Forbidden: bot was blocked by the user")
    assert str(delivery_error("sendChatAction", blocked)) == "sendChatAction: Forbidden: bot was blocked by the user"


async def test_a_closed_channel_fails_every_reply_without_calling_telegram() -> None:
    channel = DeliveryChannel(Bot("123:not-used"), edit_interval=1.0, admin_cache_ttl=60.0)
    target = TelegramReplyTarget(channel, ReplyAddress(GROUP.id, ALICE.id, is_private=False, reply_to=5))
    channel.close()
    replies: dict[str, Callable[[], Awaitable[object]]] = {
        "sendMessage": lambda: target.send("late"),
        "editMessageText": lambda: target.edit("6", "late"),
        "sendChatAction": target.typing,
        "getChatMember": target.sender_is_chat_admin,
    }
    for what, reply in replies.items():
        with pytest.raises(DeliveryError) as caught:
            await reply()
        assert str(caught.value) == f"{what}: the Telegram adapter has stopped"
    assert (target.max_chars, target.edit_interval) == (4096, 1.0)
