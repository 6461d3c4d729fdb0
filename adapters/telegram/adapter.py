"""Telegram: python-telegram-bot's `Application` inside our event loop.

Long polling by default, a webhook when ``TELEGRAM_WEBHOOK_URL`` is set. Every update
is converted at the edge by the pure `to_event` and handled in a task of its own, so
one slow reply never holds up another chat. Replies are plain text (no parse mode:
the model's output can never break Telegram's parser); transient platform errors
are retried by one `RetryPolicy`, permanent ones become `DeliveryError`. HTTP goes
through `AiohttpRequest`, PTB's transport interface on aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dtm
import logging
import re
import secrets
import time
import urllib.request
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
from telegram import (
    Bot,
    BotCommand,
    BotCommandScopeAllChatAdministrators,
    BotCommandScopeChat,
    BotCommandScopeDefault,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction, ChatMemberStatus, ChatType
from telegram.error import (
    BadRequest,
    ChatMigrated,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)
from telegram.ext import Application, ApplicationBuilder, ContextTypes, TypeHandler
from telegram.request import BaseRequest, RequestData

from bot.config import Settings
from bot.errors import ConfigError, DeliveryError
from bot.events import IncomingMessage
from bot.ports import CommandInfo, IncomingHandler

logger = logging.getLogger(__name__)

T = TypeVar("T")

TELEGRAM_MAX_CHARS = 4096
NON_TEXT_REPLY = "I can only read text messages."
ADMIN_STATUSES = frozenset({ChatMemberStatus.OWNER, ChatMemberStatus.ADMINISTRATOR})
COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")
COMMAND_DESCRIPTION_MAX = 256
ALLOWED_UPDATES = (Update.MESSAGE,)
_NOT_MODIFIED = "message is not modified"
# Loggers that print Bot API URLs, which hold the token: PTB's bot (at DEBUG), and
# httpx, PTB's default transport, should anything in the process use it.
_URL_LOGGERS = ("telegram.Bot", "telegram.ext.ExtBot", "httpx")

PTBApplication = Application[Any, Any, Any, Any, Any, Any]


# --------------------------------------------------------------------------- the edge


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _join_around_gap(left: str, right: str) -> str:
    """Glue the text on both sides of a removed mention without leaving a double space."""
    if not left.strip():  # the mention opened the message: "@bot, hi" -> "hi"
        return left + right.lstrip(" \t,:;")
    if left[-1] in " \t" and right[:1] in (" ", "\t"):
        return left + right.lstrip(" \t")
    if left[-1] in " \t" and right[:1] in (",", ".", "!", "?", ";", ":"):
        return left.rstrip(" \t") + right
    return left + right


def _remove_spans(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """Remove `(offset, length)` spans given in UTF-16 code units, as Telegram counts."""
    data = text.encode("utf-16-le")
    out = ""
    position = 0
    for offset, length in sorted(spans):
        out = _join_around_gap(out, data[position * 2 : offset * 2].decode("utf-16-le"))
        position = max(position, offset + length)
    return _join_around_gap(out, data[position * 2 :].decode("utf-16-le"))


def to_event(message: Message, bot_username: str, bot_id: int) -> IncomingMessage | None:
    """The common event for a Telegram message, or None when the bot should not answer.

    Private chats: every text message. Groups: only a mention of the bot (stripped from
    the text), a reply to one of the bot's messages, or a command at the start of the
    message (``/cmd@thisbot`` becomes ``/cmd``; ``/cmd@otherbot`` is not for us).
    Messages without text (photos, stickers, ...) give None. In a forum, each topic is
    its own chat (``"<chat id>/<topic id>"``), so its conversations are separate.
    """
    text = message.text
    user = message.from_user
    if text is None or user is None or message.chat.type == ChatType.CHANNEL:
        return None
    username = bot_username.lstrip("@").lower()
    is_private = message.chat.type == ChatType.PRIVATE
    mentioned = is_command = False
    mention_spans: list[tuple[int, int]] = []
    suffix_spans: list[tuple[int, int]] = []
    for entity in message.entities:
        if entity.type == MessageEntity.MENTION:
            if message.parse_entity(entity)[1:].lower() == username:
                mentioned = True
                mention_spans.append((entity.offset, entity.length))
        elif entity.type == MessageEntity.TEXT_MENTION:
            if entity.user is not None and entity.user.id == bot_id:
                mentioned = True
                mention_spans.append((entity.offset, entity.length))
        elif entity.type == MessageEntity.BOT_COMMAND and entity.offset == 0:
            name, at, addressee = message.parse_entity(entity).partition("@")
            if at and addressee.lower() != username:
                return None  # a command for another bot in the same chat
            is_command = True
            if at:
                suffix_spans.append((_utf16_len(name), _utf16_len(at + addressee)))
    replied = message.reply_to_message
    # In forum topics every message "replies" to the topic's creation message.
    replies_to_bot = (
        replied is not None
        and replied.forum_topic_created is None
        and replied.from_user is not None
        and replied.from_user.id == bot_id
    )
    if not (is_private or mentioned or replies_to_bot or is_command):
        return None
    if mention_spans:
        text = _remove_spans(text, mention_spans + suffix_spans).strip()
    elif suffix_spans:
        text = _remove_spans(text, suffix_spans)
    chat_id = str(message.chat.id)
    if message.is_topic_message and message.message_thread_id is not None:
        chat_id += f"/{message.message_thread_id}"  # a forum topic is a chat of its own
    return IncomingMessage(
        platform="telegram",
        chat_id=chat_id,
        user_id=str(user.id),
        display_name=user.full_name or user.username or str(user.id),
        message_id=str(message.message_id),
        text=text,
        is_private=is_private,
        timestamp=message.date,
    )


def is_unreadable_media(message: Message) -> bool:
    """A photo, sticker, voice note, document, ... rather than text or a service message."""
    return message.text is None and (message.effective_attachment is not None or message.caption is not None)


def menu_commands(commands: Sequence[CommandInfo]) -> tuple[list[BotCommand], list[BotCommand]]:
    """The menus for everyone and for admins, keeping only names Telegram accepts."""
    everyone: list[BotCommand] = []
    admins: list[BotCommand] = []
    for info in commands:
        if not COMMAND_NAME.fullmatch(info.name):
            logger.warning("Telegram: command /%s left out of the menu: not [a-z0-9_]{1,32}", info.name)
            continue
        description = (info.description.strip() or info.name)[:COMMAND_DESCRIPTION_MAX]
        command = BotCommand(info.name, description)
        admins.append(command)
        if not info.admin_only:
            everyone.append(command)
    return everyone, admins


# --------------------------------------------------------------------------- retries


def _retry_after_seconds(exc: RetryAfter) -> float:
    with warnings.catch_warnings():  # PTB 22 warns that the int form is deprecated
        warnings.simplefilter("ignore")
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How every Bot API call made for a reply is retried.

    Flood control (429) waits as long as Telegram says, up to `flood_attempts` times and
    `max_flood_wait` seconds; timeouts, network errors and 5xx are retried `attempts`
    times with exponential backoff; everything else is permanent and becomes
    `DeliveryError` at once.
    """

    attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0
    flood_attempts: int = 5
    max_flood_wait: float = 60.0

    def backoff(self, retry: int) -> float:
        """Seconds before transient retry number `retry` (1-based)."""
        return float(min(self.max_delay, self.base_delay * 2 ** (retry - 1)))

    async def call(self, what: str, request: Callable[[], Awaitable[T]]) -> T:
        """Run `request` until it succeeds, or raise `DeliveryError`."""
        transient = floods = 0
        while True:
            try:
                return await request()
            except RetryAfter as exc:
                wait = _retry_after_seconds(exc)
                floods += 1
                if floods > self.flood_attempts or wait > self.max_flood_wait:
                    raise DeliveryError(f"{what}: flood control, retry after {wait:g} s") from exc
                logger.warning("Telegram %s: flood control, retrying in %g s", what, wait)
                await asyncio.sleep(wait)
            except BadRequest as exc:  # before NetworkError, its base class
                raise DeliveryError(f"{what}: {exc.message}") from exc
            except NetworkError as exc:  # timeouts, connection failures, 5xx
                transient += 1
                if transient > self.attempts:
                    raise DeliveryError(f"{what}: {exc.message} (gave up after {self.attempts} retries)") from exc
                delay = self.backoff(transient)
                logger.warning(
                    "Telegram %s failed (%s); retry %d/%d in %g s", what, exc.message, transient, self.attempts, delay
                )
                await asyncio.sleep(delay)
            except TelegramError as exc:  # Forbidden, ChatMigrated, InvalidToken, ...
                raise DeliveryError(f"{what}: {exc.message}") from exc


