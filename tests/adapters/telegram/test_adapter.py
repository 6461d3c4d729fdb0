"""The Telegram adapter's lifecycle on the real python-telegram-bot against the fake Bot
API server: start-up, updates to events, the command menu, the token, shutdown, webhooks.
A test-local handler streams ``"Echo: <text>"`` through the real target."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from adapters.telegram.adapter import NON_TEXT_REPLY, TelegramAdapter, menu_commands
from bot.chat.commands import COMMANDS
from bot.errors import ConfigError
from bot.events import IncomingMessage
from bot.ports import CommandInfo, ReplyTarget
from tests.adapters.telegram.chats import ALICE, BOB, CAROL, GROUP, PRIVATE_ALICE, PRIVATE_BOB, SUPERGROUP
from tests.adapters.telegram.conftest import FAST_RETRY, EchoHandler, RunAdapter, free_port, replied, telegram_settings
from tests.fakes.echo_handler import TestHandler
from tests.fakes.telegram import Chat, FakeTelegramServer, scope_key

# --------------------------------------------------------------------------- private chats


async def test_private_message_gets_a_reply_sent_then_edited_to_the_exact_text(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        sent = server.user_sends(PRIVATE_ALICE, ALICE, "hello there, my friend")
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["Echo: hello there, my friend"])

    calls = server.calls_to("sendMessage", "editMessageText")
    assert calls[0].method == "sendMessage"
    assert [c.method for c in calls[1:]] == ["editMessageText"] * (len(calls) - 1) and len(calls) >= 2
    (reply,) = server.bot_messages(ALICE.id)
    assert all(c.params["message_id"] == reply.message_id for c in calls[1:])
    assert reply.reply_to is None  # private chats: no quoting
    assert reply.parse_mode is None  # plain text, always
    assert "parse_mode" not in calls[0].params
    (event,) = handler.events
    assert event == IncomingMessage(
        platform="telegram",
        chat_id=str(ALICE.id),
        user_id=str(ALICE.id),
        display_name="Alice Liddell",
        message_id=str(sent.message_id),
        text="hello there, my friend",
        is_private=True,
        timestamp=event.timestamp,
    )
    assert event.timestamp.tzinfo is not None


async def test_updates_are_confirmed_so_a_restart_does_not_answer_twice(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        server.user_sends(PRIVATE_ALICE, ALICE, "once")
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["Echo: once"])
    assert server.pending_updates == 0
    async with run_adapter(handler):
        server.user_sends(PRIVATE_ALICE, ALICE, "twice")
        await server.wait_for(lambda: len(handler.finished) == 2)
    assert handler.texts() == ["once", "twice"]


async def test_only_new_messages_are_requested_from_telegram(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    async with run_adapter(EchoHandler()):
        await server.wait_for(lambda: bool(server.calls_to("getUpdates")))
    assert all(c.params["allowed_updates"] == ["message"] for c in server.calls_to("getUpdates"))


async def test_empty_text_is_forwarded_to_the_core(server: FakeTelegramServer, run_adapter: RunAdapter) -> None:
    handler = EchoHandler(reply_for=lambda text: f"got {text!r}")
    async with run_adapter(handler):
        server.user_sends(PRIVATE_ALICE, ALICE, "   ")
        await server.wait_for(lambda: replied(server, PRIVATE_ALICE))
    assert handler.texts() == ["   "]


# --------------------------------------------------------------------------- groups


@pytest.mark.parametrize("chat", [GROUP, SUPERGROUP], ids=["group", "supergroup"])
async def test_group_message_without_mention_gets_no_reply(
    server: FakeTelegramServer, run_adapter: RunAdapter, chat: Chat
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        ignored = server.user_sends(chat, ALICE, "hello everyone, @bob look at this")
        server.user_sends(chat, BOB, "@LlmTestBot are you there?")  # processed after the first
        await server.wait_for(lambda: replied(server, chat))
    assert handler.texts() == ["are you there?"]
    assert all(m.reply_to != ignored.message_id for m in server.bot_messages(chat.id))


async def test_group_mention_is_answered_quoting_the_user_with_the_mention_stripped(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        asked = server.user_sends(SUPERGROUP, ALICE, "hey @llmtestbot, what is 2+2?")
        await server.wait_for(lambda: server.bot_texts(SUPERGROUP.id) == ["Echo: hey, what is 2+2?"])
    (event,) = handler.events
    assert event.text == "hey, what is 2+2?" and not event.is_private
    assert (event.chat_id, event.user_id) == (str(SUPERGROUP.id), str(ALICE.id))
    (reply,) = server.bot_messages(SUPERGROUP.id)
    assert reply.reply_to == asked.message_id
    params = server.calls_to("sendMessage")[0].params
    assert params["reply_parameters"] == {"message_id": asked.message_id, "allow_sending_without_reply": True}


async def test_group_reply_to_the_bot_is_answered(server: FakeTelegramServer, run_adapter: RunAdapter) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        server.user_sends(GROUP, ALICE, "@LlmTestBot tell me a joke")
        await server.wait_for(lambda: server.bot_texts(GROUP.id) == ["Echo: tell me a joke"])
        bot_message = server.bot_messages(GROUP.id)[0]
        server.user_sends(GROUP, BOB, "and another one", reply_to=bot_message.message_id)
        await server.wait_for(lambda: replied(server, GROUP, 2))
        # A reply to someone else is not for the bot.
        alice_message = server.messages(GROUP.id)[0]
        server.user_sends(GROUP, CAROL, "haha", reply_to=alice_message.message_id)
        server.user_sends(GROUP, CAROL, "@LlmTestBot sync")
        await server.wait_for(lambda: replied(server, GROUP, 3))
    assert handler.texts() == ["tell me a joke", "and another one", "sync"]
    assert server.bot_texts(GROUP.id)[1] == "Echo: and another one"


async def test_commands_for_this_bot_are_handled_and_for_another_bot_ignored(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        server.user_sends(GROUP, ALICE, "/help@OtherBot")
        server.user_sends(GROUP, ALICE, "/config@LlmTestBot set temperature 0.5")
        server.user_sends(GROUP, BOB, "/reset")
        await server.wait_for(lambda: replied(server, GROUP, 2))
        server.user_sends(PRIVATE_ALICE, ALICE, "/stats@OtherBot")
        server.user_sends(PRIVATE_ALICE, ALICE, "/stats@LLMTESTBOT")
        await server.wait_for(lambda: replied(server, PRIVATE_ALICE))
    assert sorted(handler.texts()) == ["/config set temperature 0.5", "/reset", "/stats"]


# --------------------------------------------------------------------------- start-up


def test_menu_keeps_valid_names_and_gives_admin_commands_to_admins_only() -> None:
    everyone, admins = menu_commands(
        [
            CommandInfo("help", "List the commands", admin_only=False),
            CommandInfo("stats", "Usage statistics", admin_only=True),
            CommandInfo("Bad-Name", "invalid for Telegram", admin_only=False),
            CommandInfo("x" * 33, "too long a name", admin_only=False),
            CommandInfo("blank", "   ", admin_only=False),
        ]
    )
    assert [(c.command, c.description) for c in everyone] == [("help", "List the commands"), ("blank", "blank")]
    assert [c.command for c in admins] == ["help", "stats", "blank"]


async def test_command_menu_is_registered_at_start_up(server: FakeTelegramServer, run_adapter: RunAdapter) -> None:
    commands = [
        *COMMANDS,
        CommandInfo("Bad-Name", "not a Telegram command name", admin_only=False),
        CommandInfo("long", "x" * 300, admin_only=False),
    ]
    async with run_adapter(EchoHandler(), commands=commands, admin_ids=f"telegram:{ALICE.id},discord:42"):
        pass
    public = [c.name for c in COMMANDS if not c.admin_only]
    every = [c.name for c in COMMANDS]
    default = server.commands[scope_key({"type": "default"})]
    assert [c["command"] for c in default] == [*public, "long"]
    assert default[0]["description"] == COMMANDS[0].description
    assert len(default[-1]["description"]) == 256
    admins = server.commands[scope_key({"type": "all_chat_administrators"})]
    assert [c["command"] for c in admins] == [*every, "long"]
    alice = server.commands[scope_key({"type": "chat", "chat_id": ALICE.id})]
    assert [c["command"] for c in alice] == [*every, "long"]


async def test_a_menu_telegram_refuses_does_not_stop_the_bot(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    server.fail_next("setMyCommands", status=400, description="Bad Request: chat not found", times=5)
    handler = EchoHandler()
    async with run_adapter(handler):
        server.user_sends(PRIVATE_ALICE, ALICE, "still here?")
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["Echo: still here?"])


async def test_a_rejected_token_is_a_config_error_that_does_not_show_the_token(
    server: FakeTelegramServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = telegram_settings(server, telegram_token="999:WRONG-secret-token")
    adapter = TelegramAdapter(settings, COMMANDS, retry=FAST_RETRY)
    with pytest.raises(ConfigError) as caught:
        await asyncio.wait_for(adapter.run(EchoHandler()), timeout=10)
    assert caught.value.setting == "TELEGRAM_TOKEN"
    assert "WRONG-secret" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not any("WRONG-secret" in r.getMessage() for r in caplog.records)


async def test_a_token_revoked_while_running_stops_the_adapter_with_a_config_error(
    server: FakeTelegramServer, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = TelegramAdapter(telegram_settings(server), COMMANDS, retry=FAST_RETRY, poll_timeout=1.0)
    task = asyncio.create_task(adapter.run(EchoHandler()))
    await asyncio.wait_for(adapter.started.wait(), timeout=10)
    old_token = server.token
    server.token = "123456789:a-new-token-from-botfather"  # the old one is revoked

    with pytest.raises(ConfigError) as caught:
        await asyncio.wait_for(task, timeout=10)
    assert caught.value.setting == "TELEGRAM_TOKEN"
    assert "no longer accepts the token" in str(caught.value)
    assert old_token not in caplog.text


async def test_an_unreachable_api_is_a_config_error_after_retries() -> None:
    port = free_port()
    async with FakeTelegramServer() as server:
        settings = telegram_settings(server, telegram_api_base=f"http://127.0.0.1:{port}")
    adapter = TelegramAdapter(settings, COMMANDS, retry=FAST_RETRY)
    with pytest.raises(ConfigError) as caught:
        await asyncio.wait_for(adapter.run(EchoHandler()), timeout=10)
    assert caught.value.setting == "TELEGRAM_API_BASE"


async def test_the_token_never_reaches_the_logs(
    server: FakeTelegramServer, run_adapter: RunAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with run_adapter(EchoHandler()):
        server.user_sends(PRIVATE_ALICE, ALICE, "hi")
        await server.wait_for(lambda: replied(server, PRIVATE_ALICE))
    messages = [r.getMessage() for r in caplog.records]
    # PTB logs its API URL at DEBUG: it is there, without the token.
    assert f"Set Bot API URL: {server.api_base}/bot<TELEGRAM_TOKEN>" in messages
    assert not [m for m in messages if server.token in m]


# --------------------------------------------------------------------------- other messages


async def test_media_in_a_private_chat_gets_the_text_only_notice(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        server.user_sends_media(PRIVATE_ALICE, ALICE, "photo")
        server.user_sends_media(PRIVATE_BOB, BOB, "voice")
        server.user_sends_media(PRIVATE_BOB, BOB, "document", caption="my notes")
        await server.wait_for(lambda: replied(server, PRIVATE_ALICE) and replied(server, PRIVATE_BOB, 2))
    assert server.bot_texts(ALICE.id) == [NON_TEXT_REPLY]
    assert server.bot_texts(BOB.id) == [NON_TEXT_REPLY, NON_TEXT_REPLY]
    assert handler.events == []


async def test_media_in_groups_edits_and_channel_posts_are_ignored(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        server.user_sends_media(GROUP, ALICE, "sticker")
        server.user_sends_media(GROUP, ALICE, "photo", caption="@LlmTestBot look")
        first = server.user_sends(PRIVATE_BOB, BOB, "first version")
        await server.wait_for(lambda: server.bot_texts(BOB.id) == ["Echo: first version"])
        server.user_edits(first, BOB, "second version")
        server.channel_post(Chat.channel(-1_000_000_000_777), "@LlmTestBot news")
        server.user_sends(GROUP, CAROL, "@LlmTestBot barrier")  # handled after the others
        await server.wait_for(lambda: replied(server, GROUP))
    assert handler.texts() == ["first version", "barrier"]
    assert server.bot_texts(BOB.id) == ["Echo: first version"]
    assert server.bot_texts(GROUP.id) == ["Echo: barrier"]


async def test_a_handler_that_crashes_is_logged_and_the_adapter_keeps_serving(
    server: FakeTelegramServer, run_adapter: RunAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    echo = EchoHandler()

    class Fragile(TestHandler):
        async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
            if event.text == "boom":
                raise RuntimeError("handler bug")
            await echo.handle(event, target)

    async with run_adapter(Fragile()):
        server.user_sends(PRIVATE_ALICE, ALICE, "boom")
        server.user_sends(PRIVATE_ALICE, ALICE, "still fine?")
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["Echo: still fine?"])
    crashes = [r for r in caplog.records if r.exc_info and "handler bug" in str(r.exc_info[1])]
    assert len(crashes) == 1 and crashes[0].levelno == logging.ERROR


# --------------------------------------------------------------------------- concurrency


async def test_a_slow_reply_does_not_delay_other_chats(server: FakeTelegramServer, run_adapter: RunAdapter) -> None:
    handler = EchoHandler()
    handler.gates["slow question"] = asyncio.Event()
    async with run_adapter(handler):
        server.user_sends(PRIVATE_ALICE, ALICE, "slow question")
        server.user_sends(PRIVATE_BOB, BOB, "quick one")
        await server.wait_for(lambda: server.bot_texts(BOB.id) == ["Echo: quick one"])
        assert server.bot_texts(ALICE.id) == []  # still thinking
        handler.gates["slow question"].set()
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["Echo: slow question"])


async def test_shutdown_cancels_replies_that_outlive_the_grace_period(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    handler.gates["never answered"] = asyncio.Event()
    started = time.monotonic()
    async with run_adapter(handler):
        server.user_sends(PRIVATE_ALICE, ALICE, "never answered")
        await server.wait_for(lambda: bool(handler.events))
    assert time.monotonic() - started < 5  # the 1 s grace, not forever
    assert handler.finished == []


# --------------------------------------------------------------------------- webhook


async def test_webhook_mode_receives_updates_and_checks_the_secret(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/telegram/hook"
    handler = EchoHandler()
    async with run_adapter(
        handler,
        telegram_webhook_url=url,
        telegram_webhook_listen="127.0.0.1",
        telegram_webhook_port=port,
        telegram_webhook_secret="s3cret-Value",
    ):
        assert server.webhook is not None
        assert (server.webhook["url"], server.webhook["secret_token"]) == (url, "s3cret-Value")
        assert server.webhook["allowed_updates"] == ["message"]
        server.user_sends(PRIVATE_ALICE, ALICE, "via webhook")
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["Echo: via webhook"])
        async with aiohttp.ClientSession() as client:
            forged = {
                "update_id": 1,
                "message": {
                    "message_id": 99,
                    "date": 0,
                    "chat": PRIVATE_ALICE.to_json(),
                    "from": ALICE.to_json(),
                    "text": "forged",
                },
            }
            async with client.post(url, json=forged, headers={"X-Telegram-Bot-Api-Secret-Token": "wrong"}) as resp:
                assert resp.status == 403
    assert not server.calls_to("getUpdates")
    assert [status for _, status in server.webhook_deliveries] == [200]
    assert handler.texts() == ["via webhook"]


async def test_webhook_without_a_configured_secret_still_uses_one(
    server: FakeTelegramServer, run_adapter: RunAdapter
) -> None:
    port = free_port()
    async with run_adapter(
        EchoHandler(),
        telegram_webhook_url=f"http://127.0.0.1:{port}/hook",
        telegram_webhook_listen="127.0.0.1",
        telegram_webhook_port=port,
    ):
        assert server.webhook is not None
        assert len(str(server.webhook["secret_token"])) >= 32
