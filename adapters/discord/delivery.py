"""Where the bot's answers go: a reply to a message, or the ephemeral answer to a slash
command, and Discord's refusals turned into `DeliveryError`.

Nothing the bot sends may ping anyone: every send and edit passes `NO_MENTIONS`
(also the client's default), so a model writing "@everyone" or "<@123>" shows text,
not a notification.

Failures and retries: discord.py waits out rate limits up to the client's
`max_ratelimit_timeout` (60 s; a longer wait raises `RateLimited`) and retries 5xx
answers and reset connections itself. Every message the bot creates carries a
nonce that Discord enforces, so such a retry of a send that did arrive never shows
it twice. What is left becomes a `DeliveryError`: permanent for a channel or message
that is gone or forbidden and for a request Discord refuses (4xx); not permanent for
a long rate limit, 5xx, timeouts and network failures (the core keeps the reply and
delivers it later). Reply targets find the client when they send, so a target made
before the adapter restarted sends through the new connection.
"""

from __future__ import annotations

import contextlib
import io
import logging
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import discord

from bot.errors import DeliveryError

logger = logging.getLogger(__name__)

MAX_CHARS = 2000
MAX_RATELIMIT_WAIT = 60.0
NO_MENTIONS = discord.AllowedMentions.none()
ORIGINAL_RESPONSE = "@original"
"""The message id `InteractionReplyTarget.send` returns for the interaction's own response."""

ClientRef = Callable[[], discord.Client | None]
"""The adapter's client right now (None while it is not running)."""


@contextlib.contextmanager
def delivery_errors(what: str, channel_id: int | None) -> Iterator[None]:
    """Turn Discord's refusals into `DeliveryError` (permanent or not, and its kind)."""
    try:
        yield
    except discord.Forbidden as exc:
        logger.warning("no permission to %s in channel %s: %s", what, channel_id, exc.text)
        raise DeliveryError(f"forbidden to {what} in channel {channel_id}", kind="forbidden") from exc
    except discord.NotFound as exc:
        logger.info("could not %s in channel %s, gone: %s", what, channel_id, exc.text)
        raise DeliveryError(f"{what}: not found in channel {channel_id}", kind="not_found") from exc
    except discord.HTTPException as exc:
        logger.warning("Discord refused to %s in channel %s: %s %s", what, channel_id, exc.status, exc.text)
        server_side = exc.status >= 500
        raise DeliveryError(
            f"{what} failed with HTTP {exc.status} in channel {channel_id}",
            permanent=not server_side,
            kind="server_error" if server_side else "bad_request",
        ) from exc
    except discord.RateLimited as exc:
        logger.warning("Discord rate limit for %s in channel %s: %.0f s", what, channel_id, exc.retry_after)
        raise DeliveryError(
            f"{what}: rate limited for {exc.retry_after:.0f} s in channel {channel_id}",
            permanent=False,
            kind="rate_limited",
        ) from exc
    except TimeoutError as exc:
        logger.warning("Discord did not answer in time to %s in channel %s", what, channel_id)
        raise DeliveryError(f"{what}: timed out", permanent=False, kind="timeout") from exc
    except (aiohttp.ClientError, OSError) as exc:
        logger.warning("could not reach Discord to %s in channel %s: %r", what, channel_id, exc)
        raise DeliveryError(f"{what}: {exc!r}", permanent=False, kind="network") from exc


def _nonce() -> str:
    """A nonce Discord enforces: a create-message repeated with it shows once."""
    return str(secrets.randbits(63))


class _ClientTarget:
    """What both reply targets share: Discord's length limit, the edit interval, and no
    sending while the adapter is not connected."""

    max_chars = MAX_CHARS

    def __init__(self, clients: ClientRef, edit_interval: float) -> None:
        self._clients = clients
        self._edit_interval = edit_interval

    @property
    def edit_interval(self) -> float:
        return self._edit_interval

    def _client(self) -> discord.Client:
        client = self._clients()
        if client is None or client.is_closed():
            raise DeliveryError("the Discord connection is closed", permanent=False, kind="stopped")
        return client