# --------------------------------------------------------------------------- HTTP


class AiohttpRequest(BaseRequest):
    """python-telegram-bot's HTTP transport on aiohttp instead of httpx.

    A documented extension point of PTB (`telegram.request.BaseRequest`). aiohttp is
    already a dependency and costs far less CPU per request than httpx, which matters
    because every reply is several Bot API calls made from the one event loop.
    Timeouts and failures map to PTB's `TimedOut` and `NetworkError` as its own
    transport does; proxies come from the usual environment variables (``HTTPS_PROXY``,
    ``NO_PROXY``, ...), read once at `initialize`.
    """

    def __init__(
        self,
        connection_pool_size: int = 256,
        *,
        read_timeout: float | None = 5.0,
        write_timeout: float | None = 5.0,
        connect_timeout: float | None = 5.0,
        pool_timeout: float | None = 1.0,
        on_unauthorized: Callable[[], None] | None = None,
    ) -> None:
        self._on_unauthorized = on_unauthorized
        self._pool_size = connection_pool_size
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[str, str] = {}
        self._proxy_for_host: dict[tuple[str, str], tuple[str, dict[str, str]] | None] = {}

    @property
    def read_timeout(self) -> float | None:
        return self._read_timeout

    async def initialize(self) -> None:
        if self._session is None or self._session.closed:
            self._proxies = urllib.request.getproxies_environment()
            self._proxy_for_host.clear()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size),
                headers={"User-Agent": self.USER_AGENT},
                # aiohttp's own trust_env re-reads the environment and ~/.netrc in a
                # thread on every request; the proxy is chosen here instead.
                trust_env=False,
                # PTB reads the body and handles every status itself.
                raise_for_status=False,
            )

    async def shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def proxy_for(self, url: str) -> tuple[str, dict[str, str]] | None:
        """The proxy the environment names for `url` and the headers it needs (its
        credentials), or None (also when NO_PROXY matches)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        key = (parts.scheme, host)
        if key not in self._proxy_for_host:
            found = None
            named = self._proxies.get(parts.scheme) or self._proxies.get("all")
            if host and named and not urllib.request.proxy_bypass(host):
                proxy = urlsplit(named)
                headers = {}
                if proxy.username is not None:
                    credentials = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
                    headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
                netloc = proxy.netloc.rpartition("@")[2]  # credentials go in the header only
                found = (urlunsplit(proxy._replace(netloc=netloc)), headers)
            self._proxy_for_host[key] = found
        return self._proxy_for_host[key]

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = BaseRequest.DEFAULT_NONE,
        write_timeout: Any = BaseRequest.DEFAULT_NONE,
        connect_timeout: Any = BaseRequest.DEFAULT_NONE,
        pool_timeout: Any = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        session = self._session
        if session is None or session.closed:
            raise RuntimeError("This AiohttpRequest is not initialized!")
        connect = _seconds(connect_timeout, self._connect_timeout)
        pool = _seconds(pool_timeout, self._pool_timeout)
        # aiohttp has no write timeout; Bot API request bodies are small.
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None if connect is None or pool is None else connect + pool,  # incl. waiting for the pool
            sock_connect=connect,
            sock_read=_seconds(read_timeout, self._read_timeout),
        )
        data: aiohttp.FormData | dict[str, str] | None = None
        if request_data is not None:
            files = request_data.multipart_data
            if files:
                form = aiohttp.FormData()
                for name, value in request_data.json_parameters.items():
                    form.add_field(name, value)
                for name, (filename, content, mimetype) in files.items():
                    form.add_field(name, content, filename=filename, content_type=mimetype)
                data = form
            else:
                data = request_data.json_parameters
        proxy, proxy_headers = self.proxy_for(url) or (None, None)
        try:
            async with session.request(
                method, url, data=data, timeout=timeout, proxy=proxy, proxy_headers=proxy_headers
            ) as response:
                if response.status == 401 and self._on_unauthorized is not None:
                    self._on_unauthorized()  # the token no longer works
                return response.status, await response.read()
        except TimeoutError as exc:
            raise TimedOut from exc
        except aiohttp.ClientError as exc:
            detail = str(exc)
            if "/bot" in detail:  # some aiohttp errors quote the URL, and the URL holds the token
                detail = "request failed"
            raise NetworkError(f"aiohttp.{type(exc).__name__}: {detail}") from exc


def _seconds(value: Any, default: float | None) -> float | None:
    """A PTB timeout argument: its "not given" marker means the transport's default."""
    if isinstance(value, type(BaseRequest.DEFAULT_NONE)):
        return default
    return None if value is None else float(value)


