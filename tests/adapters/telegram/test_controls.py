"""The public controls on Telegram end to end: the fake Bot API server, the real adapter,
the real manager with `Worker(FakeEngine)` and SQLite. Blocks and allow lists for users
and chats, `/block`, the rate limit's one notice, the chat-wide switch, and `/export`
arriving as a document whose text is the stored history."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from bot.events import ConversationKey
from tests.adapters.telegram.chats import ALICE, BOB, CAROL, GROUP, PRIVATE_ALICE, PRIVATE_BOB, SUPERGROUP
from tests.adapters.telegram.conftest import RunAdapter
from tests.conftest import Harness
from tests.fakes.export import as_exported, read_export
from tests.fakes.telegram import Chat, FakeTelegramServer, User


def key(chat: Chat, user: User) -> ConversationKey:
    return ConversationKey("telegram", str(chat.id), str(user.id))


@asynccontextmanager
async def bot(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness, **extra: Any
) -> AsyncIterator[None]:
    """The whole bot on the fake server; ALICE is a bot admin."""
    values: dict[str, Any] = {
        "telegram_token": server.token,
        "telegram_api_base": server.api_base,
        "telegram_edit_interval": 0.0,
        "admin_ids": f"telegram:{ALICE.id}",
        **extra,
    }
    async with harness.manager(**values) as manager, run_adapter(manager, settings=harness.settings(**values)):
        yield


async def ask(
    server: FakeTelegramServer, chat: Chat, user: User, text: str, expect: str | Callable[[str], bool]
) -> str:
    """`user` writes `text` in `chat` and waits until the bot's answer to it (as streamed
    edits leave it) says `expect` (or satisfies it). Returns the answer."""
    sent = server.user_sends(chat, user, text)
    check = expect if callable(expect) else expect.__eq__

    def answer() -> str | None:
        for message in server.bot_messages(chat.id):
            if message.message_id > sent.message_id and (chat.type == "private" or message.reply_to == sent.message_id):
                return message.text or ""
        return None

    def answered() -> bool:
        text = answer()
        return text is not None and check(text)

    await server.wait_for(answered, what=f"the answer to {text!r} to be {expect!r} (it is {answer()!r})")
    return answer() or ""


async def test_blocked_users_and_chats_get_no_answer_and_nothing_is_stored(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with bot(server, run_adapter, harness, blocked_ids=f"telegram:{BOB.id},telegram:chat:{GROUP.id}"):
        server.user_sends(PRIVATE_BOB, BOB, "hello?")
        server.user_sends(GROUP, CAROL, "@LlmTestBot anyone here?")
        server.user_sends(SUPERGROUP, BOB, "@LlmTestBot and here?")  # a blocked user, anywhere
        # Answered after the messages above were turned away.
        await ask(server, SUPERGROUP, CAROL, "@LlmTestBot hi", "Echo: hi")
        await ask(server, PRIVATE_ALICE, ALICE, "hi", "Echo: hi")
    assert server.bot_texts(BOB.id) == [] and server.bot_texts(GROUP.id) == []
    assert server.bot_texts(SUPERGROUP.id) == ["Echo: hi"]
    for chat, user in ((PRIVATE_BOB, BOB), (GROUP, CAROL), (SUPERGROUP, BOB)):
        assert await harness.repo.recent_messages(key(chat, user), 10) == []


async def test_an_allow_list_of_one_group_leaves_everybody_else_unanswered(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with bot(server, run_adapter, harness, allowed_ids=f"telegram:chat:{SUPERGROUP.id},telegram:{CAROL.id}"):
        server.user_sends(PRIVATE_BOB, BOB, "let me in")
        server.user_sends(GROUP, BOB, "@LlmTestBot or here")
        await ask(server, SUPERGROUP, BOB, "@LlmTestBot allowed group", "Echo: allowed group")
        await ask(server, GROUP, CAROL, "@LlmTestBot allowed user", "Echo: allowed user")
        await ask(server, PRIVATE_ALICE, ALICE, "admin", "Echo: admin")
    assert server.bot_texts(BOB.id) == []
    assert server.bot_texts(GROUP.id) == ["Echo: allowed user"]
    assert await harness.repo.recent_messages(key(PRIVATE_BOB, BOB), 10) == []


async def test_an_admin_blocks_and_unblocks_a_user_with_immediate_effect(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with bot(server, run_adapter, harness):
        await ask(server, PRIVATE_BOB, BOB, f"/block {CAROL.id}", "Only admins can do that.")
        await ask(
            server,
            PRIVATE_ALICE,
            ALICE,
            f"/block {BOB.id}",
            f"Blocked telegram:{BOB.id}: I ignore their messages from now on.",
        )
        server.user_sends(PRIVATE_BOB, BOB, "still there?")
        await ask(server, PRIVATE_ALICE, ALICE, f"/unblock {BOB.id}", f"Unblocked telegram:{BOB.id}.")
        await ask(server, PRIVATE_BOB, BOB, "back again", "Echo: back again")
        assert await harness.stored_texts(key(PRIVATE_BOB, BOB), 2) == ["back again", "Echo: back again"]
    assert server.bot_texts(BOB.id) == ["Only admins can do that.", "Echo: back again"]


async def test_over_the_rate_limit_the_user_is_told_once(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with bot(server, run_adapter, harness, rate_limit="2/minute"):
        await ask(server, PRIVATE_BOB, BOB, "one", "Echo: one")
        await ask(server, PRIVATE_BOB, BOB, "two", "Echo: two")
        notice = "You're sending messages too fast: slow down, try again in 30 s."
        await ask(server, PRIVATE_BOB, BOB, "three", notice)
        server.user_sends(PRIVATE_BOB, BOB, "four")
        server.user_sends(PRIVATE_BOB, BOB, "five")
        await ask(server, PRIVATE_ALICE, ALICE, "admins are exempt", "Echo: admins are exempt")
        assert await harness.stored_texts(key(PRIVATE_BOB, BOB), 4) == ["one", "Echo: one", "two", "Echo: two"]
    assert server.bot_texts(BOB.id) == ["Echo: one", "Echo: two", notice]


async def test_a_group_admin_switches_the_bot_off_and_on_in_the_group(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    server.set_member_status(GROUP.id, CAROL.id, "administrator")
    async with bot(server, run_adapter, harness):
        await ask(server, GROUP, BOB, "/config chat set enabled false", "Only admins can do that.")
        off = "I'm switched off in this chat"
        await ask(server, GROUP, CAROL, "/config chat set enabled false", lambda text: text.startswith(off))
        server.user_sends(GROUP, BOB, "@LlmTestBot hello?")
        server.user_sends(GROUP, BOB, "/help")
        await ask(server, GROUP, CAROL, "/config chat", lambda text: "enabled = false" in text)
        await ask(server, SUPERGROUP, BOB, "@LlmTestBot elsewhere", "Echo: elsewhere")
        await ask(server, GROUP, CAROL, "/config set enabled true", "I'm switched on in this chat again.")
        await ask(server, GROUP, BOB, "@LlmTestBot now?", "Echo: now?")
        assert await harness.stored_texts(key(GROUP, BOB), 2) == ["now?", "Echo: now?"]
    replies = [t for t in server.bot_texts(GROUP.id) if t.startswith(("Echo", "Commands"))]
    assert replies == ["Echo: now?"]


async def test_chat_defaults_set_by_a_group_admin_reach_everybodys_prompt(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    server.set_member_status(GROUP.id, CAROL.id, "administrator")
    async with bot(server, run_adapter, harness):
        await ask(
            server,
            GROUP,
            CAROL,
            "/config chat set system_prompt Answer in rhymes.",
            lambda text: text.startswith("system_prompt is now 'Answer in rhymes.' for everybody in this chat"),
        )
        await ask(server, GROUP, BOB, "@LlmTestBot a poem", "Echo: a poem")
    assert "Answer in rhymes." in harness.engine.added[-1]


async def test_export_arrives_as_a_markdown_document_equal_to_the_stored_history(
    server: FakeTelegramServer, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with bot(server, run_adapter, harness):
        await ask(server, PRIVATE_BOB, BOB, "hello model", "Echo: hello model")
        await ask(server, PRIVATE_BOB, BOB, "and **again**", "Echo: and **again**")
        await harness.stored_texts(key(PRIVATE_BOB, BOB), 4)
        server.user_sends(PRIVATE_BOB, BOB, "/export")
        await server.wait_for(lambda: len(server.uploads) == 1, what="the exported file")
    (upload,) = server.uploads
    assert upload.chat_id == BOB.id and upload.filename == f"conversation-telegram-{BOB.id}-{BOB.id}.md"
    assert upload.caption is not None and upload.caption.endswith(": 4 messages.")
    stored = await harness.repo.conversation_messages(key(PRIVATE_BOB, BOB))
    assert [m.content for m in stored] == ["hello model", "Echo: hello model", "and **again**", "Echo: and **again**"]
    assert read_export(upload.data.decode("utf-8")) == as_exported(stored)