class MessageReplyTarget(_ClientTarget):
    """Replies to one Discord message, known by its channel and id: the first part
    replies to it (without pinging the author), further parts follow in the channel."""

    def __init__(
        self,
        clients: ClientRef,
        channel_id: int,
        message_id: int | None,
        edit_interval: float,
        *,
        chat_admin: bool = False,
    ) -> None:
        super().__init__(clients, edit_interval)
        self._channel_id = channel_id
        self._message_id = message_id
        self._chat_admin = chat_admin
        self._replied = False

    def _channel(self) -> discord.PartialMessageable:
        return self._client().get_partial_messageable(self._channel_id)

    def _reference(self) -> dict[str, Any]:
        """The reply reference for the first message of the reply."""
        if self._replied or self._message_id is None:
            return {}
        return {"reference": discord.MessageReference(message_id=self._message_id, channel_id=self._channel_id)}

    async def send(self, text: str) -> str:
        channel = self._channel()
        with delivery_errors("send a message", self._channel_id):
            sent = await channel.send(
                text, **self._reference(), mention_author=False, allowed_mentions=NO_MENTIONS, nonce=_nonce()
            )
        self._replied = True
        return str(sent.id)

    async def edit(self, message_id: str, text: str) -> None:
        channel = self._channel()
        with delivery_errors("edit a message", self._channel_id):
            await channel.get_partial_message(int(message_id)).edit(content=text, allowed_mentions=NO_MENTIONS)

    async def send_file(self, filename: str, data: bytes, caption: str) -> str:
        channel = self._channel()
        with delivery_errors("send a file", self._channel_id):
            sent = await channel.send(
                caption[:MAX_CHARS] or None,
                file=discord.File(io.BytesIO(data), filename=filename),
                **self._reference(),
                mention_author=False,
                allowed_mentions=NO_MENTIONS,
                nonce=_nonce(),
            )
        self._replied = True
        return str(sent.id)

    async def typing(self) -> None:
        channel = self._channel()
        with delivery_errors("show typing", self._channel_id):
            await channel.typing()  # awaited once: one POST /typing (~10 s)

    async def sender_is_chat_admin(self) -> bool:
        return self._chat_admin


class InteractionReplyTarget(_ClientTarget):
    """Answers a slash command ephemerally: the deferred response is the first message,
    followups carry the rest of a long answer."""

    def __init__(self, clients: ClientRef, interaction: discord.Interaction[Any], edit_interval: float) -> None:
        super().__init__(clients, edit_interval)
        self._interaction = interaction
        self._used_original = False

    @property
    def answered(self) -> bool:
        """Whether the deferred response got its content."""
        return self._used_original

    async def send(self, text: str) -> str:
        self._client()
        with delivery_errors("answer a slash command", self._interaction.channel_id):
            if not self._used_original:
                await self._interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS)
                self._used_original = True
                return ORIGINAL_RESPONSE
            sent = await self._interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS, wait=True)
        return str(sent.id)

    async def edit(self, message_id: str, text: str) -> None:
        self._client()
        with delivery_errors("edit a slash command answer", self._interaction.channel_id):
            if message_id == ORIGINAL_RESPONSE:
                await self._interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS)
            else:
                await self._interaction.followup.edit_message(
                    int(message_id), content=text, allowed_mentions=NO_MENTIONS
                )

    async def send_file(self, filename: str, data: bytes, caption: str) -> str:
        self._client()
        file = discord.File(io.BytesIO(data), filename=filename)
        with delivery_errors("send a file", self._interaction.channel_id):
            if not self._used_original:
                await self._interaction.edit_original_response(
                    content=caption[:MAX_CHARS] or None, attachments=[file], allowed_mentions=NO_MENTIONS
                )
                self._used_original = True
                return ORIGINAL_RESPONSE
            sent = await self._interaction.followup.send(
                caption[:MAX_CHARS] or discord.utils.MISSING,  # MISSING: a file without text
                file=file,
                ephemeral=True,
                allowed_mentions=NO_MENTIONS,
                wait=True,
            )
        return str(sent.id)

    async def typing(self) -> None:
        return None  # the deferred response already shows "thinking…"

    async def sender_is_chat_admin(self) -> bool:
        # Manage Server is a guild-level permission; channel overwrites cannot change it.
        return self._interaction.guild_id is not None and self._interaction.permissions.manage_guild
