"""Discord: a discord.py client that turns messages and slash commands into the core's
events, and streams replies back as messages edited in place.

The bot answers every direct message; in server channels and threads it answers when
@mentioned or when a message replies to one of its own. Slash commands are mapped
onto the text commands the core parses, and answered ephemerally.

Nothing the bot sends may ping anyone: every send and edit passes
`allowed_mentions=AllowedMentions.none()` (also the client's default), so a model
writing "@everyone" or "<@123>" shows text, not a notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import PurePosixPath
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands

from bot.config import SESSION_SETTINGS, Settings
from bot.errors import BotError, ConfigError, DeliveryError
from bot.events import IncomingMessage
from bot.ports import CommandInfo, IncomingHandler

logger = logging.getLogger(__name__)

MAX_CHARS = 2000
NO_MENTIONS = discord.AllowedMentions.none()
ATTACHMENT_NOTE = "I can only read text and text files."
ORIGINAL_RESPONSE = "@original"
"""The message id `InteractionReplyTarget.send` returns for the interaction's own response."""

TEXT_EXTENSIONS = frozenset(
    [".txt", ".md", ".markdown", ".rst", ".log", ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".env", ".xml", ".html", ".htm", ".css", ".scss", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".py", ".pyi", ".ipynb", ".rb", ".go", ".rs", ".java", ".kt", ".kts", ".scala", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".swift", ".m", ".php", ".pl", ".lua", ".r", ".jl", ".sh", ".bash", ".zsh", ".fish", ".ps1", ".bat", ".sql", ".graphql", ".proto", ".dockerfile", ".tex", ".bib", ".srt", ".vtt", ".diff", ".patch"]
)
TEXT_CONTENT_TYPES = frozenset(
    {
        "application/json",
        "application/ld+json",
        "application/xml",
        "application/javascript",
        "application/x-yaml",
        "application/yaml",
        "application/toml",
        "application/x-sh",
        "application/sql",
    }
)
_REPLIABLE_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})


# --------------------------------------------------------------------------- pure edge


def apply_endpoints(api_base: str, gateway_url: str) -> None:
    """Point discord.py at a Discord(-compatible) server. The only place we set them.

    discord.py keeps both process-wide: REST routes (including interaction callbacks
    and followup webhooks) are built from `Route.BASE`, and a plain `Client`, an
    `AutoShardedClient` with a shard count, and a session invalidated by the gateway
    all connect to `DiscordWebSocket.DEFAULT_GATEWAY` without asking REST. Resumes go
    to the `resume_gateway_url` the server sent in READY. Attachments are read from
    the URL in their payload."""
    discord.http.Route.BASE = api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


def make_intents() -> discord.Intents:
    """Guilds (channel and role cache), guild messages, DMs, and message content."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True
    return intents


def strip_mention(text: str, bot_user_id: int) -> str:
    """Remove every `<@id>` / `<@!id>` of the bot (and the blanks around it)."""
    return re.sub(rf"[ \t]*<@!?{bot_user_id}>[ \t]*", " ", text).strip()


def is_reply_to_bot(message: discord.Message, bot_user_id: int) -> bool:
    ref = message.reference
    return ref is not None and isinstance(ref.resolved, discord.Message) and ref.resolved.author.id == bot_user_id


def to_event(message: discord.Message, bot_user_id: int) -> IncomingMessage | None:
    """A Discord message as the common event, or None when the bot should not answer.

    DMs are always answered; in servers and threads only a mention of the bot or a
    reply to one of its messages. Bots (the bot itself included), webhooks and system
    messages are ignored. A thread is its own chat."""
    author = message.author
    if author.bot or author.id == bot_user_id or message.webhook_id is not None:
        return None
    if message.type not in _REPLIABLE_TYPES:
        return None
    is_private = message.guild is None
    mentioned = bot_user_id in message.raw_mentions
    if not is_private and not mentioned and not is_reply_to_bot(message, bot_user_id):
        return None
    text = strip_mention(message.content, bot_user_id) if mentioned else message.content.strip()
    if is_private and not text and not message.attachments:
        return None  # a sticker or an embed: nothing to answer
    return IncomingMessage(
        platform="discord",
        chat_id=str(message.channel.id),
        user_id=str(author.id),
        display_name=author.display_name,
        message_id=str(message.id),
        text=text,
        is_private=is_private,
        timestamp=message.created_at,
    )


def interaction_to_event(interaction: discord.Interaction[Any], text: str) -> IncomingMessage:
    """A slash command as the common event; `text` is the equivalent text command."""
    return IncomingMessage(
        platform="discord",
        chat_id=str(interaction.channel_id),
        user_id=str(interaction.user.id),
        display_name=interaction.user.display_name,
        message_id=str(interaction.id),
        text=text,
        is_private=interaction.guild_id is None,
        timestamp=interaction.created_at,
    )


def is_text_attachment(filename: str, content_type: str | None) -> bool:
    """Whether an attachment is a text file the bot reads (by MIME type or extension)."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime.startswith("text/") or mime in TEXT_CONTENT_TYPES:
        return True
    name = PurePosixPath(filename.lower())
    return name.suffix in TEXT_EXTENSIONS or name.name in {"dockerfile", "makefile", "readme", "license"}


