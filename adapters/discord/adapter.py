"""Discord: a discord.py client that turns messages and slash commands into the core's
events, and streams replies back as messages edited in place.

The bot answers every direct message; in server channels and threads it answers when
@mentioned or when a message replies to one of its own (`events.py`), with its text
attachments read into it (`attachments.py`). Slash commands are mapped onto the text
commands the core parses (`slash.py`). Replies go out through `delivery.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

import discord
import yarl
from discord import app_commands

from adapters.discord.attachments import read_text_attachments
from adapters.discord.delivery import NO_MENTIONS, InteractionReplyTarget, MessageReplyTarget, delivery_errors
from adapters.discord.events import interaction_to_event, to_event
from adapters.discord.slash import build_command_tree
from bot.config import Settings
from bot.errors import BotError, ConfigError, DeliveryError
from bot.events import IncomingMessage
from bot.ports import CommandInfo, IncomingHandler

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
            # discord.py's own split: with shard_ids this process connects only those shards.
            shard_ids = self._settings.discord_shard_ids
            if shard_ids is not None:
                options["shard_ids"] = list(shard_ids)
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
        target = InteractionReplyTarget(client, interaction, self._settings.discord_edit_interval)
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
