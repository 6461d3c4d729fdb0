"""Settings: parsing, validation with one clear message, and .env.example coverage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.chat.session import SESSION_SETTINGS
from bot.config import Settings, load_settings
from bot.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests must not read the developer's .env or environment."""
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def test_every_setting_is_documented_in_env_example_with_a_comment() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    for name in Settings.model_fields:
        var = name.upper()
        index = next((i for i, line in enumerate(lines) if line.startswith(f"{var}=")), None)
        assert index is not None, f"{var} missing from .env.example"
        above = [line for line in lines[max(0, index - 3) : index] if line.startswith("#")]
        assert above, f"{var} has no comment above it"


def test_env_example_as_a_dotenv_loads_cleanly(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    settings = load_settings()
    assert settings.telegram_token is None and settings.discord_token is None
    assert settings.database_url == "sqlite+aiosqlite:///data/bot.db"


def test_admin_ids_are_parsed_from_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADMIN_IDS", " telegram:123, Discord:456 ,")
    settings = load_settings()
    assert settings.admin_ids == frozenset({"telegram:123", "discord:456"})
    assert settings.is_admin("telegram:123")
    assert not settings.is_admin("telegram:456")
    assert settings.is_admin("console:local")


def test_discord_shard_ids_are_this_process_s_share_of_the_shard_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_SHARD_COUNT", "4")
    monkeypatch.setenv("DISCORD_SHARD_IDS", " 3,1 ,")
    assert load_settings().discord_shard_ids == (1, 3)
    monkeypatch.setenv("DISCORD_SHARD_IDS", "")
    assert load_settings().discord_shard_ids is None  # every shard


@pytest.mark.parametrize(("count", "ids"), [("4", "4"), ("4", "-1"), ("4", "zero"), (None, "0,1"), ("2", ",")], ids=str)
def test_bad_discord_shard_ids_stop_with_one_line(monkeypatch: pytest.MonkeyPatch, count: str | None, ids: str) -> None:
    if count is not None:
        monkeypatch.setenv("DISCORD_SHARD_COUNT", count)
    monkeypatch.setenv("DISCORD_SHARD_IDS", ids)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.setting == "DISCORD_SHARD_IDS"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("ADMIN_IDS", "123"),
        ("ADMIN_IDS", "slack:1"),
        ("TEMPERATURE", "9"),
        ("MAX_NEW_TOKENS", "lots"),
        ("DATABASE_URL", "not a url"),
        ("TELEGRAM_API_BASE", "ftp://x"),
        ("MODEL_DTYPE", "float8"),
        ("MAX_BATCH_SIZE", "0"),
        ("QUEUE_SIZE", "0"),
        ("MODEL_CONTEXT_TOKENS", "1"),
    ],
)
def test_bad_settings_stop_with_one_error_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.setting == var
    assert "\n" not in str(info.value)


def test_tokens_are_secret_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_TOKEN", "123:supersecret")
    settings = load_settings()
    assert "supersecret" not in repr(settings) and "supersecret" not in str(settings)
    assert settings.telegram_token is not None
    assert settings.telegram_token.get_secret_value() == "123:supersecret"


@pytest.mark.parametrize(
    ("key", "raw", "ok"),
    [
        ("temperature", "0.5", 0.5),
        ("temperature", "2.5", None),
        ("temperature", "nan", None),
        ("top_p", "0", None),
        ("max_new_tokens", "64", 64),
        ("max_new_tokens", "1.5", None),
        ("max_new_tokens", "0", None),
        ("history_turns", "0", 0),
        ("system_prompt", "You are a pirate.", "You are a pirate."),
        ("system_prompt", "   ", None),
        ("system_prompt", "x" * 2001, None),
    ],
)
def test_session_setting_values_are_validated_with_ranges(key: str, raw: str, ok: object) -> None:
    spec = SESSION_SETTINGS[key]
    if ok is None:
        with pytest.raises(ValueError, match=re.escape(key)):
            spec.parse(raw)
    else:
        assert spec.parse(raw) == ok