async def read_text_attachments(
    event: IncomingMessage, attachments: Sequence[discord.Attachment], max_bytes: int
) -> tuple[IncomingMessage, str | None]:
    """Append the text attachments (up to `max_bytes` each) to the event's text.

    Returns the event and, when the message has nothing the bot can read, a short note
    to send instead of asking the model."""
    parts = [event.text] if event.text else []
    too_large: list[str] = []
    for attachment in attachments:
        if not is_text_attachment(attachment.filename, attachment.content_type):
            continue
        if attachment.size > max_bytes:
            too_large.append(attachment.filename)
            continue
        data = await attachment.read()
        parts.append(f"[{attachment.filename}]\n{data.decode('utf-8', errors='replace')}")
    if parts:
        return dataclasses.replace(event, text="\n\n".join(parts)), None
    if too_large:
        return event, f"{ATTACHMENT_NOTE} {', '.join(too_large)} is larger than my limit of {max_bytes} bytes."
    return event, ATTACHMENT_NOTE


# --------------------------------------------------------------------------- reply targets


@contextlib.contextmanager
def _delivery(what: str, channel_id: int | None) -> Iterator[None]:
    """Turn Discord's refusals into `DeliveryError` (429s never get here: discord.py
    waits them out; 5xx it retries)."""
    try:
        yield
    except discord.Forbidden as exc:
        logger.warning("no permission to %s in channel %s: %s", what, channel_id, exc.text)
        raise DeliveryError(f"forbidden to {what} in channel {channel_id}") from exc
    except discord.NotFound as exc:
        logger.info("could not %s in channel %s, gone: %s", what, channel_id, exc.text)
        raise DeliveryError(f"{what}: not found in channel {channel_id}") from exc
    except discord.HTTPException as exc:
        logger.warning("Discord refused to %s in channel %s: %s %s", what, channel_id, exc.status, exc.text)
        raise DeliveryError(f"{what} failed with HTTP {exc.status} in channel {channel_id}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        logger.warning("could not reach Discord to %s in channel %s: %r", what, channel_id, exc)
        raise DeliveryError(f"{what}: {exc!r}") from exc


class MessageReplyTarget:
    """Replies to one Discord message: the first part replies to it (without pinging
    the author), further parts follow in the channel."""

    max_chars = MAX_CHARS

    def __init__(self, client: discord.Client, message: discord.Message, edit_interval: float) -> None:
        self._client = client
        self._message = message
        self._channel = message.channel
        self._edit_interval = edit_interval
        self._sent: dict[str, discord.Message] = {}

    @property
    def edit_interval(self) -> float:
        return self._edit_interval

    def _check_open(self) -> None:
        if self._client.is_closed():
            raise DeliveryError("the Discord connection is closed")

    async def send(self, text: str) -> str:
        self._check_open()
        with _delivery("send a message", self._channel.id):
            if not self._sent:
                sent = await self._message.reply(text, mention_author=False, allowed_mentions=NO_MENTIONS)
            else:
                sent = await self._channel.send(text, allowed_mentions=NO_MENTIONS)
        self._sent[str(sent.id)] = sent
        return str(sent.id)

    async def edit(self, message_id: str, text: str) -> None:
        self._check_open()
        with _delivery("edit a message", self._channel.id):
            self._sent[message_id] = await self._sent[message_id].edit(content=text, allowed_mentions=NO_MENTIONS)

    async def typing(self) -> None:
        self._check_open()
        with _delivery("show typing", self._channel.id):
            await self._channel.typing()  # awaited once: one POST /typing (~10 s)

    async def sender_is_chat_admin(self) -> bool:
        author = self._message.author
        return isinstance(author, discord.Member) and author.guild_permissions.manage_guild


class InteractionReplyTarget:
    """Answers a slash command ephemerally: the deferred response is the first message,
    followups carry the rest of a long answer."""

    max_chars = MAX_CHARS

    def __init__(self, client: discord.Client, interaction: discord.Interaction[Any], edit_interval: float) -> None:
        self._client = client
        self._interaction = interaction
        self._edit_interval = edit_interval
        self._used_original = False

    @property
    def edit_interval(self) -> float:
        return self._edit_interval

    @property
    def answered(self) -> bool:
        """Whether the deferred response got its content."""
        return self._used_original

    def _check_open(self) -> None:
        if self._client.is_closed():
            raise DeliveryError("the Discord connection is closed")

    async def send(self, text: str) -> str:
        self._check_open()
        with _delivery("answer a slash command", self._interaction.channel_id):
            if not self._used_original:
                await self._interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS)
                self._used_original = True
                return ORIGINAL_RESPONSE
            sent = await self._interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS, wait=True)
        return str(sent.id)

    async def edit(self, message_id: str, text: str) -> None:
        self._check_open()
        with _delivery("edit a slash command answer", self._interaction.channel_id):
            if message_id == ORIGINAL_RESPONSE:
                await self._interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS)
            else:
                await self._interaction.followup.edit_message(
                    int(message_id), content=text, allowed_mentions=NO_MENTIONS
                )

    async def typing(self) -> None:
        return None  # the deferred response already shows "thinking…"

    async def sender_is_chat_admin(self) -> bool:
        # Manage Server is a guild-level permission; channel overwrites cannot change it.
        return self._interaction.guild_id is not None and self._interaction.permissions.manage_guild


