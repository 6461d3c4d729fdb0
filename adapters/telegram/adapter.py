"""Telegram: python-telegram-bot's `Application` inside our event loop.

Long polling by default, a webhook when ``TELEGRAM_WEBHOOK_URL`` is set. Every update
is converted at the edge by the pure `to_event` and handled in a task of its own, so
one slow reply never holds up another chat. Replies are plain text (no parse mode:
the model's output can never break Telegram's parser) sent by `TelegramReplyTarget`;
transient platform errors are retried by `RetryingRateLimiter`, PTB's rate-limiter
extension point. HTTP goes through `AiohttpRequest`, PTB's transport interface on aiohttp.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import logging
import re
import secrets
from collections.abc import Coroutine, Sequence
from typing import Any
from urllib.parse import urlsplit

from telegram import (
    Bot,
    BotCommand,
    BotCommandScopeAllChatAdministrators,
    BotCommandScopeChat,
    BotCommandScopeDefault,
    Update,
)
from telegram.constants import ChatType
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import Application, ApplicationBuilder, ContextTypes, TypeHandler

from adapters.telegram.delivery import DeliveryChannel, ReplyAddress, TelegramReplyTarget, delivery_error
from adapters.telegram.events import is_unreadable_media, to_event
from adapters.telegram.rate_limiter import RetryingRateLimiter, RetryPolicy
from adapters.telegram.transport import AiohttpRequest
from bot.config import Settings
from bot.errors import ConfigError, DeliveryError
from bot.ports import CommandInfo, IncomingHandler

logger = logging.getLogger(__name__)

NON_TEXT_REPLY = "I can only read text messages."
COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")
COMMAND_DESCRIPTION_MAX = 256
ALLOWED_UPDATES = (Update.MESSAGE,)
# Loggers that print Bot API URLs, which hold the token: PTB's bot (at DEBUG), and
# httpx, PTB's default transport, should anything in the process use it.
_URL_LOGGERS = ("telegram.Bot", "telegram.ext.ExtBot", "httpx")

PTBApplication = Application[Any, Any, Any, Any, Any, Any]


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
        self._channel: DeliveryChannel | None = None
        self._username = ""
        self._bot_id = 0
        self._unauthorized = asyncio.Event()
        self.started = asyncio.Event()
        """Set once updates are being received (for tests and health checks)."""
        _hide_token(settings.telegram_token.get_secret_value())

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
            self._channel = DeliveryChannel(
                app.bot,
                edit_interval=self._settings.telegram_edit_interval,
                admin_cache_ttl=self._admin_cache_ttl,
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
            .rate_limiter(RetryingRateLimiter(self._retry))
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
            connect_timeout=timeout,
            on_unauthorized=self._unauthorized.set,
        )

    async def _initialize(self, app: PTBApplication) -> None:
        """`getMe` (through `app.initialize`; the rate limiter retries network errors)."""
        try:
            await app.initialize()
        except InvalidToken:
            await app.bot.shutdown()
            # PTB's message repeats the token: never log it.
            raise ConfigError("TELEGRAM_TOKEN", "Telegram rejected the token (check it with @BotFather)") from None
        except NetworkError as exc:
            await app.bot.shutdown()
            raise ConfigError("TELEGRAM_API_BASE", f"cannot reach the Telegram Bot API: {exc.message}") from None

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
            try:
                await bot.set_my_commands(menu, scope=scope)
            except TelegramError as exc:  # e.g. an admin who never opened a chat with the bot
                logger.warning("Telegram: command menu for %s not set: %s", who, delivery_error("setMyCommands", exc))

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
        if self._channel is not None:
            self._channel.close()
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
        assert self._channel is not None and self._handler is not None
        if message.migrate_from_chat_id is not None or message.migrate_to_chat_id is not None:
            # Both sides of a group's upgrade to a supergroup arrive; moving twice is harmless.
            old, new = (
                (message.migrate_from_chat_id, message.chat.id)
                if message.migrate_from_chat_id is not None
                else (message.chat.id, message.migrate_to_chat_id)
            )
            await self._handler.move_chat("telegram", str(old), str(new))
            return
        target = TelegramReplyTarget(self._channel, ReplyAddress.of(message))
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
