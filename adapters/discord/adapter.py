"""Discord: a discord.py client that turns messages and slash commands into the core's
events, and streams replies back as messages edited in place.

The bot answers every direct message; in server channels and threads it answers when
@mentioned or when a message replies to one of its own (`events.py`), with its text
attachments read into it (`attachments.py`). Slash commands are mapped onto the text
commands the core parses (`slash.py`). Replies go out through `delivery.py`.

Staying up: an unreachable Discord API at start-up is retried with backoff, then
stops the bot with a `ConfigError` naming DISCORD_API_BASE (like Telegram). A
slash-command sync that fails in any way is logged once; text commands still work.
A gateway event discord.py cannot parse is logged and skipped (each parser is
guarded), so one odd payload never drops the connection; any other unexpected error
ends `run`, and the composition root restarts the adapter with backoff. Every
READY (a new gateway session) hands the turns a restart left unanswered back to the
core (`recover` is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands

from adapters.discord.attachments import read_text_attachments
from adapters.discord.delivery import (
    MAX_RATELIMIT_WAIT,
    NO_MENTIONS,
    InteractionReplyTarget,
    MessageReplyTarget,
    delivery_errors,
)
from adapters.discord.events import interaction_to_event, to_event
from adapters.discord.slash import build_command_tree
from bot.config import Settings
from bot.errors import BotError, ConfigError, DeliveryError
from bot.events import IncomingMessage
from bot.ports import CommandInfo, IncomingHandler, ReplyTarget

logger = logging.getLogger(__name__)


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


def guard_parsers(client: discord.Client) -> None:
    """Make every gateway event parser of `client` log and skip a payload it cannot
    read, instead of raising out of the connection (which would end it).

    discord.py keeps its parsers in a dict on the connection state, one per event
    name; it is not public API, so a client without it is left as it is (the
    composition root's restart still covers it)."""
    parsers: dict[str, Callable[[Any], None]] | None = getattr(getattr(client, "_connection", None), "parsers", None)
    if not isinstance(parsers, dict):
        logger.warning("discord.py has no event parsers where expected: unreadable events will reconnect")
        return
    for event, parse in list(parsers.items()):
        parsers[event] = _guarded(event, parse)


def _guarded(event: str, parse: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(parse)
    def guarded(data: Any) -> None:
        try:
            parse(data)
        except Exception:
            logger.exception("Discord: could not read a %s gateway event; skipped it", event)

    return guarded


class _Hooks:
    """Client callbacks forwarded to the adapter (mixed into Client / AutoShardedClient)."""

    adapter: DiscordAdapter

    async def setup_hook(self) -> None:
        await self.adapter._on_setup()

    async def on_ready(self) -> None:
        self.adapter._on_ready()

    async def on_resumed(self) -> None:
        self.adapter._connected = True

    async def on_disconnect(self) -> None:
        self.adapter._connected = False

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

    def __init__(
        self,
        settings: Settings,
        commands: Sequence[CommandInfo],
        *,
        login_attempts: int = 4,
        login_backoff: float = 1.0,
    ) -> None:
        if settings.discord_token is None:
            raise ConfigError("DISCORD_TOKEN", "is not set")
        self._settings = settings
        self._commands = tuple(commands)
        self._login_attempts = login_attempts
        self._login_backoff = login_backoff
        self._handler: IncomingHandler | None = None
        self._client: discord.Client | None = None
        self._tree: app_commands.CommandTree[Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected = False
        self._recovered = asyncio.Event()
        """Clear from READY until the turns a restart left are queued: messages wait for
        it, so they are answered after the older turns of their conversations."""
        self._recovered.set()

    @property
    def in_flight(self) -> int:
        """Messages and slash commands being handled right now."""
        return len(self._tasks)

    @property
    def connected(self) -> bool:
        """Whether the gateway session is up (READY or RESUMED, not disconnected since)."""
        return self._connected and self._client is not None and not self._client.is_closed()

    def current_client(self) -> discord.Client | None:
        """The client of this run (None while not running): reply targets send through it."""
        return self._client

    def target_for(self, event: IncomingMessage) -> ReplyTarget:
        """The reply target for a message known only as the common event (a turn
        accepted before a restart): its channel, replying to it. Its sender counts as
        no chat admin (without the members intent Discord tells the bot a member's
        permissions only with their message); bot admins of ADMIN_IDS still are."""
        return MessageReplyTarget(
            self.current_client, int(event.chat_id), int(event.message_id), self._settings.discord_edit_interval
        )

    def _make_client(self) -> discord.Client:
        # A text bot: discord.py's warnings about missing voice libraries only confuse.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        options: dict[str, Any] = {
            "intents": make_intents(),
            "allowed_mentions": NO_MENTIONS,
            # Longer waits raise RateLimited: the core keeps that reply for later.
            "max_ratelimit_timeout": MAX_RATELIMIT_WAIT,
        }
        client: discord.Client
        if self._settings.discord_shard_count is not None:
            # discord.py's own split: with shard_ids this process connects only those shards.
            shard_ids = self._settings.discord_shard_ids
            if shard_ids is not None:
                options["shard_ids"] = list(shard_ids)
            client = _ShardedClient(self, shard_count=self._settings.discord_shard_count, **options)
        else:
            client = _Client(self, **options)
        self._tree = app_commands.CommandTree(client)
        build_command_tree(self._tree, self._commands, self._on_slash_command)
        guard_parsers(client)
        return client

    async def run(self, handler: IncomingHandler) -> None:
        """Serve Discord until cancelled. Raises `ConfigError` for a rejected token, a
        missing intent, or an API that stays unreachable at start-up."""
        apply_endpoints(self._settings.discord_api_base, self._settings.discord_gateway_url)
        self._handler = handler
        try:
            client = await self._login()
            self._client = client
            try:
                await client.connect(reconnect=True)
            finally:
                await client.close()
        except discord.LoginFailure:
            raise ConfigError("DISCORD_TOKEN", "Discord rejected the token") from None
        except discord.PrivilegedIntentsRequired:
            raise ConfigError(
                "DISCORD_TOKEN",
                "the bot needs the Message Content intent: enable it in the Discord developer portal "
                "(your application → Bot → Privileged Gateway Intents)",
            ) from None
        finally:
            self._connected = False
            await self._stop_tasks()
            self._client = None

    async def _login(self) -> discord.Client:
        """A logged-in client (slash commands synced). An API that cannot be reached, or
        answers 5xx, is tried `login_attempts` times with backoff (a fresh client each
        time), then it is a `ConfigError` naming DISCORD_API_BASE."""
        assert self._settings.discord_token is not None
        token = self._settings.discord_token.get_secret_value()
        delay = self._login_backoff
        for attempt in range(1, self._login_attempts + 1):
            client = self._make_client()
            self._client = client  # for the setup hook (slash command sync)
            try:
                await client.login(token)
            except (aiohttp.ClientError, OSError, discord.DiscordServerError) as exc:
                await client.close()
                self._client = None
                detail = f"HTTP {exc.status}" if isinstance(exc, discord.DiscordServerError) else repr(exc)
                if attempt == self._login_attempts:
                    raise ConfigError(
                        "DISCORD_API_BASE",
                        f"cannot reach the Discord API at {self._settings.discord_api_base} ({detail})",
                    ) from None
                logger.warning(
                    "cannot reach the Discord API (%s); retry %d/%d in %g s",
                    detail,
                    attempt,
                    self._login_attempts - 1,
                    delay,
                )
                await asyncio.sleep(delay)
                delay *= 2
            except BaseException:
                await client.close()
                self._client = None
                raise
            else:
                return client
        raise AssertionError("unreachable: login_attempts must be at least 1")

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
        except Exception as exc:  # whatever the server answered: the bot runs on without them
            logger.warning(
                "could not sync the slash commands (%s: %s); text commands still work", type(exc).__name__, exc
            )
        else:
            logger.info("synced %d slash commands", len(synced))

    def _on_ready(self) -> None:
        self._connected = True
        client = self._client
        if client is not None and client.user is not None:
            logger.info(
                "connected to Discord as %s (id %s) in %d servers", client.user, client.user.id, len(client.guilds)
            )
        # A new session: the turns a restart (or a lost session) left unanswered.
        self._recovered.clear()
        self._spawn(self._recover(), "discord:recover")

    async def _recover(self) -> None:
        assert self._handler is not None
        try:
            await self._handler.recover("discord", self.target_for)
        except Exception:
            logger.exception("recovering the turns left by a restart failed")
        finally:
            self._recovered.set()

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
        author = message.author
        target = MessageReplyTarget(
            self.current_client,
            message.channel.id,
            message.id,
            self._settings.discord_edit_interval,
            chat_admin=isinstance(author, discord.Member) and author.guild_permissions.manage_guild,
        )
        await self._recovered.wait()
        try:
            if message.attachments:
                with delivery_errors("read an attachment", message.channel.id):
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
        target = InteractionReplyTarget(self.current_client, interaction, self._settings.discord_edit_interval)
        try:
            with delivery_errors("acknowledge a slash command", interaction.channel_id):
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
