"""Settings: one typed class read from the environment and `.env`.

The session defaults here are checked by the same `SESSION_SETTINGS` specs that check
the values users type with `/config set`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.chat.policy import Rate, parse_entries, parse_rate
from bot.chat.session import SESSION_SETTINGS, SessionSettings
from bot.errors import ConfigError
from bot.ports import SettingValue

ADMIN_PLATFORMS = ("telegram", "discord", "console")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-chat-bot"


class Settings(BaseSettings):
    """Every setting of the bot. Field names are the upper-case environment variables."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        case_sensitive=False,
    )

    # Platforms
    telegram_token: SecretStr | None = None
    telegram_api_base: str = "https://api.telegram.org"
    telegram_webhook_url: str | None = None
    telegram_webhook_listen: str = "0.0.0.0"
    telegram_webhook_port: int = Field(8443, ge=1, le=65535)
    telegram_webhook_secret: SecretStr | None = None
    telegram_edit_interval: float = Field(1.0, ge=0.0, le=60.0)

    discord_token: SecretStr | None = None
    discord_api_base: str = "https://discord.com/api/v10"
    discord_gateway_url: str = "wss://gateway.discord.gg/"
    discord_edit_interval: float = Field(1.2, ge=0.0, le=60.0)
    discord_shard_count: int | None = Field(None, ge=1)
    # The shards this process runs ("0,1"): several processes split DISCORD_SHARD_COUNT.
    discord_shard_ids: Annotated[tuple[int, ...] | None, NoDecode] = None
    discord_attachment_max_bytes: int = Field(4000, ge=0)

    admin_ids: Annotated[frozenset[str], NoDecode] = frozenset()

    # Public controls (bot/chat/policy.py): who may talk to the bot, and how much
    rate_limit: Annotated[Rate | None, NoDecode] = None  # per user, over every chat: "10/minute"
    chat_rate_limit: Annotated[Rate | None, NoDecode] = None  # per chat
    daily_token_quota: int | None = Field(None, ge=1)  # generated tokens per user per UTC day
    allowed_ids: Annotated[frozenset[str], NoDecode] = frozenset()  # empty: everybody
    blocked_ids: Annotated[frozenset[str], NoDecode] = frozenset()

    # Storage
    database_url: str = "sqlite+aiosqlite:///data/bot.db"

    # Model
    model: str | None = None
    model_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    model_device: str = "cpu"
    model_cache_dir: Path = Field(default_factory=default_cache_dir)
    model_context_tokens: int = Field(2048, ge=64, le=1_000_000)
    model_allow_download: bool = False
    # The compiled decode step for Llama-family models (bot/model/hf/fast_step.py).
    # float16 weights by default: for the default 4-bit model their rounding is ~430x
    # smaller than the quantization's own, and they are what reaches 3.5x (README).
    model_compile: Literal["auto", "off"] = "auto"
    model_weight_dtype: Literal["float32", "float16"] = "float16"
    max_batch_size: int = Field(16, ge=1, le=256)
    queue_size: int = Field(64, ge=1, le=10_000)
    # Accepted messages not answered yet (waiting or being answered) in this process; more
    # are refused as busy, and not stored. 2000: a burst of 200 users x 5 messages fits twice.
    max_pending_messages: int = Field(2000, ge=1, le=1_000_000)
    # Seconds: a message accepted before a restart and older than this when the bot is back
    # is not answered; its sender is told it was missed.
    recover_max_age: float = Field(600.0, ge=0.0, le=30 * 86400.0)

    # Model server (MODEL_BACKEND=openai): any OpenAI-compatible chat completions API
    model_backend: Literal["local", "openai"] = "local"
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_api_key: SecretStr | None = None
    openai_model: str | None = None  # None: the first id /v1/models lists
    openai_timeout: float = Field(60.0, gt=0.0, le=3600.0)
    openai_max_concurrency: int = Field(16, ge=1, le=10_000)
    openai_max_retries: int = Field(3, ge=0, le=20)
    openai_tokenizer: Path | None = None

    # Session defaults (each can be overridden per session with /config set)
    system_prompt: str = "You are a helpful assistant."
    temperature: float = 0.0  # greedy: the small default model answers best so
    top_p: float = 0.9
    max_new_tokens: int = 256
    history_turns: int = 20

    # Input and behaviour
    max_input_chars: int = Field(4000, ge=1, le=100_000)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Health and metrics (bot/health.py): /healthz, /readyz, /metrics; off unless a port is set
    metrics_port: int | None = Field(None, ge=0, le=65535)  # 0: any free port (logged)
    metrics_host: str = "127.0.0.1"

    @field_validator("admin_ids", mode="before")
    @classmethod
    def _parse_admin_ids(cls, raw: object) -> frozenset[str]:
        if raw is None or raw == "":
            return frozenset()
        items = raw.split(",") if isinstance(raw, str) else list(raw)  # type: ignore[call-overload]
        out: set[str] = set()
        for item in items:
            entry = str(item).strip()
            if not entry:
                continue
            platform, sep, user = entry.partition(":")
            if not sep or platform.strip().lower() not in ADMIN_PLATFORMS or not user.strip():
                raise ValueError(f"entry {entry!r} is not like telegram:123 or discord:456")
            out.add(f"{platform.strip().lower()}:{user.strip()}")
        return frozenset(out)

    @field_validator("rate_limit", "chat_rate_limit", mode="before")
    @classmethod
    def _parse_rate(cls, raw: object) -> Rate | None:
        if isinstance(raw, Rate):
            return raw
        return None if raw is None or raw == "" else parse_rate(str(raw))

    @field_validator("allowed_ids", "blocked_ids", mode="before")
    @classmethod
    def _parse_entries(cls, raw: object) -> frozenset[str]:
        return parse_entries(raw)

    @field_validator("discord_shard_ids", mode="before")
    @classmethod
    def _parse_shard_ids(cls, raw: object, info: ValidationInfo) -> tuple[int, ...] | None:
        if raw is None or raw == "":
            return None
        items = raw.split(",") if isinstance(raw, str) else list(raw)  # type: ignore[call-overload]
        try:
            ids = tuple(sorted({int(str(item).strip()) for item in items if str(item).strip()}))
        except ValueError:
            raise ValueError("must be shard numbers separated by commas, e.g. 0,1") from None
        count = info.data.get("discord_shard_count")
        if count is None:
            raise ValueError("needs DISCORD_SHARD_COUNT (the total over every process)")
        if not ids or ids[0] < 0 or ids[-1] >= count:
            raise ValueError(f"each shard must be between 0 and DISCORD_SHARD_COUNT-1 ({count - 1})")
        return ids

    @field_validator("system_prompt", "temperature", "top_p", "max_new_tokens", "history_turns")
    @classmethod
    def _check_session_default(cls, value: SettingValue, info: object) -> SettingValue:
        name = getattr(info, "field_name", "")
        SESSION_SETTINGS[name].parse(str(value))
        return value

    @field_validator("telegram_api_base", "discord_api_base")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("openai_base_url")
    @classmethod
    def _check_openai_base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
        return value.rstrip("/")

    @field_validator("openai_tokenizer")
    @classmethod
    def _check_openai_tokenizer(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        path = value.expanduser()
        if not (path.is_file() or (path / "tokenizer.json").is_file()):
            raise ValueError(f"{value} is neither a tokenizer.json file nor a directory holding one")
        return path

    @field_validator("metrics_host")
    @classmethod
    def _check_metrics_host(cls, value: str) -> str:
        host = value.strip()
        # An IP address (v4 or v6) or a host name: what aiohttp's site can bind.
        if not host or any(not (c.isalnum() or c in ".-:_") for c in host):
            raise ValueError("must be an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
        return host

    @field_validator("database_url")
    @classmethod
    def _check_db(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("must be a SQLAlchemy URL like sqlite+aiosqlite:///data/bot.db")
        return value

    def session_defaults(self) -> SessionSettings:
        """The settings of a session that has stored none of its own."""
        return SessionSettings(
            system_prompt=self.system_prompt,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            history_turns=self.history_turns,
        )

    def is_admin(self, sender: str) -> bool:
        """`sender` as `platform:user_id`. The terminal's local user is always an admin."""
        return sender.startswith("console:") or sender in self.admin_ids


def load_settings(**overrides: object) -> Settings:
    """Read settings, turning validation errors into one `ConfigError` naming the setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]).upper() if err.get("loc") else "settings"
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        raise ConfigError(name, msg) from None
