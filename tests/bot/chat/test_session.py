"""Session settings: typed values, stored overrides on top of the defaults, the cache."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from bot.chat.session import CHAT_SETTINGS, SESSION_SETTINGS, SessionSettings, SessionStore
from bot.events import ConversationKey
from tests.conftest import Harness

DEFAULTS = SessionSettings(system_prompt="Be nice.", temperature=0.0, top_p=0.9, max_new_tokens=256, history_turns=20)
KEY = ConversationKey("telegram", "c1", "u1")


def test_the_fields_are_exactly_the_config_keys() -> None:
    assert [name for name, _ in DEFAULTS.items()] == list(SESSION_SETTINGS)


def test_overrides_replace_defaults_with_typed_values() -> None:
    merged = DEFAULTS.with_overrides({"temperature": "0.5", "max_new_tokens": 12, "system_prompt": "Arr."})
    assert merged == SessionSettings("Arr.", 0.5, 0.9, 12, 20)
    assert isinstance(merged.max_new_tokens, int) and isinstance(merged.temperature, float)


def test_unknown_keys_and_bad_stored_values_are_skipped_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bot.chat.session"):
        merged = DEFAULTS.with_overrides({"colour": "blue", "top_p": 7, "history_turns": "many"})
    assert merged == DEFAULTS
    assert "top_p" in caplog.text and "history_turns" in caplog.text and "colour" not in caplog.text


async def test_set_and_clear_are_stored_and_seen_at_once(harness: Harness) -> None:
    store = SessionStore(DEFAULTS, harness.repo)
    assert await store.effective(KEY) == DEFAULTS
    await store.set(KEY, "temperature", 1.5)
    assert (await store.effective(KEY)).temperature == 1.5
    assert await harness.repo.get_settings(KEY) == {"temperature": 1.5}
    await store.clear(KEY)
    assert await store.effective(KEY) == DEFAULTS
    assert await harness.repo.get_settings(KEY) == {}


async def test_overrides_are_read_once_per_session_and_the_cache_is_bounded(harness: Harness) -> None:
    await harness.repo.set_setting(KEY, "history_turns", 3)
    store = SessionStore(DEFAULTS, harness.repo, cache_size=1)
    assert (await store.effective(KEY)).history_turns == 3
    # Written behind the store's back: the cached value is still served...
    await harness.repo.set_setting(KEY, "history_turns", 4)
    assert (await store.effective(KEY)).history_turns == 3
    # ...until another session pushes it out of the one-entry cache.
    await store.effective(ConversationKey("telegram", "c1", "u2"))
    assert (await store.effective(KEY)).history_turns == 4


async def test_a_turn_runs_with_defaults_under_the_chat_under_the_session(harness: Harness) -> None:
    store = SessionStore(DEFAULTS, harness.repo)
    await store.set_chat("telegram", "c1", "system_prompt", "Chat rules.")
    await store.set_chat("telegram", "c1", "temperature", 0.7)
    await store.set(KEY, "temperature", 1.1)
    assert await store.effective(KEY) == dataclasses.replace(DEFAULTS, system_prompt="Chat rules.", temperature=1.1)
    neighbour = ConversationKey("telegram", "c1", "u2")
    assert await store.effective(neighbour) == dataclasses.replace(
        DEFAULTS, system_prompt="Chat rules.", temperature=0.7
    )
    assert await store.effective(ConversationKey("telegram", "c2", "u1")) == DEFAULTS  # a session is per chat
    assert await store.effective(ConversationKey("discord", "c1", "u2")) == DEFAULTS
    await store.clear_chat("telegram", "c1")
    assert await store.effective(neighbour) == DEFAULTS


async def test_the_chat_switch_is_cached_and_seen_at_once_after_a_change(harness: Harness) -> None:
    store = SessionStore(DEFAULTS, harness.repo)
    assert await store.chat_enabled("telegram", "c1") is True
    await store.set_chat("telegram", "c1", "enabled", CHAT_SETTINGS["enabled"].parse("off"))
    assert await store.chat_enabled("telegram", "c1") is False
    assert await harness.repo.get_chat_settings("telegram", "c1") == {"enabled": 0}
    # Written behind the store's back: the cached value is served (no read per message)...
    await harness.repo.set_chat_setting("telegram", "c1", "enabled", 1)
    assert await store.chat_enabled("telegram", "c1") is False
    # ...and a store that does not cache (a shared database) sees it at once.
    assert await SessionStore(DEFAULTS, harness.repo, cache=False).chat_enabled("telegram", "c1") is True


async def test_a_bad_stored_switch_leaves_the_bot_on_with_a_log_line(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await harness.repo.set_chat_setting("telegram", "c1", "enabled", "perhaps")
    with caplog.at_level(logging.WARNING, logger="bot.chat.session"):
        assert await SessionStore(DEFAULTS, harness.repo).chat_enabled("telegram", "c1") is True
    assert "enabled='perhaps'" in caplog.text


@pytest.mark.parametrize(("raw", "value"), [("true", 1), ("On", 1), ("yes", 1), ("1", 1), ("false", 0), ("OFF", 0)])
def test_the_chat_switch_takes_the_usual_words(raw: str, value: int) -> None:
    assert CHAT_SETTINGS["enabled"].parse(raw) == value


def test_the_chat_switch_refuses_other_words_and_is_a_chat_only_key() -> None:
    with pytest.raises(ValueError, match="true or false"):
        CHAT_SETTINGS["enabled"].parse("maybe")
    assert "enabled" not in SESSION_SETTINGS
    assert set(CHAT_SETTINGS) == {*SESSION_SETTINGS, "enabled"}
