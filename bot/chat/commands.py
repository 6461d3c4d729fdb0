"""The command table: parsing, argument validation and permission checks.

Commands are parsed here, once, so every platform behaves the same. Adapters only
pass the text on (Discord slash commands are turned into the same text).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from bot.config import SESSION_SETTINGS, Settings
from bot.errors import CommandError, PermissionDenied
from bot.events import ConversationKey, IncomingMessage
from bot.ports import CommandInfo, ModelBackend, ReplyTarget, Repository, SettingValue

logger = logging.getLogger(__name__)

COMMANDS: tuple[CommandInfo, ...] = (
    CommandInfo("start", "Say hello and show what I can do", admin_only=False),
    CommandInfo("help", "List the commands", admin_only=False),
    CommandInfo("reset", "Forget our conversation (admins: /reset <user id> or /reset chat)", admin_only=False),
    CommandInfo(
        "config", "Show this session's settings (admins: /config set <key> <value>, /config reset)", admin_only=False
    ),
    CommandInfo("stats", "Usage statistics (admins)", admin_only=True),
)
_NAMES = frozenset(c.name for c in COMMANDS)
_SETTINGS_CACHE_SIZE = 10_000

Scope = Literal["conversation", "chat"]


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    name: str
    args: tuple[str, ...]
    rest: str  # the raw text after the command name, for free-text values


def parse_command(text: str) -> ParsedCommand | None:
    """`"/config set temperature 0.5"` → `ParsedCommand("config", ("set", ...), ...)`.

    Returns None for text that is not a command. A `@botname` suffix is dropped."""
    stripped = text.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    head, _, rest = stripped[1:].partition(" ")
    name = head.split("@", 1)[0].lower()
    if not name:
        return None
    return ParsedCommand(name, tuple(rest.split()), rest.strip())


@dataclass(frozen=True, slots=True)
class SessionControl:
    """What commands may ask of the conversation manager."""

    stop: Callable[[Callable[[ConversationKey], bool]], Awaitable[int]]
    """Cancel in-flight and queued turns of matching conversations; returns how many."""
    queue_stats: Callable[[], Mapping[str, int]]


class CommandRunner:
    """Runs one parsed command and returns the reply text. Raises `CommandError`."""

    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        generator: ModelBackend,
        sessions: SessionControl,
    ) -> None:
        self._settings = settings
        self._repo = repository
        self._generator = generator
        self._sessions = sessions
        # Overrides read once per session: this process is the only writer, and every
        # turn needs them. Bounded, least recently used first out.
        self._overrides: OrderedDict[ConversationKey, dict[str, SettingValue]] = OrderedDict()
        self._writes = 0  # a read that raced a write must not cache what it read

    async def overrides(self, key: ConversationKey) -> dict[str, SettingValue]:
        """The session's stored settings (cached)."""
        cached = self._overrides.get(key)
        if cached is None:
            writes = self._writes
            cached = await self._repo.get_settings(key)
            if writes == self._writes:
                self._overrides[key] = cached
                if len(self._overrides) > _SETTINGS_CACHE_SIZE:
                    self._overrides.popitem(last=False)
        else:
            self._overrides.move_to_end(key)
        return dict(cached)

    def _forget_overrides(self, key: ConversationKey) -> None:
        self._writes += 1
        self._overrides.pop(key, None)

    async def effective_settings(self, key: ConversationKey) -> dict[str, SettingValue]:
        """Defaults from `Settings`, overridden by the session's stored values."""
        values = self._settings.session_defaults()
        for name, value in (await self.overrides(key)).items():
            if name in SESSION_SETTINGS:  # ignore keys a newer/older version stored
                values[name] = value
        return values

    async def run(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        if command.name not in _NAMES:
            raise CommandError(f"Unknown command /{command.name}. Commands: {self._command_list()}.")
        handler = getattr(self, f"_cmd_{command.name}")
        reply: str = await handler(command, event, target)
        return reply

    # ------------------------------------------------------------------ permissions

    async def _require_admin(self, event: IncomingMessage, target: ReplyTarget, scope: Scope) -> None:
        """Bot admins (`ADMIN_IDS`) may do everything; chat admins only chat-scoped things."""
        if self._settings.is_admin(event.sender):
            return
        if scope == "chat" and not event.is_private and await target.sender_is_chat_admin():
            return
        logger.info("refused admin command from %s in %s:%s", event.sender, event.platform, event.chat_id)
        raise PermissionDenied()

    # ------------------------------------------------------------------ commands

    async def _cmd_start(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        return (
            f"Hi {event.display_name}! I'm a chat bot running a local language model. "
            "Just write to me"
            + ("" if event.is_private else " (mention me or reply to me)")
            + ".\n\n"
            + self._help_text(event)
        )

    async def _cmd_help(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        return self._help_text(event)

    async def _cmd_reset(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        key = event.key
        if not command.args:
            await self._sessions.stop(lambda k: k == key)
            count = await self._repo.clear_conversation(key)
            return f"Done: I forgot our conversation ({count} messages)."
        if len(command.args) != 1:
            raise CommandError("Usage: /reset, /reset <user id> or /reset chat")
        await self._require_admin(event, target, "chat")
        arg = command.args[0]
        if arg.lower() == "chat":
            await self._sessions.stop(lambda k: (k.platform, k.chat_id) == (key.platform, key.chat_id))
            count = await self._repo.clear_chat(key.platform, key.chat_id)
            return f"Done: every conversation in this chat was reset ({count} messages)."
        user_id = arg.removeprefix("<@").removeprefix("!").removesuffix(">")  # Discord mention form
        other = ConversationKey(key.platform, key.chat_id, user_id)
        await self._sessions.stop(lambda k: k == other)
        count = await self._repo.clear_conversation(other)
        return f"Done: the conversation of user {user_id} in this chat was reset ({count} messages)."

    async def _cmd_config(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        sub = command.args[0].lower() if command.args else "show"
        key = event.key
        if sub == "show":
            return self._format_settings(await self.effective_settings(key), await self.overrides(key))
        if sub == "set":
            await self._require_admin(event, target, "chat")
            if len(command.args) < 3:
                raise CommandError(f"Usage: /config set <key> <value>. Keys: {', '.join(SESSION_SETTINGS)}.")
            name = command.args[1].lower()
            spec = SESSION_SETTINGS.get(name)
            if spec is None:
                raise CommandError(f"Unknown setting {name!r}. Keys: {', '.join(SESSION_SETTINGS)}.")
            raw = command.rest.split(None, 2)[2]  # free text keeps its spaces (system_prompt)
            try:
                value = spec.parse(raw)
            except ValueError as exc:
                raise CommandError(f"Bad value: {exc}.") from None
            await self._repo.set_setting(key, name, value)
            self._forget_overrides(key)
            return f"{name} is now {value!r} for this session."
        if sub == "reset":
            await self._require_admin(event, target, "chat")
            await self._repo.clear_settings(key)
            self._forget_overrides(key)
            return "This session's settings are back to the defaults."
        raise CommandError("Usage: /config, /config set <key> <value>, /config reset")

    async def _cmd_stats(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        await self._require_admin(event, target, "conversation")
        repo = await self._repo.stats()
        worker = self._generator.stats()
        queued = self._sessions.queue_stats()
        return (
            f"Users: {repo.users}\nConversations: {repo.conversations}\nMessages: {repo.messages}\n"
            f"Queue: {worker.queue_depth} waiting for the model, {worker.active} generating, "
            f"{queued.get('waiting', 0)} waiting for their turn\n"
            f"Tokens generated: {worker.tokens_generated}\nSpeed: {worker.tokens_per_s:.1f} tokens/s"
        )

    # ------------------------------------------------------------------ text

    def _command_list(self) -> str:
        return ", ".join(f"/{c.name}" for c in COMMANDS)

    def _help_text(self, event: IncomingMessage) -> str:
        lines = ["Commands:"] + [f"/{c.name} — {c.description}" for c in COMMANDS]
        lines.append(f"Setting keys for /config set: {', '.join(SESSION_SETTINGS)}.")
        return "\n".join(lines)

    @staticmethod
    def _format_settings(effective: Mapping[str, SettingValue], overrides: Mapping[str, SettingValue]) -> str:
        lines = ["Settings for this session:"]
        for name, value in effective.items():
            mark = " (set for this session)" if name in overrides else ""
            lines.append(f"{name} = {value!r}{mark}")
        return "\n".join(lines)
