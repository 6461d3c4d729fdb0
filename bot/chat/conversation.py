"""The conversation manager: durable turns, per-conversation order, admission, recovery
after a restart, and what happens when a reply cannot be delivered.

A message counts as accepted once the repository stored it as a turn, keyed by the
platform's message id (`Repository.accept_turn`): a redelivered update is recognised
there and never answered twice. `submit` returns as soon as a message is accepted (or
turned away), so an adapter that confirms updates to its platform confirms only stored
ones; the reply follows. A turn then waits for the earlier turns of its conversation,
takes a model slot (it waits for the model rather than fail as busy), streams its reply
and ends with `Repository.finish_turn`. Turns accepted before a restart and never
answered are answered by `recover`, or their senders are told they were missed.

The manager admits messages and runs commands; its parts do the rest:
`bot.chat.order` (each conversation's queue, in order), `bot.chat.turn` (one chat turn,
from prompt to stored reply), `bot.chat.delivery` (notices, replies the platform did not
take, missed messages) and `bot.chat.records` (a turn's progress in the repository).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Self

from bot.chat.background import Background
from bot.chat.commands import CommandRunner, ParsedCommand, parse_command
from bot.chat.delivery import Delivery
from bot.chat.order import ConversationQueues, QueuedTurn
from bot.chat.records import StorageFailureLog, TurnRecorder
from bot.chat.session import SessionStore

# The reply markers live with the turn; tests import them from here.
from bot.chat.turn import CUT_OFF_SUFFIX as CUT_OFF_SUFFIX
from bot.chat.turn import EMPTY_REPLY as EMPTY_REPLY
from bot.chat.turn import STOPPED_SUFFIX as STOPPED_SUFFIX
from bot.chat.turn import TurnRunner
from bot.config import Settings
from bot.errors import BotError, BusyError, CommandError, InputRejected, StorageError
from bot.events import ConversationKey, IncomingMessage, Platform
from bot.ports import ModelBackend, NullObserver, Observer, OpenTurn, ReplyTarget, Repository

logger = logging.getLogger(__name__)

# The typing indicator; read when a manager is made (its `ConversationQueues` get them).
TYPING_RENEW_S = 4.0  # Telegram shows "typing" for 5 s, Discord for 10 s
TYPING_DELAY_S = 1.0  # an answer that starts sooner needs no indicator (saves requests)
# Accepted, unanswered messages of one conversation (waiting or being answered); more are
# refused. 8: a user who sends 5 messages at once has all of them answered, in order.
MAX_WAITING_PER_CONVERSATION = 8
TOO_FAST = "You're writing faster than I can answer. Please wait for my replies."
EMPTY_INPUT = "Send me a message and I'll answer. /help lists the commands."
# A reply the platform did not take is tried again after these pauses (seconds), then
# every last one, until it is delivered or the bot stops (a restart delivers it then).
# Read when a manager is made (its `Delivery` gets it).
REDELIVERY_DELAYS_S: tuple[float, ...] = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0)
# Lone UTF-16 surrogates (JSON can carry them) cannot be stored as UTF-8.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def looks_binary(text: str) -> bool:
    """Text with NULs, or mostly control characters, is binary data pasted as text."""
    if "\x00" in text:
        return True
    controls = sum(1 for c in text if unicodedata.category(c) == "Cc" and c not in "\n\r\t")
    return controls > max(2, len(text) // 10)


class ConversationManager:
    """Handles every incoming message of every platform (`bot.ports.IncomingHandler`).

    Messages of one conversation are answered strictly in the order they were accepted;
    different conversations run concurrently. Commands run at once (a `/reset` stops a
    reply in progress). Use as `async with manager:`; leaving stops every conversation:
    replies in progress end with a note and are stored as shown, waiting turns stay
    stored and are answered after a restart.
    """

    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        model: ModelBackend,
        *,
        clock: Callable[[], float] = time.monotonic,
        observer: Observer | None = None,
    ) -> None:
        self._settings = settings
        self._repo = repository
        self._model = model
        self._observer: Observer = observer if observer is not None else NullObserver()
        self._sessions = SessionStore(settings.session_defaults(), repository, cache=not repository.shared)
        self._commands = CommandRunner(settings, repository, self._sessions, model, conversations=self)
        self._background = Background()
        # Every part logs storage failures as the manager's, one rate-limited stream.
        self._storage = StorageFailureLog(logger)
        self._records = TurnRecorder(repository, self._background, self._storage)
        self._delivery = Delivery(
            self._observer, self._records, self._background, redelivery_delays=REDELIVERY_DELAYS_S
        )
        self._turns = TurnRunner(
            settings,
            repository,
            model,
            self._sessions,
            self._commands.policy,
            records=self._records,
            delivery=self._delivery,
            storage=self._storage,
            background=self._background,
            observer=self._observer,
            clock=clock,
        )
        self._queues = ConversationQueues(
            self._turns, self._records, self._background, typing_delay=TYPING_DELAY_S, typing_renew=TYPING_RENEW_S
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every conversation and wait: replies in progress end with a note and are
        stored as the user saw them; waiting turns stay "pending" for the next start."""
        self._background.closing = True
        await self._queues.stop_replies()
        await self._background.cancel_all()

    # ------------------------------------------------------------------ entry points

    async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
        """Handle one message; returns when its reply is complete. Never raises
        `BotError`: the user gets an explanation and the log the details."""
        await (await self.submit(event, target))

    async def submit(self, event: IncomingMessage, target: ReplyTarget) -> Awaitable[None]:
        """Accept one message: returns once it is stored as a turn, or turned away (a
        notice sent). The awaitable returned completes when its reply is complete (being
        cancelled does not cancel the turn). Never raises `BotError`."""
        if self._background.closing:
            return _completed()
        if _LONE_SURROGATE.search(event.text):
            event = dataclasses.replace(event, text=_LONE_SURROGATE.sub("\ufffd", event.text))
        command = parse_command(event.text)
        # A chat message takes its place in its conversation at once, before anything
        # else is awaited: the conversation's messages are answered (and stored) in the
        # order they arrived. It is accepted only once stored; until then it may go again.
        turn = None if command is not None else self._queues.reserve(event, target)
        try:
            # The public controls (bot/chat/policy.py): blocks, rate limits, quotas.
            refused = await self._commands.policy.refuses(event, target, command=command is not None)
            if refused is not None:
                self._observer.message(event.platform, refused)
            elif command is not None:
                return await self._submit_command(event, target, command)
            else:
                assert turn is not None
                self._check_input(event.text)
                if not event.text.strip():
                    raise InputRejected(EMPTY_INPUT)
                return await self._accept(turn)
        except CommandError as exc:
            logger.info("%s from %s: %s", type(exc).__name__, event.sender, exc)
            self._queues.unreserve(turn)
            await self._delivery.notice(target, exc.user_message, event.platform)
            self._observer.message(event.platform, "refused_input")
        except StorageError as exc:
            self._queues.unreserve(turn)
            self._storage.failed(exc, f"accepting a message from {event.sender}")
            await self._delivery.notice(target, exc.user_message, event.platform)
            self._observer.message(event.platform, "failed")
        except BotError as exc:
            self._queues.unreserve(turn)
            logger.exception("message from %s failed", event.sender)
            await self._delivery.notice(target, exc.user_message, event.platform)
            self._observer.message(event.platform, "failed")
        except BaseException:
            self._queues.unreserve(turn)
            raise
        self._queues.unreserve(turn)
        return _completed()

    async def recover(self, platform: Platform, make_target: Callable[[IncomingMessage], ReplyTarget]) -> None:
        """Queue the platform's turns accepted before a restart and never answered (or
        never delivered), each through `make_target(event)`, ahead of newer turns of
        their conversations. A "pending" turn older than `RECOVER_MAX_AGE` is not
        answered: its sender is told it was missed. An undelivered reply is delivered
        whatever its age (the answer exists). Idempotent; never raises `BotError`."""
        if self._background.closing:
            return
        try:
            open_turns = await self._repo.open_turns(platform)
        except StorageError as exc:
            self._storage.failed(exc, f"reading the open turns of {platform}")
            return
        oldest = datetime.now(UTC) - timedelta(seconds=self._settings.recover_max_age)
        queued: dict[ConversationKey, list[QueuedTurn]] = {}
        missed = 0
        for open_turn in open_turns:
            if self._queues.works_on(open_turn) or open_turn.id in self._delivery.redelivering:
                continue
            try:
                target = make_target(open_turn.event)
            except Exception:
                logger.exception("no reply target for the open turn %d of %s", open_turn.id, platform)
                continue
            self._queues.claim(open_turn.id)
            if open_turn.state == "pending" and open_turn.accepted_at < oldest:
                missed += 1
                self._background.spawn(self._tell_missed(open_turn, target), f"missed:{open_turn.id}")
                continue
            queued.setdefault(open_turn.event.key, []).append(self._queues.recovered(open_turn, target))
        for key, turns in queued.items():
            self._queues.queue_recovered(key, turns)
        count = sum(len(turns) for turns in queued.values())
        if count or missed:
            logger.info("%s: recovering %d turn(s) accepted before a restart; %d missed", platform, count, missed)

    async def move_chat(self, platform: Platform, old_chat_id: str, new_chat_id: str) -> None:
        """A chat got a new id (a Telegram group became a supergroup): its conversations,
        history and settings go on under the new id. Never raises `BotError`."""
        try:
            moved = await self._repo.move_chat(platform, old_chat_id, new_chat_id)
        except BotError:
            logger.exception(
                "%s chat %s is now %s, but its history could not be moved", platform, old_chat_id, new_chat_id
            )
            return
        logger.info("%s chat %s is now %s: %d conversation(s) moved", platform, old_chat_id, new_chat_id, moved)

    def _check_input(self, text: str) -> None:
        if len(text) > self._settings.max_input_chars:
            raise InputRejected(
                f"Your message is too long ({len(text)} characters); the limit is {self._settings.max_input_chars}."
            )
        if looks_binary(text):
            raise InputRejected("That looks like binary data. I can only read text.")

    # ------------------------------------------------------------------ commands

    async def _submit_command(
        self, event: IncomingMessage, target: ReplyTarget, command: ParsedCommand
    ) -> Awaitable[None]:
        """Commands are turns too (a redelivered /reset is not run twice), run at once."""
        turn_id = await self._repo.accept_turn(event, "command", 0)
        if turn_id is None:
            self._duplicate(event)
            return _completed()
        return asyncio.shield(
            self._background.spawn(self._run_command(turn_id, command, event, target), f"command:{event.key}")
        )

    async def _run_command(
        self, turn_id: int, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget
    ) -> None:
        try:
            answer = await self._commands.run(command, event, target)
        except CommandError as exc:
            logger.info("%s from %s: %s", type(exc).__name__, event.sender, exc)
            answer = exc.user_message
        except StorageError as exc:
            self._storage.failed(exc, f"running /{command.name}")
            answer = exc.user_message
        except BotError as exc:
            logger.exception("/%s from %s failed", command.name, event.sender)
            answer = exc.user_message
        except Exception:
            logger.exception("unexpected error in /%s from %s", command.name, event.sender)
            answer = BotError.user_message
        await self._delivery.notice(target, answer, event.platform)
        await self._records.finish(turn_id, "answered")
        self._observer.message(event.platform, "command")

    # ------------------------------------------------------------------ admission

    async def _accept(self, turn: QueuedTurn) -> Awaitable[None]:
        """Store the queued message as a turn, unless the bot is too busy (then it is
        refused, and not stored)."""
        event = turn.event
        if turn.pending_ahead >= self._settings.max_pending_messages:
            logger.info(
                "busy: refused a message from %s (%d accepted messages unanswered)", event.sender, turn.pending_ahead
            )
            return await self._refuse_busy(turn, BusyError.user_message)
        if turn.ahead >= MAX_WAITING_PER_CONVERSATION:
            logger.info("refused a message from %s: %d of theirs wait for an answer", event.sender, turn.ahead)
            return await self._refuse_busy(turn, TOO_FAST)
        try:
            tokens = await self._model.count_tokens(event.text)
            previous = turn.previous
            if previous is not None and not previous.accepted.done():
                await asyncio.wait({previous.accepted})  # stored first, so its history comes first
            turn_id = await self._repo.accept_turn(event, "message", tokens)
        except BaseException:
            self._queues.not_stored(turn)
            raise
        self._queues.stored(turn, turn_id)
        if turn_id is None:
            self._duplicate(event)
        return asyncio.shield(turn.done)

    async def _refuse_busy(self, turn: QueuedTurn, notice: str) -> Awaitable[None]:
        self._queues.unreserve(turn)
        await self._delivery.notice(turn.target, notice, turn.event.platform)
        self._observer.message(turn.event.platform, "refused_busy")
        return _completed()

    def _duplicate(self, event: IncomingMessage) -> None:
        logger.info("%s message %s in chat %s was accepted before: not answered again", *_where(event))
        self._observer.message(event.platform, "duplicate")

    # ------------------------------------------------------------------ conversations

    async def stop(self, match: Callable[[ConversationKey], bool]) -> int:
        """Drop waiting turns and cancel replies in progress of matching conversations
        (a /reset); returns how many replies were stopped."""
        return await self._queues.stop(match)

    def waiting_turns(self) -> int:
        """Messages accepted but waiting for an earlier turn of their conversation."""
        return self._queues.waiting_turns()

    def in_flight(self) -> int:
        """Stored turns this process works on: queued, being answered, a reply being
        retried, a missed message being told about."""
        return len(self._queues.in_flight | self._delivery.redelivering)

    # ------------------------------------------------------------------ odds and ends

    async def _tell_missed(self, open_turn: OpenTurn, target: ReplyTarget) -> None:
        try:
            await self._delivery.tell_missed(open_turn, target)
        finally:
            self._queues.release(open_turn.id)


def _where(event: IncomingMessage) -> tuple[str, str, str]:
    return (event.platform, event.message_id, event.chat_id)


def _completed() -> asyncio.Future[None]:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done
