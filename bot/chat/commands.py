"""The command table: parsing, argument validation and permission checks.

Commands are parsed here, once, so every platform behaves the same. Adapters only
pass the text on (Discord slash commands are turned into the same text).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol, cast

from bot.chat.export import EXPORT_MAX_BYTES, export_markdown
from bot.chat.policy import ENTRY_PLATFORMS, Policy, format_wait, parse_entry
from bot.chat.session import (
    CHAT_ONLY_SETTINGS,
    CHAT_SETTINGS,
    SESSION_SETTINGS,
    SessionSettings,
    SessionSettingSpec,
    SessionStore,
)
from bot.config import Settings
from bot.errors import BotError, CommandError, DeliveryError, PermissionDenied
from bot.events import ConversationKey, IncomingMessage, Platform
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
    CommandInfo(
        "usage",
        "Your tokens today and the daily quota (admins: /usage <user id>, /usage reset <user id>)",
        admin_only=False,
    ),
    CommandInfo(
        "export", "Send our conversation in this chat as a Markdown file (admins: /export <user id>)", admin_only=False
    ),
    CommandInfo(
        "block", "Ignore a user, chat or server: /block <user id>, chat:<id>, guild:<id> (admins)", admin_only=True
    ),
    CommandInfo("unblock", "Answer a blocked user, chat or server again (admins)", admin_only=True),
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
        *,
        policy: Policy | None = None,
    ) -> None:
        self._settings = settings
        self._repo = repository
        self._sessions = sessions
        self._model = model
        self._conversations = conversations
        self.policy = policy or Policy(settings, repository, sessions)

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
        if sub == "chat":
            return await self._config_chat(command, event, target)
        if sub == "show":
            effective = await self._sessions.effective(key)
            if not effective.model:
                effective = dataclasses.replace(effective, model=self._model.model_name)
            chat = await self._sessions.chat_overrides(key.platform, key.chat_id)
            return self._format_settings(effective, await self._sessions.overrides(key), chat)
        if sub == "set":
            if len(command.args) >= 2 and command.args[1].lower() in CHAT_ONLY_SETTINGS:
                # `/config set enabled false` can only mean the chat: a session has no such key.
                return await self._config_chat_set(command.rest.split(None, 1)[1], event, target)
            await self._require_admin(event, target, "chat")
            if len(command.args) < 3:
                raise CommandError(f"Usage: /config set <key> <value>. Keys: {', '.join(SESSION_SETTINGS)}.")
            name, value = await self._parse_setting(SESSION_SETTINGS, command.args[1], command.rest.split(None, 2)[2])
            await self._sessions.set(key, name, value)
            return f"{name} is now {value!r} for this session."
        if sub == "reset":
            await self._require_admin(event, target, "chat")
            await self._sessions.clear(key)
            return "This session's settings are back to the defaults."
        raise CommandError(
            "Usage: /config, /config set <key> <value>, /config reset, "
            "/config chat, /config chat set <key> <value>, /config chat reset"
        )

    async def _config_chat(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        """`/config chat [show | set <key> <value> | reset]`: the settings of everybody in
        this chat, under each session's own; `enabled` switches the bot off or on here."""
        sub = command.args[1].lower() if len(command.args) > 1 else "show"
        platform, chat_id = event.platform, event.chat_id
        if sub == "show":
            stored = await self._sessions.chat_overrides(platform, chat_id)
            enabled = await self._sessions.chat_enabled(platform, chat_id)
            lines = ["Settings for everybody in this chat:", f"enabled = {'true' if enabled else 'false'}"]
            lines += [f"{name} = {stored[name]!r}" for name in SESSION_SETTINGS if name in stored]
            if len(lines) == 2:
                lines.append("(no other chat-wide settings: everybody has the defaults)")
            return "\n".join(lines)
        if sub == "set":
            return await self._config_chat_set(
                command.rest.split(None, 2)[2] if len(command.args) > 2 else "", event, target
            )
        if sub == "reset":
            await self._require_admin(event, target, "chat")
            await self._sessions.clear_chat(platform, chat_id)
            return "This chat's settings are back to the defaults (and I answer here)."
        raise CommandError("Usage: /config chat, /config chat set <key> <value>, /config chat reset")

    async def _config_chat_set(self, args: str, event: IncomingMessage, target: ReplyTarget) -> str:
        """`args` is `<key> <value>` of `/config chat set`."""
        await self._require_admin(event, target, "chat")
        parts = args.split(None, 1)
        if len(parts) < 2:
            raise CommandError(f"Usage: /config chat set <key> <value>. Keys: {', '.join(CHAT_SETTINGS)}.")
        name, value = await self._parse_setting(CHAT_SETTINGS, parts[0], parts[1])
        await self._sessions.set_chat(event.platform, event.chat_id, name, value)
        logger.info("%s set %s=%r for %s chat %s", event.sender, name, value, event.platform, event.chat_id)
        if name == "enabled":
            if value:
                return "I'm switched on in this chat again."
            return (
                "I'm switched off in this chat: I ignore messages here until an admin sends "
                "/config chat set enabled true."
            )
        return f"{name} is now {value!r} for everybody in this chat (unless their session sets its own)."

    async def _parse_setting(
        self, specs: Mapping[str, SessionSettingSpec], raw_name: str, raw_value: str
    ) -> tuple[str, SettingValue]:
        name = raw_name.lower()
        spec = specs.get(name)
        if spec is None:
            raise CommandError(f"Unknown setting {name!r}. Keys: {', '.join(specs)}.")
        try:
            value = spec.parse(raw_value)  # free text keeps its spaces (system_prompt)
        except ValueError as exc:
            raise CommandError(f"Bad value: {exc}.") from None
        if name == "model":
            await self._check_model(str(value))
        return name, value

    async def _cmd_stats(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        await self._require_admin(event, target, "conversation")
        repo = await self._repo.stats()
        worker = self._model.stats()
        # Users, conversations and messages are counted in the database, over every
        # process sharing it; the queue and the model's figures are this process's own.
        here = " (this process)" if self._repo.shared else ""
        # With METRICS_PORT the model is a bot.metrics.MeteredBackend: the counters /metrics serves.
        metered = getattr(self._model, "stats_lines", None)
        counters = "".join(f"\n{line}{here}" for line in metered()) if callable(metered) else ""
        return (
            f"Users: {repo.users}\nConversations: {repo.conversations}\nMessages: {repo.messages}\n"
            f"Queue{here}: {worker.queue_depth} waiting for the model, {worker.active} generating, "
            f"{self._conversations.waiting_turns()} waiting for their turn\n"
            f"Tokens generated{here}: {worker.tokens_generated}\nSpeed{here}: {worker.tokens_per_s:.1f} tokens/s"
            f"{counters}"
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

    # ------------------------------------------------------------------ public controls

    async def _cmd_usage(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        args = command.args
        if not args:
            return await self._usage_text(event.platform, event.user_id, "Your")
        await self._require_admin(event, target, "conversation")
        resetting = args[0].lower() == "reset"
        if len(args) != (2 if resetting else 1):  # `/usage reset` alone names nobody
            raise CommandError("Usage: /usage, /usage <user id>, /usage reset <user id>")
        if resetting:
            platform, user_id = self._user_ref(args[1], event)
            await self.policy.reset_usage(platform, user_id)
            logger.info("%s reset the usage of %s:%s", event.sender, platform, user_id)
            return f"Done: the use of {platform}:{user_id} today is reset; their quota starts again."
        platform, user_id = self._user_ref(args[0], event)
        return await self._usage_text(platform, user_id, f"{platform}:{user_id}'s")

    async def _usage_text(self, platform: Platform, user_id: str, whose: str) -> str:
        used = await self.policy.usage(platform, user_id)
        quota = self.policy.quota
        lines = [
            f"{whose} use today ({used.day.isoformat()}, UTC): {used.generated_tokens} tokens generated "
            f"for {used.messages} messages ({used.prompt_tokens} prompt tokens)."
        ]
        if quota is None:
            lines.append("There is no daily quota.")
        else:
            left = max(0, quota - used.generated_tokens)
            lines.append(
                f"Daily quota: {quota} tokens, {left} left; it starts again at 00:00 UTC "
                f"(in {format_wait(self.policy.until_tomorrow())})."
            )
        return "\n".join(lines)

    async def _cmd_block(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        await self._require_admin(event, target, "conversation")
        entry = self._entry_ref(command, event, "block")
        added = await self.policy.block(entry, event.sender)
        logger.info("%s blocked %s", event.sender, entry)
        await self._conversations.stop(lambda k: _names(entry, k))  # their replies in progress stop too
        note = " (bot admins are never blocked)" if self._settings.is_admin(entry) else ""
        if not added:
            return f"{entry} was already blocked{note}."
        return f"Blocked {entry}: I ignore their messages from now on{note}."

    async def _cmd_unblock(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        await self._require_admin(event, target, "conversation")
        entry = self._entry_ref(command, event, "unblock")
        removed = await self.policy.unblock(entry)
        if self.policy.configured_block(entry):
            return f"{entry} is blocked by the BLOCKED_IDS setting; only removing it there unblocks it."
        if not removed:
            return f"{entry} was not blocked."
        logger.info("%s unblocked %s", event.sender, entry)
        return f"Unblocked {entry}."

    async def _cmd_export(self, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget) -> str:
        key = event.key
        if command.args:
            if len(command.args) != 1:
                raise CommandError("Usage: /export, or (admins) /export <user id>")
            await self._require_admin(event, target, "chat")
            key = ConversationKey(event.platform, event.chat_id, _strip_mention(command.args[0]))
        messages = [m for m in await self._repo.conversation_messages(key) if m.status != "hidden"]
        if not messages:
            whose = "our" if key == event.key else f"user {key.user_id}'s"
            return f"There is nothing to export: {whose} conversation in this chat is empty."
        text, kept = export_markdown(key, messages, exported_at=datetime.now(UTC))
        filename = f"conversation-{_safe(key.platform)}-{_safe(key.chat_id)}-{_safe(key.user_id)}.md"
        caption = f"The conversation of {key.user_id} in this chat: {kept} messages"
        if kept < len(messages):
            caption += f" (the newest {kept} of {len(messages)}: the file is limited to {EXPORT_MAX_BYTES // 2**20} MB)"
        try:
            await target.send_file(filename, text.encode("utf-8"), caption + ".")
        except DeliveryError as exc:
            logger.warning("export of %s not delivered: %s", key, exc)
            return "I couldn't send the file here (the platform refused it)."
        return ""  # the file and its caption are the answer

    def _user_ref(self, raw: str, event: IncomingMessage) -> tuple[Platform, str]:
        """A user named in a command: `123`, a Discord mention `<@123>`, or `telegram:123`."""
        text = _strip_mention(raw)
        if text.split(":", 1)[0].lower() in ENTRY_PLATFORMS:
            try:
                entry = parse_entry(text)
            except ValueError as exc:
                raise CommandError(f"Bad user: {exc}.") from None
            platform, _, user_id = entry.partition(":")
            if ":" in user_id:
                raise CommandError(f"{text} is a chat, not a user.")
            return cast(Platform, platform), user_id
        if not text or ":" in text:
            raise CommandError(f"Bad user id {raw!r}.")
        return event.platform, text

    @staticmethod
    def _entry_ref(command: ParsedCommand, event: IncomingMessage, name: str) -> str:
        """What `/block` and `/unblock` name: a user (`123`, `<@123>`), a chat or server
        of this platform (`chat:-100…`, `guild:456`), or a full entry (`telegram:123`)."""
        if len(command.args) != 1:
            raise CommandError(f"Usage: /{name} <user id>, /{name} chat:<chat id> or /{name} guild:<server id>")
        text = _strip_mention(command.args[0])
        if text.split(":", 1)[0].lower() not in ENTRY_PLATFORMS:
            text = f"{event.platform}:{text}"
        try:
            return parse_entry(text)
        except ValueError as exc:
            raise CommandError(f"Bad id: {exc}.") from None

    # ------------------------------------------------------------------ text

    def _command_list(self) -> str:
        return ", ".join(f"/{c.name}" for c in COMMANDS)

    def _help_text(self) -> str:
        lines = ["Commands:"] + [f"/{c.name} — {c.description}" for c in COMMANDS]
        lines.append(f"Setting keys for /config set: {', '.join(SESSION_SETTINGS)}.")
        lines.append(
            "Chat admins set them for everybody here with /config chat set <key> <value>; "
            "/config chat set enabled false switches me off in this chat."
        )
        return "\n".join(lines)

    @staticmethod
    def _format_settings(
        effective: SessionSettings, overrides: Mapping[str, SettingValue], chat: Mapping[str, SettingValue]
    ) -> str:
        lines = ["Settings for this session:"]
        for name, value in effective.items():
            mark = " (set for this session)" if name in overrides else " (set for this chat)" if name in chat else ""
            lines.append(f"{name} = {value!r}{mark}")
        return "\n".join(lines)


def _strip_mention(text: str) -> str:
    """`<@123>` / `<@!123>` (a Discord mention) → `123`."""
    return text.removeprefix("<@").removeprefix("!").removesuffix(">")


def _safe(part: str) -> str:
    """A piece of a file name: letters, digits, `-` and `_` only."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in part)[:40] or "_"


def _names(entry: str, key: ConversationKey) -> bool:
    """Whether a `/block` entry names the conversation's user or chat."""
    platform, _, rest = entry.partition(":")
    if platform != key.platform:
        return False
    kind, _, ident = rest.partition(":")
    if not ident:
        return key.user_id == kind
    return kind == "chat" and (key.chat_id == ident or key.chat_id.startswith(ident + "/"))
