"""Per-session settings: the keys of `/config set`, their typed values, and the cache
of what each session and each chat has stored. A turn runs with the defaults, under the
chat's settings (`/config chat set`, for everybody in it), under the session's own."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from bot.events import ConversationKey, Platform
from bot.ports import Repository, SettingValue

logger = logging.getLogger(__name__)

_CACHE_SIZE: Final = 10_000
# How stale a chat's settings may be when other processes share the store (seconds).
CHAT_TTL_SHARED_S: Final = 2.0
_TRUE: Final = frozenset({"true", "on", "yes", "1"})
_FALSE: Final = frozenset({"false", "off", "no", "0"})


@dataclass(frozen=True, slots=True)
class SessionSettingSpec:
    """A key of `/config set`: its type and allowed range."""

    name: str
    kind: type[bool] | type[int] | type[float] | type[str]
    minimum: float | None
    maximum: float | None
    help: str

    def parse(self, raw: str) -> SettingValue:
        """Parse and range-check a value typed by a user; raises `ValueError` with a
        message fit for the user."""
        raw = raw.strip()
        if self.kind is bool:
            word = raw.lower()
            if word not in _TRUE and word not in _FALSE:
                raise ValueError(f"{self.name} must be {self.describe_range()}")
            return int(word in _TRUE)  # stored as 1 or 0: a SettingValue has no bool
        if self.kind is str:
            if not raw:
                raise ValueError(f"{self.name} cannot be empty")
            if self.maximum is not None and len(raw) > self.maximum:
                raise ValueError(f"{self.name} is limited to {int(self.maximum)} characters")
            return raw
        try:
            number: int | float = int(raw) if self.kind is int else float(raw)
        except ValueError:
            raise ValueError(f"{self.name} must be {self.describe_range()}") from None
        if (
            number != number
            or (self.minimum is not None and number < self.minimum)
            or (self.maximum is not None and number > self.maximum)
        ):
            raise ValueError(f"{self.name} must be {self.describe_range()}")
        return number

    def describe_range(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return f"text of at most {int(self.maximum or 0)} characters"
        noun = "a whole number" if self.kind is int else "a number"
        lo = self.minimum if self.kind is float else int(self.minimum or 0)
        hi = self.maximum if self.kind is float else int(self.maximum or 0)
        return f"{noun} from {lo} to {hi}"


SESSION_SETTINGS: Final[Mapping[str, SessionSettingSpec]] = {
    s.name: s
    for s in (
        SessionSettingSpec("system_prompt", str, None, 2000, "the model's instructions"),
        SessionSettingSpec("temperature", float, 0.0, 2.0, "randomness; 0 is greedy"),
        SessionSettingSpec("top_p", float, 0.05, 1.0, "nucleus sampling cut-off"),
        SessionSettingSpec("max_new_tokens", int, 1, 2048, "longest reply, in tokens"),
        SessionSettingSpec("history_turns", int, 0, 200, "past messages the model sees"),
        # Checked against the server's /v1/models by the command (bot/chat/commands.py).
        SessionSettingSpec("model", str, None, 200, "model id on the model server (MODEL_BACKEND=openai)"),
    )
}


# Keys that only a chat has (`/config chat set`): they are about the chat, not one session.
CHAT_ONLY_SETTINGS: Final[Mapping[str, SessionSettingSpec]] = {
    "enabled": SessionSettingSpec("enabled", bool, None, None, "whether I answer in this chat (true or false)"),
}
CHAT_SETTINGS: Final[Mapping[str, SessionSettingSpec]] = {**SESSION_SETTINGS, **CHAT_ONLY_SETTINGS}


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """The settings one conversation's turns run with. Field names are the keys of
    `SESSION_SETTINGS`."""

    system_prompt: str
    temperature: float
    top_p: float
    max_new_tokens: int
    history_turns: int
    model: str = ""  # empty: the backend's default model

    def with_overrides(self, overrides: Mapping[str, SettingValue]) -> SessionSettings:
        """These settings with a session's stored values on top. A key this version does
        not know (stored by another version) or a value out of range is skipped."""
        changes: dict[str, SettingValue] = {}
        for name, value in overrides.items():
            spec = SESSION_SETTINGS.get(name)  # a chat's "enabled" is not a session's
            if spec is None:
                continue
            try:
                changes[name] = spec.parse(str(value))
            except ValueError as exc:
                logger.warning("ignoring stored setting %s=%r: %s", name, value, exc)
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def items(self) -> list[tuple[str, SettingValue]]:
        """`(key, value)` in the order of `SESSION_SETTINGS`."""
        return [(name, getattr(self, name)) for name in SESSION_SETTINGS]


class SessionStore:
    """Each session's effective settings: `defaults` under its chat's stored settings
    under its own.

    Overrides are read once per session (and per chat) and cached (bounded, least
    recently used first out): every turn needs them, and this process is the only
    writer. With `cache=False` (a store shared with other processes, which may change
    them) a session's own are read at every turn instead, so a change made elsewhere
    applies to the next turn, and a chat's at most every `CHAT_TTL_SHARED_S`.
    """

    def __init__(
        self,
        defaults: SessionSettings,
        repository: Repository,
        *,
        cache_size: int = _CACHE_SIZE,
        cache: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._defaults = defaults
        self._repo = repository
        self._cache_size = cache_size if cache else 0
        self._cache: OrderedDict[ConversationKey, dict[str, SettingValue]] = OrderedDict()
        # Read at most every CHAT_TTL_SHARED_S when other processes share the store: every
        # message needs them (the gate, then the turn), and a round trip each on a shared
        # database costs more than a chat-wide change taking a moment to spread.
        self._chats: OrderedDict[tuple[Platform, str], tuple[float, dict[str, SettingValue]]] = OrderedDict()
        self._shared = not cache
        self._clock = clock
        self._writes = 0  # a read that raced a write must not cache what it read

    async def overrides(self, key: ConversationKey) -> dict[str, SettingValue]:
        """The session's stored values (empty when none)."""
        cached = self._cache.get(key)
        if cached is None:
            writes = self._writes
            cached = await self._repo.get_settings(key)
            if writes == self._writes:
                self._cache[key] = cached
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return dict(cached)

    async def effective(self, key: ConversationKey) -> SessionSettings:
        """The settings a turn of this session runs with: defaults ← chat ← session."""
        chat = await self.chat_overrides(key.platform, key.chat_id)
        return self._defaults.with_overrides(chat).with_overrides(await self.overrides(key))

    async def chat_overrides(self, platform: Platform, chat_id: str) -> dict[str, SettingValue]:
        """The chat's stored settings (empty when none)."""
        chat = (platform, chat_id)
        entry = self._chats.get(chat)
        now = self._clock()
        if entry is None or (self._shared and now - entry[0] >= CHAT_TTL_SHARED_S):
            writes = self._writes
            cached = await self._repo.get_chat_settings(platform, chat_id)
            if writes == self._writes:
                self._chats[chat] = (now, cached)
                self._chats.move_to_end(chat)
                if len(self._chats) > _CACHE_SIZE:
                    self._chats.popitem(last=False)
        else:
            cached = entry[1]
            self._chats.move_to_end(chat)
        return dict(cached)

    async def chat_enabled(self, platform: Platform, chat_id: str) -> bool:
        """False when the chat's admins switched the bot off there."""
        value = (await self.chat_overrides(platform, chat_id)).get("enabled", 1)
        try:
            return bool(CHAT_ONLY_SETTINGS["enabled"].parse(str(value)))
        except ValueError:
            logger.warning("ignoring stored setting enabled=%r of %s chat %s", value, platform, chat_id)
            return True

    async def set_chat(self, platform: Platform, chat_id: str, name: str, value: SettingValue) -> None:
        """Store one chat-wide setting; `value` was parsed by `CHAT_SETTINGS[name]`."""
        await self._repo.set_chat_setting(platform, chat_id, name, value)
        self._forget_chat(platform, chat_id)

    async def clear_chat(self, platform: Platform, chat_id: str) -> None:
        """Drop every chat-wide setting of the chat (it is switched on again)."""
        await self._repo.clear_chat_settings(platform, chat_id)
        self._forget_chat(platform, chat_id)

    def _forget_chat(self, platform: Platform, chat_id: str) -> None:
        self._writes += 1
        self._chats.pop((platform, chat_id), None)

    async def set(self, key: ConversationKey, name: str, value: SettingValue) -> None:
        """Store one override; `value` was parsed by `SESSION_SETTINGS[name]`."""
        await self._repo.set_setting(key, name, value)
        self._forget(key)

    async def clear(self, key: ConversationKey) -> None:
        """Drop every override of the session."""
        await self._repo.clear_settings(key)
        self._forget(key)

    def _forget(self, key: ConversationKey) -> None:
        self._writes += 1
        self._cache.pop(key, None)