# --------------------------------------------------------------------------- slash commands

SlashDispatch = Callable[[discord.Interaction[Any], str], Awaitable[None]]


def _description(info: CommandInfo) -> str:
    text = info.description.strip() or info.name
    return text if len(text) <= 100 else text[:99] + "…"


def build_command_tree(
    tree: app_commands.CommandTree[Any], commands: Sequence[CommandInfo], dispatch: SlashDispatch
) -> None:
    """Add a slash command for each of the core's commands; each one calls `dispatch`
    with the text command it stands for (`/config set temperature 0.5`).

    `/reset` and `/config` get options; any other command is a plain `/name`."""
    for info in commands:
        if info.name == "reset":
            tree.add_command(_reset_command(info, dispatch))
        elif info.name == "config":
            tree.add_command(_config_group(info, dispatch))
        else:
            tree.add_command(_plain_command(info, dispatch))


def _plain_command(info: CommandInfo, dispatch: SlashDispatch) -> app_commands.Command[Any, Any, None]:
    text = f"/{info.name}"

    async def callback(interaction: discord.Interaction[Any]) -> None:
        await dispatch(interaction, text)

    return app_commands.Command(name=info.name, description=_description(info), callback=callback)


def _reset_command(info: CommandInfo, dispatch: SlashDispatch) -> app_commands.Command[Any, Any, None]:
    @app_commands.describe(
        user="Admins: reset this user's conversation in this channel",
        whole_channel="Admins: reset every conversation in this channel",
    )
    async def callback(
        interaction: discord.Interaction[Any], user: discord.User | None = None, whole_channel: bool = False
    ) -> None:
        args = ([str(user.id)] if user is not None else []) + (["chat"] if whole_channel else [])
        await dispatch(interaction, " ".join(["/reset", *args]))

    return app_commands.Command(name="reset", description=_description(info), callback=callback)


def _config_group(info: CommandInfo, dispatch: SlashDispatch) -> app_commands.Group:
    group = app_commands.Group(name="config", description=_description(info))

    async def show(interaction: discord.Interaction[Any]) -> None:
        await dispatch(interaction, "/config")

    @app_commands.describe(key="The setting to change", value="Its new value")
    @app_commands.choices(key=[app_commands.Choice(name=name, value=name) for name in SESSION_SETTINGS])
    async def set_(interaction: discord.Interaction[Any], key: str, value: str) -> None:
        await dispatch(interaction, f"/config set {key} {value}")

    async def reset(interaction: discord.Interaction[Any]) -> None:
        await dispatch(interaction, "/config reset")

    group.add_command(app_commands.Command(name="show", description="Show this session's settings", callback=show))
    group.add_command(
        app_commands.Command(name="set", description="Admins: change a setting of this session", callback=set_)
    )
    group.add_command(
        app_commands.Command(
            name="reset", description="Admins: put this session's settings back to the defaults", callback=reset
        )
    )
    return group


# --------------------------------------------------------------------------- the adapter


class _Hooks:
    """Client callbacks forwarded to the adapter (mixed into Client / AutoShardedClient)."""

    adapter: DiscordAdapter

    async def setup_hook(self) -> None:
        await self.adapter._on_setup()

    async def on_ready(self) -> None:
        self.adapter._on_ready()

    async def on_message(self, message: discord.Message) -> None:
        self.adapter._on_message(message)


class _Client(_Hooks, discord.Client):
    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter


class _ShardedClient(_Hooks, discord.AutoShardedClient):
    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter


