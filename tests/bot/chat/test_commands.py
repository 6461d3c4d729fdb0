"""The command and permission matrix, through the real manager and repository."""

from __future__ import annotations

import pytest

from bot.chat.commands import COMMANDS, parse_command
from bot.events import ConversationKey, IncomingMessage
from tests.conftest import Harness
from tests.fakes.events import incoming
from tests.fakes.targets import RecordingTarget


def msg(text: str, *, user: str = "u1", chat: str = "g1", private: bool = False) -> IncomingMessage:
    return incoming(text, user=user, chat=chat, private=private)


async def run(harness: Harness, text: str, *, user: str = "u1", chat_admin: bool = False, private: bool = False) -> str:
    async with harness.manager() as manager:
        target = RecordingTarget(chat_admin=chat_admin)
        await manager.handle(msg(text, user=user, private=private), target)
        return target.text


async def seed(harness: Harness, *users: str, chat: str = "g1") -> None:
    for user in users:
        await harness.repo.add_message(ConversationKey("telegram", chat, user), "user", f"hi from {user}", 3)


def test_commands_parse_with_and_without_bot_suffix() -> None:
    assert parse_command("/reset") is not None
    cmd = parse_command("/Config@MyBot set temperature 0.5")
    assert cmd is not None and cmd.name == "config" and cmd.args == ("set", "temperature", "0.5")
    assert parse_command("hello /reset") is None
    assert parse_command("//not a command") is None
    assert parse_command("/") is None


def test_every_command_has_a_menu_entry_fit_for_telegram() -> None:
    for command in COMMANDS:
        assert command.name.isascii() and command.name.islower() and 1 <= len(command.name) <= 32
        assert 1 <= len(command.description) <= 256


async def test_help_and_start_list_the_commands(harness: Harness) -> None:
    for text in ("/help", "/start"):
        reply = await run(harness, text)
        assert all(f"/{c.name}" in reply for c in COMMANDS)


async def test_unknown_command_names_the_known_ones(harness: Harness) -> None:
    reply = await run(harness, "/frobnicate now")
    assert "Unknown command /frobnicate" in reply and "/help" in reply
    assert harness.engine.added == []


async def test_reset_clears_only_the_senders_conversation(harness: Harness) -> None:
    await seed(harness, "u1", "u2")
    reply = await run(harness, "/reset", user="u1")
    assert "forgot" in reply
    assert await harness.repo.recent_messages(ConversationKey("telegram", "g1", "u1"), 5) == []
    assert len(await harness.repo.recent_messages(ConversationKey("telegram", "g1", "u2"), 5)) == 1


@pytest.mark.parametrize(
    "text",
    ["/reset u2", "/reset chat", "/config set temperature 0.1", "/config reset", "/stats"],
)
async def test_non_admins_are_refused_admin_commands_and_nothing_changes(harness: Harness, text: str) -> None:
    await seed(harness, "u1", "u2")
    key = ConversationKey("telegram", "g1", "u1")
    await harness.repo.set_setting(key, "temperature", 0.3)
    reply = await run(harness, text, user="u1")
    assert "Only admins" in reply
    assert len(await harness.repo.recent_messages(ConversationKey("telegram", "g1", "u2"), 5)) == 1
    assert len(await harness.repo.recent_messages(key, 5)) == 1
    assert await harness.repo.get_settings(key) == {"temperature": 0.3}


async def test_bot_admin_resets_another_user_and_the_whole_chat(harness: Harness) -> None:
    await seed(harness, "u1", "u2", "u3")
    await seed(harness, "u1", chat="other")
    assert "user u2" in await run(harness, "/reset u2", user="admin")
    assert await harness.repo.recent_messages(ConversationKey("telegram", "g1", "u2"), 5) == []
    assert len(await harness.repo.recent_messages(ConversationKey("telegram", "g1", "u1"), 5)) == 1
    assert "every conversation" in await run(harness, "/reset chat", user="admin")
    for user in ("u1", "u3"):
        assert await harness.repo.recent_messages(ConversationKey("telegram", "g1", user), 5) == []
    assert len(await harness.repo.recent_messages(ConversationKey("telegram", "other", "u1"), 5)) == 1


async def test_chat_admins_may_run_chat_commands_but_not_bot_wide_ones(harness: Harness) -> None:
    await seed(harness, "u2")
    assert "every conversation" in await run(harness, "/reset chat", user="mod", chat_admin=True)
    assert "Only admins" in await run(harness, "/stats", user="mod", chat_admin=True)


async def test_chat_admin_status_does_not_apply_in_private_chats(harness: Harness) -> None:
    reply = await run(harness, "/config set temperature 0.2", user="u1", chat_admin=True, private=True)
    assert "Only admins" in reply


async def test_config_set_validates_key_and_value_and_stores_per_session(harness: Harness) -> None:
    key = ConversationKey("telegram", "g1", "admin")
    bad_key = await run(harness, "/config set colour blue", user="admin")
    assert "Unknown setting 'colour'" in bad_key and "temperature" in bad_key and "system_prompt" in bad_key
    bad_value = await run(harness, "/config set temperature 7", user="admin")
    assert "from 0.0 to 2.0" in bad_value
    assert "Usage" in await run(harness, "/config set temperature", user="admin")
    assert await harness.repo.get_settings(key) == {}
    ok = await run(harness, "/config set system_prompt You are a pirate.  Arr!", user="admin")
    assert "system_prompt" in ok
    assert await harness.repo.get_settings(key) == {"system_prompt": "You are a pirate.  Arr!"}
    shown = await run(harness, "/config", user="admin")
    assert "system_prompt = 'You are a pirate.  Arr!' (set for this session)" in shown
    assert "temperature = 0.0" in shown


async def test_session_settings_reach_the_model(harness: Harness) -> None:
    await run(harness, "/config set system_prompt Talk like a pirate.", user="admin")
    await run(harness, "ahoy", user="admin")
    assert "Talk like a pirate." in harness.engine.added[-1]
    assert "You are a test bot." not in harness.engine.added[-1]
    await run(harness, "/config reset", user="admin")
    await run(harness, "ahoy again", user="admin")
    assert "You are a test bot." in harness.engine.added[-1]


async def test_max_new_tokens_setting_bounds_the_reply(harness: Harness) -> None:
    harness.engine.reply = lambda _text: "abcdefghijklmnopqrstuvwxyz"
    await run(harness, "/config set max_new_tokens 5", user="admin")
    reply = await run(harness, "go", user="admin")
    assert reply == "abcde"


async def test_stats_reports_usage_for_admins(harness: Harness) -> None:
    await run(harness, "hello", user="u1")
    await run(harness, "hello", user="u2")
    reply = await run(harness, "/stats", user="admin")
    # The admin is a user too: a command is accepted (and stored) as a turn of their conversation.
    assert "Users: 3" in reply and "Messages: 4" in reply
    assert "Tokens generated:" in reply and "tokens/s" in reply


async def test_console_user_is_an_admin(harness: Harness) -> None:
    async with harness.manager() as manager:
        target = RecordingTarget()
        await manager.handle(incoming("/stats", platform="console", user="local", chat="local"), target)
    assert "Users:" in target.text
