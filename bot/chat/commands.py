"""The command table: parsing, argument validation and permission checks.

Commands are parsed here, once, so every platform behaves the same. Adapters only
pass the text on (Discord slash commands are turned into the same text).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from bot.chat.session import SESSION_SETTINGS, SessionSettings, SessionStore
from bot.config import Settings
from bot.errors import BotError, CommandError, PermissionDenied
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
    CommandInfo("model", "Show the model in use (admins switch with /config set model <id>)", admin_only=False),
)
_NAMES = frozenset(c.name for c in COMMANDS)

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


class ConversationControl(Protocol):
    """What commands may ask of the conversation manager."""

    async def stop(self, match: Callable[[ConversationKey], bool]) -> int:
        """Cancel the replies in progress and drop the waiting turns of matching
        conversations; returns how many replies were stopped."""
        ...

    def waiting_turns(self) -> int:
        """Messages accepted but waiting for an earlier turn of their conversation."""
        ...


class CommandRunner:
    """Runs one parsed command and returns the reply text. Raises `CommandError`."""

    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        sessions: SessionStore,
        model: ModelBackend,
        conversations: ConversationControl,
    ) -> None:
        self._settings = settings
        self._repo = repository
        self._sessions = sessions
        self._model = model
        self._conversations = conversations

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
            + self._help_text()
        )

    async def _cmd_help(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        return self._help_text()

    async def _cmd_reset(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        key = event.key
        if not command.args:
            await self._conversations.stop(lambda k: k == key)
            count = await self._repo.clear_conversation(key)
            return f"Done: I forgot our conversation ({count} messages)."
        if len(command.args) != 1:
            raise CommandError("Usage: /reset, /reset <user id> or /reset chat")
        await self._require_admin(event, target, "chat")
        arg = command.args[0]
        if arg.lower() == "chat":
            await self._conversations.stop(lambda k: (k.platform, k.chat_id) == (key.platform, key.chat_id))
            count = await self._repo.clear_chat(key.platform, key.chat_id)
            return f"Done: every conversation in this chat was reset ({count} messages)."
        user_id = arg.removeprefix("<@").removeprefix("!").removesuffix(">")  # Discord mention form
        other = ConversationKey(key.platform, key.chat_id, user_id)
        await self._conversations.stop(lambda k: k == other)
        count = await self._repo.clear_conversation(other)
        return f"Done: the conversation of user {user_id} in this chat was reset ({count} messages)."

    async def _cmd_config(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        sub = command.args[0].lower() if command.args else "show"
        key = event.key
        if sub == "show":
            effective = await self._sessions.effective(key)
            if not effective.model:
                effective = dataclasses.replace(effective, model=self._model.model_name)
            return self._format_settings(effective, await self._sessions.overrides(key))
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
            if name == "model":
                await self._check_model(str(value))
            await self._sessions.set(key, name, value)
            return f"{name} is now {value!r} for this session."
        if sub == "reset":
            await self._require_admin(event, target, "chat")
            await self._sessions.clear(key)
            return "This session's settings are back to the defaults."
        raise CommandError("Usage: /config, /config set <key> <value>, /config reset")

    async def _cmd_stats(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        await self._require_admin(event, target, "conversation")
        repo = await self._repo.stats()
        worker = self._model.stats()
        # Users, conversations and messages are counted in the database, over every
        # process sharing it; the queue and the model's figures are this process's own.
        here = " (this process)" if self._repo.shared else ""
        return (
            f"Users: {repo.users}\nConversations: {repo.conversations}\nMessages: {repo.messages}\n"
            f"Queue{here}: {worker.queue_depth} waiting for the model, {worker.active} generating, "
            f"{self._conversations.waiting_turns()} waiting for their turn\n"
            f"Tokens generated{here}: {worker.tokens_generated}\nSpeed{here}: {worker.tokens_per_s:.1f} tokens/s"
        )

    async def _cmd_model(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        chosen = (await self._sessions.effective(event.key)).model
        try:
            available = await self._model.models()
        except BotError as exc:
            logger.warning("could not list the models: %s", exc)
            return f"Model: {chosen or self._model.model_name} (the model server cannot be reached right now)."
        if available is None:
            return f"Model: {self._model.model_name}. This bot runs one local model; it cannot be switched."
        lines = [
            f"Model: {chosen} (set for this session)" if chosen else f"Model: {self._model.model_name} (the default)"
        ]
        lines.append("Available: " + (", ".join(available) if available else "none listed by the server"))
        lines.append("Admins switch with /config set model <id>.")
        return "\n".join(lines)

    async def _check_model(self, model_id: str) -> None:
        """A session may only name a model the backend serves."""
        try:
            available = await self._model.models()
        except BotError as exc:
            logger.warning("could not list the models: %s", exc)
            raise CommandError("The model server cannot be reached right now, so I can't check that id.") from None
        if available is None:
            raise CommandError(
                f"This bot runs one local model ({self._model.model_name}); there is no other to switch to."
            )
        if model_id not in available:
            listed = ", ".join(available) if available else "none"
            raise CommandError(f"Unknown model {model_id!r}. The server offers: {listed}.")

    # ------------------------------------------------------------------ text

    def _command_list(self) -> str:
        return ", ".join(f"/{c.name}" for c in COMMANDS)

    def _help_text(self) -> str:
        lines = ["Commands:"] + [f"/{c.name} — {c.description}" for c in COMMANDS]
        lines.append(f"Setting keys for /config set: {', '.join(SESSION_SETTINGS)}.")
        return "\n".join(lines)

    @staticmethod
    def _format_settings(effective: SessionSettings, overrides: Mapping[str, SettingValue]) -> str:
        lines = ["Settings for this session:"]
        for name, value in effective.items():
            mark = " (set for this session)" if name in overrides else ""
            lines.append(f"{name} = {value!r}{mark}")
        return "\n".join(lines)
