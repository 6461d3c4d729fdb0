"""Telegram: python-telegram-bot's `Application` inside our event loop.

Long polling by default, a webhook when ``TELEGRAM_WEBHOOK_URL`` is set. Every update
is converted at the edge by the pure `to_event` and handed to the core's `submit`,
which returns once the message is stored (accepted); its reply then runs in a task
of its own, so one slow reply never holds up another chat. Replies are plain text (no
parse mode: the model's output can never break Telegram's parser) sent by
`TelegramReplyTarget`; transient platform errors are retried by `RetryingRateLimiter`,
PTB's rate-limiter extension point. HTTP goes through `AiohttpRequest`, PTB's
transport interface on aiohttp.

Durable polling: PTB's `Updater` confirms a batch of updates (the next ``getUpdates``
offset) as soon as it has queued them, so a crash mid-reply lost the message for
good. Long polling is therefore our own loop on ``bot.get_updates``: a batch is
confirmed only after `submit` has returned for every update in it (updates of one
conversation are submitted in order; different conversations concurrently, so the
storage can commit them together). A redelivered update (after a crash) is recognised
by the core and not answered twice. In webhook mode PTB's webhook server answers
Telegram once `update_queue.put` returns; the queue given to PTB (`AcceptingQueue`, its
``ApplicationBuilder.update_queue`` extension point) accepts the update there, so
Telegram gets its 200 only for a stored message and repeats the others. Telegram's
repeats of an accepted update are deduplicated by the core.

A 409 Conflict from ``getUpdates`` (another process polling the same token, or a
webhook set by one) that keeps coming for `conflict_timeout` seconds (30 s) stops the
adapter with a `ConfigError`: two bots on one token would each get half the messages.
Updates received between the 409s do not end the conflict (two pollers take turns);
only a 409-free `conflict_timeout` does, so a restart that briefly overlaps the old
process's last poll is ridden out.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
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
from telegram.error import Conflict, InvalidToken, NetworkError, TelegramError
from telegram.ext import Application, ApplicationBuilder, ContextTypes

from adapters.telegram.delivery import (
    SEND_TIMEOUT,
    DeliveryChannel,
    ReplyAddress,
    TelegramReplyTarget,
    delivery_error,
)
from adapters.telegram.events import is_unreadable_media, to_event
from adapters.telegram.rate_limiter import RetryingRateLimiter, RetryPolicy
from adapters.telegram.transport import AiohttpRequest
from bot.config import Settings
from bot.errors import ConfigError, DeliveryError
from bot.events import IncomingMessage
from bot.ports import CommandInfo, IncomingHandler, ReplyTarget

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


class AcceptingQueue(asyncio.Queue[object]):
    """The update queue PTB's webhook server puts each update into: `put` hands the
    update to the core and returns once it is accepted, and only then does the server
    answer Telegram. Anything else (PTB's own stop signal) is queued as usual."""

    def __init__(self, accept: Callable[[Update], Awaitable[None]]) -> None:
        super().__init__()
        self._accept = accept

    async def put(self, item: object) -> None:
        if isinstance(item, Update):
            await self._accept(item)
        else:
            await super().put(item)


class TelegramAdapter:
    """The Telegram connection (`bot.ports.Adapter`).

    `run` serves until cancelled. On cancellation it stops receiving updates, gives the
    replies in progress `shutdown_grace` seconds to finish, then stops waiting for
    them (they belong to the core, which parks what it cannot deliver), and closes
    the connection. Reply targets outlive a run: after a restart they send through
    the new connection.
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
        send_timeout: float = SEND_TIMEOUT,
        conflict_timeout: float = 30.0,
        poll_backoff: float = 1.0,
    ) -> None:
        if settings.telegram_token is None:
            raise ConfigError("TELEGRAM_TOKEN", "is not set")
        self._settings = settings
        self._commands = tuple(commands)
        self._retry = retry or RetryPolicy()
        self._poll_timeout = poll_timeout
        self._shutdown_grace = shutdown_grace
        self._request_timeout = request_timeout
        self._conflict_timeout = conflict_timeout
        self._poll_backoff = poll_backoff
        self._tasks: set[asyncio.Task[None]] = set()
        self._handler: IncomingHandler | None = None
        self._channel = DeliveryChannel(
            None,
            edit_interval=settings.telegram_edit_interval,
            admin_cache_ttl=admin_cache_ttl,
            send_timeout=send_timeout,
        )
        self._username = ""
        self._bot_id = 0
        self._connected = False
        self._recovered = False
        self._unauthorized = asyncio.Event()
        self.started = asyncio.Event()
        """Set once updates are being received (for tests and health checks)."""
        _hide_token(settings.telegram_token.get_secret_value())

    @property
    def connected(self) -> bool:
        """Whether updates are being received right now (the last ``getUpdates``
        answered, or the webhook is set)."""
        return self._connected

    @property
    def in_flight(self) -> int:
        """Updates being accepted and replies being waited for right now."""
        return len(self._tasks)

    def target_for(self, event: IncomingMessage) -> ReplyTarget:
        """The reply target for a message known only as the common event (a turn
        accepted before a restart): its chat (and forum topic), quoting it in groups."""
        return TelegramReplyTarget(self._channel, ReplyAddress.of_event(event))

    # ------------------------------------------------------------------ lifecycle

    async def run(self, handler: IncomingHandler) -> None:
        """Serve Telegram until cancelled. Raises `ConfigError` when the token is
        rejected (at start-up or later) or another instance uses it."""
        self._handler = handler
        self._unauthorized.clear()
        self._recovered = False
        app = self._build_application()
        await self._initialize(app)
        # What `async with app:` does, with the start-up errors told apart above.
        try:
            self._username = app.bot.username
            self._bot_id = app.bot.id
            self._channel.attach(app.bot)
            await self._register_commands(app.bot)
            await app.start()
            try:
                await self._serve(app)
            finally:
                await self._stop(app)
        finally:
            self._connected = False
            self.started.clear()
            await app.shutdown()

    async def _serve(self, app: PTBApplication) -> None:
        """Receive updates until cancelled or until the token stops working."""
        url = self._settings.telegram_webhook_url
        if url:
            # Before the first update can arrive: the turns a restart left are queued
            # ahead of newer messages of their conversations.
            await self._recover()
            await self._start_webhook(app, url)
            logger.info("Telegram: serving as @%s (webhook)", self._username)
            self._on_connected()
            # Until cancelled, or until Telegram refuses the token (revoked in
            # @BotFather): PTB would only log that and stop for good.
            await self._unauthorized.wait()
        else:
            logger.info("Telegram: serving as @%s (long polling)", self._username)
            poller = asyncio.create_task(self._poll(app.bot), name="telegram:poll")
            revoked = asyncio.create_task(self._unauthorized.wait(), name="telegram:token-watch")
            try:
                await asyncio.wait({poller, revoked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (poller, revoked):
                    task.cancel()
                await asyncio.gather(poller, revoked, return_exceptions=True)
            if poller.done() and not poller.cancelled():
                poller.result()  # raises what stopped the polling (another instance: ConfigError)
        raise ConfigError("TELEGRAM_TOKEN", "Telegram no longer accepts the token (revoked or replaced in @BotFather?)")

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
            .update_queue(AcceptingQueue(self._accept_one))
            .concurrent_updates(True)
            .job_queue(None)
            .build()
        )
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

    async def _start_webhook(self, app: PTBApplication, url: str) -> None:
        updater = app.updater
        assert updater is not None  # ApplicationBuilder always makes one unless told not to
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

    def _on_connected(self) -> None:
        """Updates are arriving: ready."""
        self._connected = True
        self.started.set()

    async def _recover(self) -> None:
        """Once per run, before the first update is accepted: hand the turns a restart
        left unanswered back to the core, which queues them ahead of newer messages of
        their conversations (so answers keep the order the messages were sent in)."""
        if self._recovered:
            return
        self._recovered = True
        assert self._handler is not None
        try:
            await self._handler.recover("telegram", self.target_for)
        except Exception:
            logger.exception("Telegram: recovering the turns left by a restart failed")

    async def _stop(self, app: PTBApplication) -> None:
        """Stop receiving, give replies in progress a moment to finish, then close."""
        self._connected = False
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self._shutdown_grace)
            for task in pending:
                task.cancel()
            if pending:
                logger.info("Telegram: stopped waiting for %d replies still in progress", len(pending))
                await asyncio.wait(pending)
        self._channel.close()
        if app.running:
            await app.stop()

    # ------------------------------------------------------------------ long polling

    async def _poll(self, bot: Bot) -> None:
        """Long polling that confirms a batch only once every update in it is accepted."""
        # What PTB's start_polling does first: a webhook left set would answer 409.
        await bot.delete_webhook(drop_pending_updates=False)
        offset: int | None = None
        # A 409 run: from the first 409 after a quiet spell to the latest. Two pollers
        # take turns (each new poll ends the other's with 409), so each still gets some
        # updates between its 409s: only a conflict-free `conflict_timeout` ends a run.
        conflict_since = last_conflict = 0.0
        failures = 0
        while True:
            # Until connected, a short poll: it tells at once that Telegram answers.
            wait = self._poll_timeout if self._connected else 0.0
            try:
                updates = await bot.get_updates(
                    offset=offset, timeout=dtm.timedelta(seconds=wait), allowed_updates=ALLOWED_UPDATES
                )
            except InvalidToken:
                self._unauthorized.set()
                return
            except Conflict as exc:
                now = time.monotonic()
                if not conflict_since or now - last_conflict > self._conflict_timeout:
                    conflict_since = now
                    logger.warning("Telegram: getUpdates answered 409 Conflict: %s", exc.message)
                last_conflict = now
                if now - conflict_since >= self._conflict_timeout:
                    raise ConfigError(
                        "TELEGRAM_TOKEN",
                        "another bot instance uses this token (Telegram answered 409 Conflict for "
                        f"{self._conflict_timeout:g} s); stop the other one, or give each bot its own token",
                    ) from None
                self._connected = False
                await asyncio.sleep(self._poll_backoff)
                continue
            except TelegramError as exc:  # network errors, timeouts, 5xx
                failures += 1
                self._connected = False
                delay = min(30.0, self._poll_backoff * 2 ** min(failures - 1, 5))
                logger.warning("Telegram: fetching updates failed (%s); retrying in %g s", exc.message, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if not self._connected:
                # Only once Telegram answers: not while the token is taken (409s).
                await self._recover()
                self._on_connected()
            if updates:
                await self._accept_batch(updates)
                offset = updates[-1].update_id + 1

    async def _accept_batch(self, updates: Sequence[Update]) -> None:
        """`_accept` every update: in order within a conversation, conversations at once."""
        chains: dict[tuple[int, int], list[Update]] = {}
        for update in updates:
            message = update.message
            key = (
                (message.chat.id, message.from_user.id if message.from_user is not None else 0)
                if message is not None
                else (0, 0)
            )
            chains.setdefault(key, []).append(update)
        if len(chains) == 1:
            await self._accept_chain(updates)
        else:
            await asyncio.gather(*(self._accept_chain(chain) for chain in chains.values()))

    async def _accept_chain(self, updates: Sequence[Update]) -> None:
        for update in updates:
            try:
                await self._accept(update)
            except Exception:  # confirmed anyway: a poison update must not block the chat
                logger.exception("Telegram: handling update %s failed", update.update_id)

    # ------------------------------------------------------------------ updates

    async def _accept_one(self, update: Update) -> None:
        """An update from PTB's webhook server, answered with 200 once this returns."""
        await self._accept_chain([update])

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, update: Update) -> None:
        """Hand one update to the core; returns once it is accepted (or turned away)."""
        message = update.message
        if message is None:  # edited messages, channel posts, ...
            logger.debug("Telegram: ignoring update %s without a new message", update.update_id)
            return
        assert self._handler is not None
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
        event = to_event(message, self._username, self._bot_id)
        if event is not None:
            reply = await self._handler.submit(event, target)
            self._spawn(self._follow(reply, message.chat.id), f"telegram:reply:{message.chat.id}:{message.message_id}")
        elif message.chat.type == ChatType.PRIVATE and is_unreadable_media(message):
            self._spawn(self._notice(target, message.chat.id), f"telegram:notice:{update.update_id}")

    async def _follow(self, reply: Awaitable[None], chat_id: int) -> None:
        """Wait for an accepted message's reply. Shielded: stopping the adapter stops the
        waiting, not the core's turn."""
        try:
            await asyncio.shield(reply)
        except DeliveryError as exc:
            logger.warning("Telegram: reply in chat %s not delivered: %s", chat_id, exc)
        except Exception:
            logger.exception("Telegram: the reply in chat %s failed", chat_id)

    @staticmethod
    async def _notice(target: TelegramReplyTarget, chat_id: int) -> None:
        try:
            await target.send(NON_TEXT_REPLY)
        except DeliveryError as exc:
            logger.warning("Telegram: notice in chat %s not delivered: %s", chat_id, exc)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        logger.error("Telegram: error while dispatching an update", exc_info=context.error)