class DiscordAdapter:
    """Serves Discord until cancelled. Started when DISCORD_TOKEN is set.

    Endpoints come from DISCORD_API_BASE / DISCORD_GATEWAY_URL; DISCORD_SHARD_COUNT
    switches to an `AutoShardedClient`. Each message and slash command is handled in
    its own named task; cancelling `run` closes the connection and those tasks."""

    name = "discord"

    def __init__(self, settings: Settings, commands: Sequence[CommandInfo]) -> None:
        if settings.discord_token is None:
            raise ConfigError("DISCORD_TOKEN", "is not set")
        self._settings = settings
        self._commands = tuple(commands)
        self._handler: IncomingHandler | None = None
        self._client: discord.Client | None = None
        self._tree: app_commands.CommandTree[Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> discord.Client | None:
        """The discord.py client while `run` is serving."""
        return self._client

    @property
    def in_flight(self) -> int:
        """Messages and slash commands being handled right now."""
        return len(self._tasks)

    def _make_client(self) -> discord.Client:
        # A text bot: discord.py's warnings about missing voice libraries only confuse.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        options: dict[str, Any] = {"intents": make_intents(), "allowed_mentions": NO_MENTIONS}
        client: discord.Client
        if self._settings.discord_shard_count is not None:
            client = _ShardedClient(self, shard_count=self._settings.discord_shard_count, **options)
        else:
            client = _Client(self, **options)
        self._tree = app_commands.CommandTree(client)
        build_command_tree(self._tree, self._commands, self._on_slash_command)
        return client

    async def run(self, handler: IncomingHandler) -> None:
        assert self._settings.discord_token is not None
        apply_endpoints(self._settings.discord_api_base, self._settings.discord_gateway_url)
        self._handler = handler
        client = self._client = self._make_client()
        try:
            async with client:
                await client.start(self._settings.discord_token.get_secret_value())
        except discord.LoginFailure:
            raise ConfigError("DISCORD_TOKEN", "Discord rejected the token") from None
        except discord.PrivilegedIntentsRequired:
            raise ConfigError(
                "DISCORD_TOKEN",
                "the bot needs the Message Content intent: enable it in the Discord developer portal "
                "(your application → Bot → Privileged Gateway Intents)",
            ) from None
        finally:
            await self._stop_tasks()
            self._client = None

    async def _stop_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ client callbacks

    async def _on_setup(self) -> None:
        """After login, before the gateway connects: publish the slash commands."""
        assert self._tree is not None
        try:
            synced = await self._tree.sync()
        except discord.HTTPException:
            logger.exception("could not sync the slash commands; text commands still work")
        else:
            logger.info("synced %d slash commands", len(synced))

    def _on_ready(self) -> None:
        client = self._client
        if client is not None and client.user is not None:
            logger.info(
                "connected to Discord as %s (id %s) in %d servers", client.user, client.user.id, len(client.guilds)
            )

    def _on_message(self, message: discord.Message) -> None:
        client = self._client
        if client is None or client.user is None:
            return
        event = to_event(message, client.user.id)
        if event is None:
            return
        self._spawn(self._serve_message(client, message, event), f"discord:message:{message.id}")

    async def _serve_message(self, client: discord.Client, message: discord.Message, event: IncomingMessage) -> None:
        assert self._handler is not None
        target = MessageReplyTarget(client, message, self._settings.discord_edit_interval)
        try:
            if message.attachments:
                with _delivery("read an attachment", message.channel.id):
                    event, note = await read_text_attachments(
                        event, message.attachments, self._settings.discord_attachment_max_bytes
                    )
                if note is not None:
                    await target.send(note)
                    return
            await self._handler.handle(event, target)
        except DeliveryError as exc:
            logger.info("message %s from %s not answered: %s", event.message_id, event.sender, exc)
        except Exception:
            logger.exception("failed to handle Discord message %s from %s", event.message_id, event.sender)

    async def _on_slash_command(self, interaction: discord.Interaction[Any], text: str) -> None:
        client = self._client
        if client is None:
            return
        self._spawn(self._serve_interaction(client, interaction, text), f"discord:interaction:{interaction.id}")

    async def _serve_interaction(
        self, client: discord.Client, interaction: discord.Interaction[Any], text: str
    ) -> None:
        assert self._handler is not None
        event = interaction_to_event(interaction, text)
        target = InteractionReplyTarget(client, interaction, self._settings.discord_edit_interval)
        try:
            with _delivery("acknowledge a slash command", interaction.channel_id):
                # Discord allows 3 s for the first response; a /reset may wait longer
                # for a reply in progress to stop.
                await interaction.response.defer(ephemeral=True, thinking=True)
        except DeliveryError as exc:
            logger.info("slash command %r from %s not acknowledged: %s", text, event.sender, exc)
            return
        try:
            await self._handler.handle(event, target)
        except Exception:
            logger.exception("failed to handle slash command %r from %s", text, event.sender)
        if not target.answered:  # never leave the user looking at "thinking…"
            with contextlib.suppress(DeliveryError):
                await target.send(BotError.user_message)
