"""Where the bot's answers go: a reply to a message, or the ephemeral answer to a slash
command, and Discord's refusals turned into `DeliveryError`.

Nothing the bot sends may ping anyone: every send and edit passes `NO_MENTIONS`
(also the client's default), so a model writing "@everyone" or "<@123>" shows text,
not a notification.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import discord

from bot.errors import DeliveryError

logger = logging.getLogger(__name__)

MAX_CHARS = 2000
NO_MENTIONS = discord.AllowedMentions.none()
ORIGINAL_RESPONSE = "@original"
"""The message id `InteractionReplyTarget.send` returns for the interaction's own response."""


@contextlib.contextmanager
def delivery_errors(what: str, channel_id: int | None) -> Iterator[None]:
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


class _ClientTarget:
    """What both reply targets share: Discord's length limit, the edit interval, and no
    sending once the connection is closed."""

    max_chars = MAX_CHARS

    def __init__(self, client: discord.Client, edit_interval: float) -> None:
        self._client = client
        self._edit_interval = edit_interval

    @property
    def edit_interval(self) -> float:
        return self._edit_interval

    def _check_open(self) -> None:
        if self._client.is_closed():
            raise DeliveryError("the Discord connection is closed")


class MessageReplyTarget(_ClientTarget):
    """Replies to one Discord message: the first part replies to it (without pinging
    the author), further parts follow in the channel."""

    def __init__(self, client: discord.Client, message: discord.Message, edit_interval: float) -> None:
        super().__init__(client, edit_interval)
        self._message = message
        self._channel = message.channel
        self._sent: dict[str, discord.Message] = {}

    async def send(self, text: str) -> str:
        self._check_open()
        with delivery_errors("send a message", self._channel.id):
            if not self._sent:
                sent = await self._message.reply(text, mention_author=False, allowed_mentions=NO_MENTIONS)
            else:
                sent = await self._channel.send(text, allowed_mentions=NO_MENTIONS)
        self._sent[str(sent.id)] = sent
        return str(sent.id)

    async def edit(self, message_id: str, text: str) -> None:
        self._check_open()
        with delivery_errors("edit a message", self._channel.id):
            self._sent[message_id] = await self._sent[message_id].edit(content=text, allowed_mentions=NO_MENTIONS)

    async def typing(self) -> None:
        self._check_open()
        with delivery_errors("show typing", self._channel.id):
            await self._channel.typing()  # awaited once: one POST /typing (~10 s)

    async def sender_is_chat_admin(self) -> bool:
        author = self._message.author
        return isinstance(author, discord.Member) and author.guild_permissions.manage_guild


class InteractionReplyTarget(_ClientTarget):
    """Answers a slash command ephemerally: the deferred response is the first message,
    followups carry the rest of a long answer."""

    def __init__(self, client: discord.Client, interaction: discord.Interaction[Any], edit_interval: float) -> None:
        super().__init__(client, edit_interval)
        self._interaction = interaction
        self._used_original = False

    @property
    def answered(self) -> bool:
        """Whether the deferred response got its content."""
        return self._used_original

    async def send(self, text: str) -> str:
        self._check_open()
        with delivery_errors("answer a slash command", self._interaction.channel_id):
            if not self._used_original:
                await self._interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS)
                self._used_original = True
                return ORIGINAL_RESPONSE
            sent = await self._interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS, wait=True)
        return str(sent.id)

    async def edit(self, message_id: str, text: str) -> None:
        self._check_open()
        with delivery_errors("edit a slash command answer", self._interaction.channel_id):
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
