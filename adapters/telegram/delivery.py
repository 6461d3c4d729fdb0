"""Replies to Telegram: the reply target of one incoming message, and what all of them share.

Bot API calls are retried below this, by the bot's rate limiter
(`adapters.telegram.rate_limiter`); here the errors that are left become
`DeliveryError`, and a group upgraded to a supergroup is followed to its new chat.

Which `DeliveryError`s are permanent: a chat that is gone or refuses the bot (403,
400 "chat not found", a deleted message) never takes the reply. Flood waits longer
than the policy's limit, 5xx answers after the retries, timeouts and network failures
are not permanent: the core keeps the reply and delivers it later. Sends get a
generous read timeout (`DeliveryChannel.send_timeout`, 30 s): a send whose answer
timed out is never repeated at once (it may have arrived); with a long timeout that
takes a Telegram that is really in trouble.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from telegram import Bot, Message, ReplyParameters
from telegram.constants import ChatAction, ChatMemberStatus, ChatType
from telegram.error import BadRequest, ChatMigrated, Forbidden, NetworkError, RetryAfter, TelegramError, TimedOut

from adapters.telegram.rate_limiter import answered_by_server, retry_after_seconds
from adapters.telegram.transport import NotSent
from bot.errors import DeliveryError
from bot.events import IncomingMessage

logger = logging.getLogger(__name__)

T = TypeVar("T")

TELEGRAM_MAX_CHARS = 4096
TELEGRAM_MAX_CAPTION = 1024
SEND_TIMEOUT = 30.0
ADMIN_STATUSES = frozenset({ChatMemberStatus.OWNER, ChatMemberStatus.ADMINISTRATOR})
_NOT_MODIFIED = "message is not modified"
_GONE = ("chat not found", "message to edit not found", "message to be replied not found", "thread not found")


def delivery_error(what: str, exc: TelegramError) -> DeliveryError:
    """The `DeliveryError` for a Bot API call `what` that failed for good with `exc`:
    permanent or not, and the failure's kind (for metrics)."""
    if isinstance(exc, RetryAfter):
        return DeliveryError(
            f"{what}: flood control, retry after {retry_after_seconds(exc):g} s", permanent=False, kind="rate_limited"
        )
    notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
    detail = f"{what}: {exc.message}{notes}"
    if isinstance(exc, Forbidden):
        return DeliveryError(detail, permanent=True, kind="forbidden")
    if isinstance(exc, BadRequest):
        gone = any(text in exc.message.lower() for text in _GONE)
        return DeliveryError(detail, permanent=True, kind="not_found" if gone else "bad_request")
    if isinstance(exc, TimedOut):
        return DeliveryError(detail, permanent=False, kind="timeout")
    if isinstance(exc, NotSent):
        return DeliveryError(detail, permanent=False, kind="network")
    if isinstance(exc, NetworkError):
        kind = "server_error" if answered_by_server(exc) else "network"
        return DeliveryError(detail, permanent=False, kind=kind)
    return DeliveryError(detail, permanent=True, kind="other")


@dataclass(slots=True)
class _AdminCache:
    """Chat-admin lookups (`getChatMember`), remembered for `ttl` seconds."""

    ttl: float
    entries: dict[tuple[int, int], tuple[float, bool]] = field(default_factory=dict)

    def get(self, chat_id: int, user_id: int) -> bool | None:
        entry = self.entries.get((chat_id, user_id))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, chat_id: int, user_id: int, is_admin: bool) -> None:
        now = time.monotonic()
        if len(self.entries) > 10_000:
            self.entries = {k: v for k, v in self.entries.items() if v[0] >= now}
        self.entries[(chat_id, user_id)] = (now + self.ttl, is_admin)


class DeliveryChannel:
    """The running bot that every reply target of one adapter sends through, with the
    admin cache they share. It outlives one run of the adapter: `close` it when the
    adapter stops, so late replies fail as a non-permanent `DeliveryError` instead of
    reaching a bot that is shutting down, and `attach` the new bot when it runs again,
    so the targets of turns still in progress (or kept to be delivered later) work again."""

    def __init__(
        self, bot: Bot | None, *, edit_interval: float, admin_cache_ttl: float, send_timeout: float = SEND_TIMEOUT
    ) -> None:
        self._bot = bot
        self.edit_interval = edit_interval
        self.send_timeout = send_timeout
        self.admins = _AdminCache(admin_cache_ttl)

    def bot_for(self, what: str) -> Bot:
        """The bot, to make the Bot API call `what`; `DeliveryError` while closed."""
        if self._bot is None:
            raise DeliveryError(f"{what}: the Telegram adapter has stopped", permanent=False, kind="stopped")
        return self._bot

    def attach(self, bot: Bot) -> None:
        self._bot = bot

    def close(self) -> None:
        self._bot = None