# --------------------------------------------------------------------------- replies


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


@dataclass(slots=True)
class _Link:
    """What every reply target of one running adapter shares."""

    bot: Bot
    retry: RetryPolicy
    admins: _AdminCache
    edit_interval: float
    closed: bool = False


class TelegramReplyTarget:
    """`bot.ports.ReplyTarget` for one incoming Telegram message.

    In groups the reply quotes the user's message (still sent if that was deleted).
    """

    def __init__(
        self,
        link: _Link,
        *,
        chat_id: int,
        user_id: int,
        is_private: bool,
        reply_to: int | None = None,
        thread_id: int | None = None,
        sender_chat_id: int | None = None,
    ) -> None:
        self._link = link
        self._chat_id = chat_id
        self._user_id = user_id
        self._is_private = is_private
        self._reply_to = reply_to
        self._thread_id = thread_id
        self._sender_chat_id = sender_chat_id

    @classmethod
    def for_message(cls, link: _Link, message: Message) -> TelegramReplyTarget:
        is_private = message.chat.type == ChatType.PRIVATE
        return cls(
            link,
            chat_id=message.chat.id,
            user_id=message.from_user.id if message.from_user is not None else 0,
            is_private=is_private,
            reply_to=None if is_private else message.message_id,
            thread_id=message.message_thread_id if message.is_topic_message else None,
            sender_chat_id=message.sender_chat.id if message.sender_chat is not None else None,
        )

    @property
    def max_chars(self) -> int:
        return TELEGRAM_MAX_CHARS

    @property
    def edit_interval(self) -> float:
        return self._link.edit_interval

    async def _call(self, what: str, request: Callable[[], Awaitable[T]]) -> T:
        """`request` under the retry policy; once more in the new chat if the group
        was upgraded to a supergroup meanwhile (`request` reads `_chat_id` when run)."""
        try:
            return await self._link.retry.call(what, request)
        except DeliveryError as exc:
            if not isinstance(exc.__cause__, ChatMigrated):
                raise
            new_chat_id = exc.__cause__.new_chat_id
            logger.info("Telegram: chat %s is now supergroup %s; %s goes there", self._chat_id, new_chat_id, what)
            self._chat_id = new_chat_id
            return await self._link.retry.call(what, request)

    def _check_open(self, what: str) -> Bot:
        if self._link.closed:
            raise DeliveryError(f"{what}: the Telegram adapter has stopped")
        return self._link.bot

    async def send(self, text: str) -> str:
        bot = self._check_open("sendMessage")
        reply = (
            ReplyParameters(self._reply_to, allow_sending_without_reply=True) if self._reply_to is not None else None
        )

        async def request() -> Message:
            return await bot.send_message(
                self._chat_id, text, reply_parameters=reply, message_thread_id=self._thread_id
            )

        message = await self._call("sendMessage", request)
        return str(message.message_id)

    async def edit(self, message_id: str, text: str) -> None:
        bot = self._check_open("editMessageText")

        async def request() -> None:
            try:
                await bot.edit_message_text(text, chat_id=self._chat_id, message_id=int(message_id))
            except BadRequest as exc:
                if _NOT_MODIFIED not in exc.message.lower():
                    raise

        await self._call("editMessageText", request)

    async def typing(self) -> None:
        bot = self._check_open("sendChatAction")

        async def request() -> bool:
            return await bot.send_chat_action(self._chat_id, ChatAction.TYPING, message_thread_id=self._thread_id)

        await self._call("sendChatAction", request)

    async def sender_is_chat_admin(self) -> bool:
        if self._is_private:
            return False
        if self._sender_chat_id == self._chat_id:
            return True  # an anonymous admin writing as the group itself
        cached = self._link.admins.get(self._chat_id, self._user_id)
        if cached is not None:
            return cached
        bot = self._check_open("getChatMember")

        async def request() -> bool:
            member = await bot.get_chat_member(self._chat_id, self._user_id)
            return member.status in ADMIN_STATUSES

        try:
            is_admin = await self._call("getChatMember", request)
        except DeliveryError as exc:  # fail closed: not known to be an admin
            logger.warning("Telegram: cannot check admin status in chat %s: %s", self._chat_id, exc)
            return False
        self._link.admins.put(self._chat_id, self._user_id, is_admin)
        return is_admin


# --------------------------------------------------------------------------- the adapter


class _RedactToken(logging.Filter):
    """Replaces the bot token in log messages (PTB logs its API URL at DEBUG)."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.token in message:
            record.msg = message.replace(self.token, "<TELEGRAM_TOKEN>")
            record.args = None
        return True


def _hide_token(token: str) -> None:
    """Redact the token wherever a Bot API URL is logged."""
    for name in _URL_LOGGERS:
        url_logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactToken) and f.token == token for f in url_logger.filters):
            url_logger.addFilter(_RedactToken(token))


class TelegramAdapter:
    """The Telegram connection (`bot.ports.Adapter`).

    `run` serves until cancelled. On cancellation it stops receiving updates, gives the
    replies in progress `shutdown_grace` seconds to finish, cancels the rest, and
    closes the connection.
    """

    name = "telegram"

    def __init__(
        self,
        settings: Settings,
        commands: Sequence[CommandInfo],
        *,
        retry: RetryPolicy | None = None,
        poll_timeout: float = 30.0,
        admin_cache_ttl: float = 60.0,
        shutdown_grace: float = 3.0,
        request_timeout: float = 5.0,
    ) -> None:
        if settings.telegram_token is None:
            raise ConfigError("TELEGRAM_TOKEN", "is not set")
        self._settings = settings
        self._commands = tuple(commands)
        self._retry = retry or RetryPolicy()
        self._poll_timeout = poll_timeout
        self._admin_cache_ttl = admin_cache_ttl
        self._shutdown_grace = shutdown_grace
        self._request_timeout = request_timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self._handler: IncomingHandler | None = None
        self._link: _Link | None = None
        self._username = ""
        self._bot_id = 0
        self._unauthorized = asyncio.Event()
        self.started = asyncio.Event()
        """Set once updates are being received (for tests and health checks)."""
        _hide_token(settings.telegram_token.get_secret_value())

    @property
    def username(self) -> str:
        """The bot's @username (known once `run` has connected)."""
        return self._username

    # ------------------------------------------------------------------ lifecycle

    async def run(self, handler: IncomingHandler) -> None:
        """Serve Telegram until cancelled. Raises `ConfigError` when the token is
        rejected, at start-up or later."""
        self._handler = handler
        self._unauthorized.clear()
        app = self._build_application()
        await self._initialize(app)
        # What `async with app:` does, with the start-up errors told apart above.
        try:
            self._username = app.bot.username
            self._bot_id = app.bot.id
            self._link = _Link(
                app.bot,
                self._retry,
                _AdminCache(self._admin_cache_ttl),
                self._settings.telegram_edit_interval,
            )
            await self._register_commands(app.bot)
            await app.start()
            try:
                mode = await self._start_updates(app)
                logger.info("Telegram: serving as @%s (%s)", self._username, mode)
                self.started.set()
                # Until cancelled, or until Telegram refuses the token (revoked in
                # @BotFather): PTB would only log that and stop polling for good.
                await self._unauthorized.wait()
                raise ConfigError(
                    "TELEGRAM_TOKEN", "Telegram no longer accepts the token (revoked or replaced in @BotFather?)"
                )
            finally:
                await self._stop(app)
        finally:
            self.started.clear()
            await app.shutdown()

    def _build_application(self) -> PTBApplication:
        token = self._settings.telegram_token
        assert token is not None  # checked in __init__
        base = self._settings.telegram_api_base
        app: PTBApplication = (
            ApplicationBuilder()
            .token(token.get_secret_value())
            .base_url(f"{base}/bot")
            .base_file_url(f"{base}/file/bot")
            .request(self._transport(256))
            .get_updates_request(self._transport(1))
            .concurrent_updates(True)
            .job_queue(None)
            .build()
        )
        app.add_handler(TypeHandler(Update, self._on_update))
        app.add_error_handler(self._on_error)
        return app

    def _transport(self, pool_size: int) -> AiohttpRequest:
        timeout = self._request_timeout
        return AiohttpRequest(
            pool_size,
            read_timeout=timeout,
            write_timeout=timeout,
            connect_timeout=timeout,
            on_unauthorized=self._unauthorized.set,
        )

    async def _initialize(self, app: PTBApplication) -> None:
        """`getMe` (through `app.initialize`), retried on network errors."""
        for attempt in range(self._retry.attempts + 1):
            try:
                await app.initialize()
                return
            except InvalidToken:
                await app.bot.shutdown()
                # PTB's message repeats the token: never log it.
                raise ConfigError("TELEGRAM_TOKEN", "Telegram rejected the token (check it with @BotFather)") from None
            except NetworkError as exc:
                if attempt == self._retry.attempts:
                    await app.bot.shutdown()
                    raise ConfigError(
                        "TELEGRAM_API_BASE", f"cannot reach the Telegram Bot API: {exc.message}"
                    ) from None
                delay = self._retry.backoff(attempt + 1)
                logger.warning("Telegram: connecting failed (%s); retrying in %g s", exc.message, delay)
                await asyncio.sleep(delay)

    async def _register_commands(self, bot: Bot) -> None:
        """The command menu: everyone sees the public commands; chat admins and the
        bot admins of `ADMIN_IDS` (in their private chat with the bot) see them all."""
        everyone, admins = menu_commands(self._commands)
        menus: list[tuple[str, list[BotCommand], Any]] = [
            ("everyone", everyone, BotCommandScopeDefault()),
            ("chat admins", admins, BotCommandScopeAllChatAdministrators()),
        ]
        for entry in sorted(self._settings.admin_ids):
            platform, _, user_id = entry.partition(":")
            if platform == "telegram" and user_id.lstrip("-").isdigit():
                menus.append((f"admin {user_id}", admins, BotCommandScopeChat(int(user_id))))
        for who, menu, scope in menus:
            if not menu:
                continue

            async def request(menu: list[BotCommand] = menu, scope: Any = scope) -> bool:
                return await bot.set_my_commands(menu, scope=scope)

            try:
                await self._retry.call("setMyCommands", request)
            except DeliveryError as exc:  # e.g. an admin who never opened a chat with the bot
                logger.warning("Telegram: command menu for %s not set: %s", who, exc)

    async def _start_updates(self, app: PTBApplication) -> str:
        updater = app.updater
        assert updater is not None  # ApplicationBuilder always makes one unless told not to
        url = self._settings.telegram_webhook_url
        if url:
            secret = self._settings.telegram_webhook_secret
            await updater.start_webhook(
                listen=self._settings.telegram_webhook_listen,
                port=self._settings.telegram_webhook_port,
                url_path=urlsplit(url).path.lstrip("/"),
                webhook_url=url,
                # Without a configured secret a random one still keeps strangers out.
                secret_token=secret.get_secret_value() if secret is not None else secrets.token_urlsafe(32),
                allowed_updates=ALLOWED_UPDATES,
            )
            return "webhook"
        await updater.start_polling(
            timeout=dtm.timedelta(seconds=self._poll_timeout),
            allowed_updates=ALLOWED_UPDATES,
            error_callback=self._on_polling_error,
        )
        return "long polling"

    async def _stop(self, app: PTBApplication) -> None:
        """Stop receiving, let replies in progress finish briefly, then close."""
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self._shutdown_grace)
            for task in pending:
                task.cancel()
            if pending:
                logger.info("Telegram: cancelled %d replies still in progress", len(pending))
                await asyncio.wait(pending)
        if self._link is not None:
            self._link.closed = True
        if app.running:
            await app.stop()

    # ------------------------------------------------------------------ updates

    async def _on_update(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        if isinstance(update, Update):
            self._spawn(self._process(update), f"telegram:update:{update.update_id}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(self, update: Update) -> None:
        message = update.message
        if message is None:  # edited messages, channel posts, ...
            logger.debug("Telegram: ignoring update %s without a new message", update.update_id)
            return
        assert self._link is not None and self._handler is not None
        if message.migrate_from_chat_id is not None or message.migrate_to_chat_id is not None:
            # Both sides of a group's upgrade to a supergroup arrive; moving twice is harmless.
            old, new = (
                (message.migrate_from_chat_id, message.chat.id)
                if message.migrate_from_chat_id is not None
                else (message.chat.id, message.migrate_to_chat_id)
            )
            await self._handler.move_chat("telegram", str(old), str(new))
            return
        target = TelegramReplyTarget.for_message(self._link, message)
        try:
            event = to_event(message, self._username, self._bot_id)
            if event is not None:
                await self._handler.handle(event, target)
            elif message.chat.type == ChatType.PRIVATE and is_unreadable_media(message):
                await target.send(NON_TEXT_REPLY)
        except DeliveryError as exc:
            logger.warning("Telegram: reply in chat %s not delivered: %s", message.chat.id, exc)
        except Exception:
            logger.exception("Telegram: handling update %s failed", update.update_id)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        logger.error("Telegram: error while dispatching an update", exc_info=context.error)

    @staticmethod
    def _on_polling_error(exc: TelegramError) -> None:
        logger.warning("Telegram: fetching updates failed: %s", exc.message)