@dataclass(frozen=True, slots=True)
class ReplyAddress:
    """Where the reply to one message goes, and whose message it answers."""

    chat_id: int
    user_id: int
    is_private: bool
    reply_to: int | None = None  # the message quoted (in groups)
    thread_id: int | None = None  # the forum topic
    sender_chat_id: int | None = None  # the chat the message was sent as (anonymous admins)

    @classmethod
    def of(cls, message: Message) -> ReplyAddress:
        is_private = message.chat.type == ChatType.PRIVATE
        return cls(
            chat_id=message.chat.id,
            user_id=message.from_user.id if message.from_user is not None else 0,
            is_private=is_private,
            reply_to=None if is_private else message.message_id,
            thread_id=message.message_thread_id if message.is_topic_message else None,
            sender_chat_id=message.sender_chat.id if message.sender_chat is not None else None,
        )

    @classmethod
    def of_event(cls, event: IncomingMessage) -> ReplyAddress:
        """The address of a message known only as the common event (a turn recovered
        after a restart). A forum topic's chat id is ``"<chat id>/<topic id>"``."""
        chat_id = int(event.chat_id.partition("/")[0])
        return cls(
            chat_id=chat_id,
            user_id=int(event.user_id),
            is_private=event.is_private,
            reply_to=None if event.is_private else int(event.message_id),
            thread_id=int(event.thread_id) if event.thread_id is not None else None,
        )


class TelegramReplyTarget:
    """`bot.ports.ReplyTarget` for one incoming Telegram message.

    In groups the reply quotes the user's message (still sent if that was deleted).
    """

    def __init__(self, channel: DeliveryChannel, address: ReplyAddress) -> None:
        self._channel = channel
        self._address = address

    @property
    def max_chars(self) -> int:
        return TELEGRAM_MAX_CHARS

    @property
    def edit_interval(self) -> float:
        return self._channel.edit_interval

    async def _call(self, what: str, request: Callable[[Bot, int], Awaitable[T]]) -> T:
        """`request(bot, chat_id)`; once more in the new chat if the group was upgraded
        to a supergroup meanwhile. Errors left after the retries become `DeliveryError`."""
        bot = self._channel.bot_for(what)
        chat_id = self._address.chat_id
        try:
            try:
                return await request(bot, chat_id)
            except ChatMigrated as exc:
                logger.info("Telegram: chat %s is now supergroup %s; %s goes there", chat_id, exc.new_chat_id, what)
                self._address = replace(self._address, chat_id=exc.new_chat_id)
                return await request(bot, exc.new_chat_id)
        except TelegramError as exc:
            raise delivery_error(what, exc) from exc

    def _reply_parameters(self) -> ReplyParameters | None:
        quoted = self._address.reply_to
        return ReplyParameters(quoted, allow_sending_without_reply=True) if quoted is not None else None

    async def send(self, text: str) -> str:
        thread_id = self._address.thread_id
        reply = self._reply_parameters()
        timeout = self._channel.send_timeout

        async def request(bot: Bot, chat_id: int) -> Message:
            return await bot.send_message(
                chat_id, text, reply_parameters=reply, message_thread_id=thread_id, read_timeout=timeout
            )

        message = await self._call("sendMessage", request)
        return str(message.message_id)

    async def send_file(self, filename: str, data: bytes, caption: str) -> str:
        thread_id = self._address.thread_id
        reply = self._reply_parameters()
        timeout = self._channel.send_timeout

        async def request(bot: Bot, chat_id: int) -> Message:
            return await bot.send_document(
                chat_id,
                data,
                filename=filename,
                caption=caption[:TELEGRAM_MAX_CAPTION] or None,
                reply_parameters=reply,
                message_thread_id=thread_id,
                read_timeout=timeout,
                write_timeout=timeout,
            )

        message = await self._call("sendDocument", request)
        return str(message.message_id)

    async def edit(self, message_id: str, text: str) -> None:
        async def request(bot: Bot, chat_id: int) -> None:
            try:
                await bot.edit_message_text(text, chat_id=chat_id, message_id=int(message_id))
            except BadRequest as exc:
                if _NOT_MODIFIED not in exc.message.lower():
                    raise

        await self._call("editMessageText", request)

    async def typing(self) -> None:
        thread_id = self._address.thread_id

        async def request(bot: Bot, chat_id: int) -> bool:
            return await bot.send_chat_action(chat_id, ChatAction.TYPING, message_thread_id=thread_id)

        await self._call("sendChatAction", request)

    async def sender_is_chat_admin(self) -> bool:
        address = self._address
        if address.is_private:
            return False
        if address.sender_chat_id == address.chat_id:
            return True  # an anonymous admin writing as the group itself
        cached = self._channel.admins.get(address.chat_id, address.user_id)
        if cached is not None:
            return cached
        self._channel.bot_for("getChatMember")  # a stopped adapter fails, it does not say "not an admin"

        async def request(bot: Bot, chat_id: int) -> bool:
            member = await bot.get_chat_member(chat_id, address.user_id)
            return member.status in ADMIN_STATUSES

        try:
            is_admin = await self._call("getChatMember", request)
        except DeliveryError as exc:  # fail closed: not known to be an admin
            logger.warning("Telegram: cannot check admin status in chat %s: %s", self._address.chat_id, exc)
            return False
        self._channel.admins.put(self._address.chat_id, address.user_id, is_admin)
        return is_admin
