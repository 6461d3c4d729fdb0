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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import re
import time
import unicodedata
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from bot.chat.commands import CommandRunner, ParsedCommand, parse_command
from bot.chat.prompt import build_prompt
from bot.chat.session import SessionStore
from bot.chat.streaming import ReplyStreamer
from bot.config import Settings
from bot.errors import (
    BotError,
    BusyError,
    CommandError,
    DeliveryError,
    GenerationCancelled,
    GenerationError,
    InputRejected,
    ReplyCutOff,
    StorageError,
)
from bot.events import ConversationKey, IncomingMessage, Platform
from bot.ports import (
    FinishedReply,
    GenerationParams,
    ModelBackend,
    NullObserver,
    Observer,
    OpenTurn,
    RenderedPrompt,
    ReplyChunk,
    ReplyTarget,
    Repository,
    SamplingParams,
    TurnState,
)

logger = logging.getLogger(__name__)

TYPING_RENEW_S = 4.0  # Telegram shows "typing" for 5 s, Discord for 10 s
TYPING_DELAY_S = 1.0  # an answer that starts sooner needs no indicator (saves requests)
# Accepted, unanswered messages of one conversation (waiting or being answered); more are
# refused. 8: a user who sends 5 messages at once has all of them answered, in order.
MAX_WAITING_PER_CONVERSATION = 8
EMPTY_REPLY = "(I have no answer to that.)"
STOPPED_SUFFIX = " … [stopped]"
CUT_OFF_SUFFIX = " … [cut off]"
TOO_FAST = "You're writing faster than I can answer. Please wait for my replies."
EMPTY_INPUT = "Send me a message and I'll answer. /help lists the commands."
# A reply the platform did not take is tried again after these pauses (seconds), then
# every last one, until it is delivered or the bot stops (a restart delivers it then).
REDELIVERY_DELAYS_S: tuple[float, ...] = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0)
# A full model queue makes an accepted turn wait: it asks again after these pauses.
BUSY_RETRY_S = 0.05
BUSY_RETRY_MAX_S = 2.0
# Storage failures are logged with a traceback at most once per this many seconds.
STORAGE_LOG_EVERY_S = 30.0
MISSED_QUOTE_CHARS = 60
# Lone UTF-16 surrogates (JSON can carry them) cannot be stored as UTF-8.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(eq=False, slots=True)
class _Turn:
    """A chat turn in its conversation's queue. `accepted` gets its turn id once stored
    (None: not stored, a redelivery or a failure); `done` completes when it ended here."""

    event: IncomingMessage
    target: ReplyTarget
    accepted: asyncio.Future[int | None]
    done: asyncio.Future[None]
    shown: tuple[str, ...] = ()  # recovered: its reply's messages already in the chat
    reply: str | None = None  # recovered "undelivered": the stored reply to deliver
    dropped: bool = False  # a /reset dropped it before it ran
    settled: bool = False
    ahead: int = 0  # unanswered turns of its conversation when it arrived
    pending_ahead: int = 0  # unanswered turns of every conversation when it arrived
    previous: _Turn | None = None  # the one before it in its conversation, when it arrived


@dataclass(slots=True)
class _Conversation:
    waiting: deque[_Turn] = field(default_factory=deque)
    active: _Turn | None = None  # taken from the queue, not ended yet
    current: asyncio.Task[None] | None = None  # the active turn's task, once it runs
    runner: asyncio.Task[None] | None = None

    @property
    def unanswered(self) -> int:
        return len(self.waiting) + (self.active is not None)


def looks_binary(text: str) -> bool:
    """Text with NULs, or mostly control characters, is binary data pasted as text."""
    if "\x00" in text:
        return True
    controls = sum(1 for c in text if unicodedata.category(c) == "Cc" and c not in "\n\r\t")
    return controls > max(2, len(text) // 10)


def _quote(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MISSED_QUOTE_CHARS else line[: MISSED_QUOTE_CHARS - 1].rstrip() + "…"


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
        self._clock = clock
        self._observer: Observer = observer if observer is not None else NullObserver()
        self._sessions = SessionStore(settings.session_defaults(), repository, cache=not repository.shared)
        self._commands = CommandRunner(settings, repository, self._sessions, model, conversations=self)
        self._conversations: dict[ConversationKey, _Conversation] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        # Accepted chat turns not ended yet in this process (the busy bound counts them).
        self._pending = 0
        # Turn ids being answered or delivered here: `recover` leaves them alone.
        self._in_flight: set[int] = set()
        # Turn ids whose stored reply is being retried here (`_redeliver`).
        self._redelivering: set[int] = set()
        # The latest background record of each reply's messages (`_record_shown`).
        self._recording: dict[int, asyncio.Task[None]] = {}
        # Messages queued here whose turn is being stored (its id not known yet): a
        # `recover` reading the store meanwhile must not take them for a restart's.
        self._accepting: set[tuple[str, str, str]] = set()
        # Generations this process lets wait in the model's queue or run at once: never
        # more than its queue and batch hold, so an accepted turn waits here instead of
        # being refused as busy.
        running = settings.openai_max_concurrency if settings.model_backend == "openai" else settings.max_batch_size
        self._model_slots = asyncio.Semaphore(settings.queue_size + running)
        self._storage_logged_at = float("-inf")
        self._storage_unlogged = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every conversation and wait: replies in progress end with a note and are
        stored as the user saw them; waiting turns stay "pending" for the next start."""
        self._closing = True
        current = [c.current for c in self._conversations.values() if c.current is not None and not c.current.done()]
        for task in current:
            task.cancel()
        if current:
            await asyncio.wait(current)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ entry points

    async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
        """Handle one message; returns when its reply is complete. Never raises
        `BotError`: the user gets an explanation and the log the details."""
        await (await self.submit(event, target))

    async def submit(self, event: IncomingMessage, target: ReplyTarget) -> Awaitable[None]:
        """Accept one message: returns once it is stored as a turn, or turned away (a
        notice sent). The awaitable returned completes when its reply is complete (being
        cancelled does not cancel the turn). Never raises `BotError`."""
        if self._closing:
            return _completed()
        if _LONE_SURROGATE.search(event.text):
            event = dataclasses.replace(event, text=_LONE_SURROGATE.sub("\ufffd", event.text))
        command = parse_command(event.text)
        # A chat message takes its place in its conversation at once, before anything
        # else is awaited: the conversation's messages are answered (and stored) in the
        # order they arrived. It is accepted only once stored; until then it may go again.
        turn = None if command is not None else self._reserve(event, target)
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
            self._unreserve(turn)
            await self._reply(target, exc.user_message, event.platform)
            self._observer.message(event.platform, "refused_input")
        except StorageError as exc:
            self._unreserve(turn)
            self._storage_failed(exc, f"accepting a message from {event.sender}")
            await self._reply(target, exc.user_message, event.platform)
            self._observer.message(event.platform, "failed")
        except BotError as exc:
            self._unreserve(turn)
            logger.exception("message from %s failed", event.sender)
            await self._reply(target, exc.user_message, event.platform)
            self._observer.message(event.platform, "failed")
        except BaseException:
            self._unreserve(turn)
            raise
        self._unreserve(turn)
        return _completed()

    async def recover(self, platform: Platform, make_target: Callable[[IncomingMessage], ReplyTarget]) -> None:
        """Queue the platform's turns accepted before a restart and never answered (or
        never delivered), each through `make_target(event)`, ahead of newer turns of
        their conversations. A "pending" turn older than `RECOVER_MAX_AGE` is not
        answered: its sender is told it was missed. An undelivered reply is delivered
        whatever its age (the answer exists). Idempotent; never raises `BotError`."""
        if self._closing:
            return
        try:
            open_turns = await self._repo.open_turns(platform)
        except StorageError as exc:
            self._storage_failed(exc, f"reading the open turns of {platform}")
            return
        oldest = datetime.now(UTC) - timedelta(seconds=self._settings.recover_max_age)
        queued: dict[ConversationKey, list[_Turn]] = {}
        missed = 0
        for open_turn in open_turns:
            if (
                open_turn.id in self._in_flight
                or open_turn.id in self._redelivering
                or _turn_key(open_turn.event) in self._accepting
            ):
                continue
            try:
                target = make_target(open_turn.event)
            except Exception:
                logger.exception("no reply target for the open turn %d of %s", open_turn.id, platform)
                continue
            self._in_flight.add(open_turn.id)
            if open_turn.state == "pending" and open_turn.accepted_at < oldest:
                missed += 1
                self._spawn(self._tell_missed(open_turn, target), f"missed:{open_turn.id}")
                continue
            turn = self._new_turn(open_turn.event, target)
            turn.accepted.set_result(open_turn.id)
            turn.shown, turn.reply = open_turn.reply_message_ids, open_turn.reply
            queued.setdefault(open_turn.event.key, []).append(turn)
        for key, turns in queued.items():
            conv = self._conversations.setdefault(key, _Conversation())
            conv.waiting.extendleft(reversed(turns))  # accepted before anything waiting here
            self._pending += len(turns)
            self._start(key, conv)
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

    async def _reply(self, target: ReplyTarget, text: str, platform: Platform) -> None:
        """Send a short notice; a platform failure is logged and counted, never raised."""
        try:
            await ReplyStreamer(target).finish(text)
        except DeliveryError as exc:
            logger.warning("could not deliver a notice: %s", exc)
            self._observer.platform_error(platform, exc.kind)

    # ------------------------------------------------------------------ commands

    async def _submit_command(
        self, event: IncomingMessage, target: ReplyTarget, command: ParsedCommand
    ) -> Awaitable[None]:
        """Commands are turns too (a redelivered /reset is not run twice), run at once."""
        turn_id = await self._repo.accept_turn(event, "command", 0)
        if turn_id is None:
            self._duplicate(event)
            return _completed()
        return asyncio.shield(self._spawn(self._run_command(turn_id, command, event, target), f"command:{event.key}"))

    async def _run_command(
        self, turn_id: int, command: ParsedCommand, event: IncomingMessage, target: ReplyTarget
    ) -> None:
        try:
            answer = await self._commands.run(command, event, target)
        except CommandError as exc:
            logger.info("%s from %s: %s", type(exc).__name__, event.sender, exc)
            answer = exc.user_message
        except StorageError as exc:
            self._storage_failed(exc, f"running /{command.name}")
            answer = exc.user_message
        except BotError as exc:
            logger.exception("/%s from %s failed", command.name, event.sender)
            answer = exc.user_message
        except Exception:
            logger.exception("unexpected error in /%s from %s", command.name, event.sender)
            answer = BotError.user_message
        await self._reply(target, answer, event.platform)
        await self._finish(turn_id, "answered")
        self._observer.message(event.platform, "command")

    # ------------------------------------------------------------------ admission and order

    def _reserve(self, event: IncomingMessage, target: ReplyTarget) -> _Turn:
        """Queue a chat message in its conversation (not accepted yet: see `_accept`)."""
        conv = self._conversations.setdefault(event.key, _Conversation())
        turn = self._new_turn(event, target)
        turn.ahead = conv.unanswered
        turn.pending_ahead = self._pending
        turn.previous = conv.waiting[-1] if conv.waiting else conv.active
        conv.waiting.append(turn)
        self._accepting.add(_turn_key(event))
        self._pending += 1
        self._start(event.key, conv)
        return turn

    def _unreserve(self, turn: _Turn | None) -> None:
        """A queued message that is not accepted after all: it leaves the queue."""
        if turn is None or turn.settled:
            return
        self._accepting.discard(_turn_key(turn.event))
        if not turn.accepted.done():
            turn.accepted.set_result(None)
        conv = self._conversations.get(turn.event.key)
        if conv is not None and turn in conv.waiting:
            conv.waiting.remove(turn)
        self._settle(turn)

    async def _accept(self, turn: _Turn) -> Awaitable[None]:
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
            self._accepting.discard(_turn_key(event))
            if not turn.accepted.done():
                turn.accepted.set_result(None)
            raise
        self._accepting.discard(_turn_key(event))
        turn.previous = None
        if turn_id is not None:
            self._in_flight.add(turn_id)
        turn.accepted.set_result(turn_id)
        if turn_id is None:
            self._duplicate(event)
        return asyncio.shield(turn.done)

    async def _refuse_busy(self, turn: _Turn, notice: str) -> Awaitable[None]:
        self._unreserve(turn)
        await self._reply(turn.target, notice, turn.event.platform)
        self._observer.message(turn.event.platform, "refused_busy")
        return _completed()

    def _duplicate(self, event: IncomingMessage) -> None:
        logger.info("%s message %s in chat %s was accepted before: not answered again", *_where(event))
        self._observer.message(event.platform, "duplicate")

    def _new_turn(self, event: IncomingMessage, target: ReplyTarget) -> _Turn:
        loop = asyncio.get_running_loop()
        return _Turn(event, target, loop.create_future(), loop.create_future())

    def _start(self, key: ConversationKey, conv: _Conversation) -> None:
        if conv.runner is None:
            conv.runner = self._spawn(self._run_conversation(key, conv), f"conversation:{key}")

    def _settle(self, turn: _Turn) -> None:
        """The turn ended here (answered, failed, dropped, or left for the next start)."""
        if turn.settled:
            return
        turn.settled = True
        turn.previous = None
        self._pending -= 1
        if turn.accepted.done() and (turn_id := turn.accepted.result()) is not None:
            self._in_flight.discard(turn_id)
        if not turn.done.done():
            turn.done.set_result(None)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_conversation(self, key: ConversationKey, conv: _Conversation) -> None:
        typing = asyncio.create_task(self._keep_typing(conv), name=f"typing:{key}")
        try:
            while conv.waiting and not self._closing:
                turn = conv.active = conv.waiting.popleft()
                try:
                    turn_id = await asyncio.shield(turn.accepted)
                    if turn_id is not None and not turn.dropped:
                        conv.current = asyncio.create_task(
                            self._run_turn(turn, turn_id), name=f"turn:{key}:{turn.event.message_id}"
                        )
                        await asyncio.wait({conv.current})
                    elif turn_id is not None:  # a /reset dropped it while it was being stored
                        await self._finish(turn_id, "failed")
                finally:
                    conv.active = conv.current = None
                    self._settle(turn)
        finally:
            typing.cancel()
            conv.runner = None
            for turn in conv.waiting:  # shutting down: they stay stored, answered after a restart
                self._settle(turn)
            conv.waiting.clear()
            if self._conversations.get(key) is conv:
                del self._conversations[key]

    async def stop(self, match: Callable[[ConversationKey], bool]) -> int:
        """Drop waiting turns and cancel replies in progress of matching conversations
        (a /reset); returns how many replies were stopped."""
        stopped: list[asyncio.Task[None]] = []
        dropped: list[int] = []
        for key, conv in list(self._conversations.items()):
            if not match(key):
                continue
            while conv.waiting:
                turn = conv.waiting.popleft()
                turn.dropped = True
                if turn.accepted.done() and (turn_id := turn.accepted.result()) is not None:
                    dropped.append(turn_id)
                self._settle(turn)
            if conv.active is not None:
                conv.active.dropped = True
            if conv.current is not None and not conv.current.done():
                conv.current.cancel()
                stopped.append(conv.current)
        if stopped:
            await asyncio.wait(stopped)
        for turn_id in dropped:
            await self._finish(turn_id, "failed")
        return len(stopped)

    def waiting_turns(self) -> int:
        """Messages accepted but waiting for an earlier turn of their conversation."""
        return sum(len(c.waiting) for c in self._conversations.values())

    def in_flight(self) -> int:
        """Stored turns this process works on: queued, being answered, a reply being
        retried, a missed message being told about."""
        return len(self._in_flight | self._redelivering)

    # ------------------------------------------------------------------ the turn

    async def _run_turn(self, turn: _Turn, turn_id: int) -> None:
        event, target = turn.event, turn.target

        async def reply_started(message_ids: list[str]) -> None:
            self._record_shown(turn_id, message_ids)

        streamer = ReplyStreamer(target, clock=self._clock, shown=turn.shown, on_new_message=reply_started)
        tokens = 0
        prompt_tokens = 0
        complete = False  # the chat shows the whole reply

        def as_shown(text: str | None = None, *, cut_off: bool = False) -> FinishedReply:
            return FinishedReply(
                streamer.text if text is None else text, tokens, tuple(streamer.message_ids), cut_off, prompt_tokens
            )

        try:
            if turn.reply is not None:  # recovered: its reply is stored, deliver it
                streamer.add(turn.reply)
                await self._deliver(turn_id, event, streamer, as_shown())
                return
            # Other processes sharing the store wait for this turn of the conversation.
            async with self._repo.conversation_turn(event.key):
                prompt = await self._prompt(turn_id, event)
                if prompt is None:  # a /reset deleted the message meanwhile
                    await self._finish(turn_id, "failed")
                    return
                rendered, params = prompt
                prompt_tokens = rendered.length
                undelivered: DeliveryError | None = None
                async with self._model_slots:
                    stream, first = await self._open_stream(rendered, params)
                    try:
                        chunk = first
                        while chunk is not None:
                            tokens += chunk.tokens
                            if undelivered is None:
                                try:
                                    await streamer.push(chunk.text)
                                except DeliveryError as exc:
                                    if exc.permanent:
                                        raise
                                    undelivered = exc  # the rest is generated, kept and delivered later
                            else:
                                streamer.add(chunk.text)
                            chunk = await anext(stream, None)
                    finally:
                        await stream.aclose()
                if undelivered is None:
                    try:
                        await streamer.finish("" if streamer.text.strip() else EMPTY_REPLY)
                        complete = True
                    except DeliveryError as exc:
                        if exc.permanent:
                            raise
                        undelivered = exc
                if undelivered is not None:
                    await self._park(turn_id, event, streamer, as_shown(), undelivered)
                    return
                empty = streamer.text == EMPTY_REPLY
                await self._finish(turn_id, "answered", None if empty else as_shown())
                if not empty:
                    self._commands.policy.charge(event.platform, event.user_id, tokens)  # DAILY_TOKEN_QUOTA
                self._observer.message(event.platform, "answered")
        except asyncio.CancelledError:
            if complete:  # shown in full: only storing it was cut short
                await self._finish(turn_id, "answered", None if streamer.text == EMPTY_REPLY else as_shown())
            elif turn.reply is None:  # (a stored reply being delivered stays "undelivered")
                await self._stopped(turn_id, streamer, as_shown)
            raise
        except DeliveryError as exc:  # permanent: the chat is gone, the bot blocked, ...
            logger.warning("reply to %s not delivered: %s", event.sender, exc)
            self._observer.platform_error(event.platform, exc.kind)
            self._observer.message(event.platform, "failed")
            # What the user saw before it failed stays, as the history's answer.
            await self._finish(turn_id, "failed", as_shown(cut_off=True) if streamer.message_ids else None)
        except ReplyCutOff as exc:
            # The user saw part of the reply (a model server went away mid-stream): it
            # stays, marked as cut off, in the chat and in the history.
            logger.warning("reply to %s cut off: %s", event.sender, exc)
            with contextlib.suppress(DeliveryError):
                await streamer.finish(CUT_OFF_SUFFIX)
            await self._finish(turn_id, "answered", as_shown(cut_off=True))
            await self._reply(target, exc.user_message, event.platform)
            self._observer.message(event.platform, "failed")
        except GenerationCancelled as exc:
            if self._closing:  # the model stopped first: answered after a restart
                await self._stopped(turn_id, streamer, as_shown)
            else:
                logger.warning("turn of %s stopped: %s", event.key, exc)
                await self._fail(turn_id, target, event.platform, streamer, as_shown, GenerationError.user_message)
                self._observer.message(event.platform, "failed")
        except StorageError as exc:
            self._storage_failed(exc, f"a turn of {event.sender}")
            await self._reply(target, exc.user_message, event.platform)
            self._observer.message(event.platform, "failed")
        except BotError as exc:
            logger.exception("turn of %s failed", event.key)
            await self._fail(turn_id, target, event.platform, streamer, as_shown, exc.user_message)
            self._observer.message(event.platform, "failed")
        except Exception:
            logger.exception("unexpected error in turn of %s", event.key)
            await self._fail(turn_id, target, event.platform, streamer, as_shown, GenerationError.user_message)
            self._observer.message(event.platform, "failed")

    async def _prompt(self, turn_id: int, event: IncomingMessage) -> tuple[RenderedPrompt, GenerationParams] | None:
        settings = await self._sessions.effective(event.key)
        history = await self._repo.turn_history(turn_id, settings.history_turns + 1)
        if not history or history[-1].role != "user":
            return None
        prompt = await build_prompt(self._model, settings.system_prompt, history, settings.max_new_tokens)
        params = GenerationParams(
            max_new_tokens=prompt.max_new_tokens,
            sampling=SamplingParams(temperature=settings.temperature, top_p=settings.top_p),
            model=settings.model or None,
        )
        return prompt.rendered, params

    async def _open_stream(
        self, prompt: RenderedPrompt, params: GenerationParams
    ) -> tuple[AsyncGenerator[ReplyChunk, None], ReplyChunk | None]:
        """The reply stream and its first chunk. An accepted turn is never refused as busy:
        while the model's queue is full it asks again, with backoff."""
        delay = BUSY_RETRY_S
        for attempt in itertools.count(1):
            stream = self._model.generate(prompt, params)
            try:
                return stream, await anext(stream, None)
            except BusyError as exc:
                await stream.aclose()
                if attempt == 1 or attempt % 20 == 0:
                    logger.info("the model is busy (%s); a turn waits for it", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BUSY_RETRY_MAX_S)
            except BaseException:
                await stream.aclose()
                raise
        raise AssertionError("unreachable")

    async def _stopped(self, turn_id: int, streamer: ReplyStreamer, as_shown: Callable[..., FinishedReply]) -> None:
        """The turn was cancelled (shutdown or a /reset). Shown text ends with a note and
        is stored as the user saw it; a turn that showed nothing stays "pending" at
        shutdown (answered after the restart) and fails on a /reset."""
        if streamer.message_ids:
            with contextlib.suppress(BotError, asyncio.TimeoutError):
                await asyncio.wait_for(streamer.finish(STOPPED_SUFFIX), timeout=2.0)
            await self._finish(turn_id, "answered", as_shown(cut_off=True))
        elif not self._closing:
            await self._finish(turn_id, "failed")

    async def _fail(
        self,
        turn_id: int,
        target: ReplyTarget,
        platform: Platform,
        streamer: ReplyStreamer,
        as_shown: Callable[..., FinishedReply],
        notice: str,
    ) -> None:
        """The model failed: what was shown ends with a note and is kept; the user is told."""
        shown = bool(streamer.message_ids)
        if shown:
            with contextlib.suppress(DeliveryError):
                await streamer.finish(STOPPED_SUFFIX)
        await self._finish(turn_id, "failed", as_shown(cut_off=True) if shown else None)
        await self._reply(target, notice, platform)

    def _record_shown(self, turn_id: int, message_ids: list[str]) -> None:
        """Store the reply's messages shown so far (`Repository.reply_started`), so that a
        restart edits them instead of sending them again. In the background: the reply
        streams on meanwhile. A newer record replaces one still waiting to be written."""
        previous = self._recording.get(turn_id)
        if previous is not None:
            previous.cancel()  # still queued: dropped; being written: it completes first
        task = self._recording[turn_id] = self._spawn(self._write_shown(turn_id, message_ids), f"reply-shown:{turn_id}")
        task.add_done_callback(
            lambda done: self._recording.pop(turn_id) if self._recording.get(turn_id) is done else None
        )

    async def _write_shown(self, turn_id: int, message_ids: list[str]) -> None:
        try:
            await self._repo.reply_started(turn_id, message_ids)
        except StorageError as exc:  # the reply goes on; only a restart would send it again
            self._storage_failed(exc, "recording a reply's messages")

    async def _finish(self, turn_id: int, state: TurnState, reply: FinishedReply | None = None) -> None:
        """`Repository.finish_turn`; a storage failure is logged (rate-limited), not raised.
        A record of the reply's messages still waiting is dropped first (the end stores
        them too); one being written is waited for, so it cannot land after the end."""
        recording = self._recording.pop(turn_id, None)
        if recording is not None and not recording.done():
            recording.cancel()
            await asyncio.wait({recording})
        try:
            await self._repo.finish_turn(turn_id, state, reply)
        except StorageError as exc:
            self._storage_failed(exc, f"storing the end of turn {turn_id}")

    # ------------------------------------------------------------------ delivery

    async def _park(
        self, turn_id: int, event: IncomingMessage, streamer: ReplyStreamer, reply: FinishedReply, exc: DeliveryError
    ) -> None:
        """The platform did not take the reply: store it as undelivered, and retry later."""
        logger.warning(
            "reply to %s not delivered (%s: %s); it is stored and will be retried", event.sender, exc.kind, exc
        )
        self._observer.platform_error(event.platform, exc.kind)
        self._observer.message(event.platform, "undelivered")
        await self._finish(turn_id, "undelivered", reply)
        self._redelivering.add(turn_id)  # until delivered: `recover` leaves it to the retries
        self._spawn(self._redeliver(turn_id, event, streamer, reply), f"redeliver:{turn_id}")

    async def _redeliver(
        self, turn_id: int, event: IncomingMessage, streamer: ReplyStreamer, reply: FinishedReply
    ) -> None:
        try:
            for attempt in itertools.count():
                await asyncio.sleep(REDELIVERY_DELAYS_S[min(attempt, len(REDELIVERY_DELAYS_S) - 1)])
                try:
                    await streamer.finish()
                except DeliveryError as exc:
                    self._observer.platform_error(event.platform, exc.kind)
                    if exc.permanent:
                        logger.warning("reply to %s can never be delivered: %s", event.sender, exc)
                        await self._finish(turn_id, "failed", reply)
                        return
                    logger.info("reply to %s still not delivered (attempt %d): %s", event.sender, attempt + 2, exc)
                    continue
                await self._finish(
                    turn_id, "answered", dataclasses.replace(reply, platform_message_ids=tuple(streamer.message_ids))
                )
                logger.info("reply to %s delivered after %d attempt(s)", event.sender, attempt + 2)
                return
        finally:
            self._redelivering.discard(turn_id)

    async def _deliver(
        self, turn_id: int, event: IncomingMessage, streamer: ReplyStreamer, reply: FinishedReply
    ) -> None:
        """A recovered undelivered reply: show it, then mark it answered."""
        try:
            await streamer.finish()
        except DeliveryError as exc:
            if exc.permanent:
                raise
            logger.warning(
                "stored reply to %s still not delivered (%s: %s); retrying later", event.sender, exc.kind, exc
            )
            self._observer.platform_error(event.platform, exc.kind)
            self._redelivering.add(turn_id)
            self._spawn(self._redeliver(turn_id, event, streamer, reply), f"redeliver:{turn_id}")
            return
        await self._finish(
            turn_id, "answered", dataclasses.replace(reply, platform_message_ids=tuple(streamer.message_ids))
        )
        self._observer.message(event.platform, "answered")

    async def _tell_missed(self, open_turn: OpenTurn, target: ReplyTarget) -> None:
        event = open_turn.event
        try:
            try:
                await target.send(
                    f"Sorry, I was offline and missed your message “{_quote(event.text)}”. "
                    "Please send it again if you still need an answer."
                )
            except DeliveryError as exc:
                self._observer.platform_error(event.platform, exc.kind)
                if not exc.permanent:  # stays pending: the next start tells them
                    logger.warning("could not tell %s about a missed message: %s", event.sender, exc)
                    return
            await self._finish(open_turn.id, "missed")
            self._observer.message(event.platform, "missed")
        finally:
            self._in_flight.discard(open_turn.id)

    # ------------------------------------------------------------------ odds and ends

    def _storage_failed(self, exc: StorageError, what: str) -> None:
        """Log a storage failure: one ERROR with its traceback per `STORAGE_LOG_EVERY_S`,
        then how many more there were (a broken disk fails every message)."""
        now = time.monotonic()
        if now - self._storage_logged_at < STORAGE_LOG_EVERY_S:
            self._storage_unlogged += 1
            return
        unlogged, self._storage_unlogged = self._storage_unlogged, 0
        self._storage_logged_at = now
        more = f" ({unlogged} more storage failure(s) in the last {STORAGE_LOG_EVERY_S:.0f} s)" if unlogged else ""
        logger.error("storage failed while %s: %s%s", what, exc, more, exc_info=exc)

    async def _keep_typing(self, conv: _Conversation) -> None:
        """While the conversation has turns waiting or being answered."""
        await asyncio.sleep(TYPING_DELAY_S)
        while True:
            turn = conv.active or (conv.waiting[0] if conv.waiting else None)
            if turn is not None:
                try:
                    await turn.target.typing()
                except BotError as exc:
                    logger.debug("typing indicator failed: %s", exc)
            await asyncio.sleep(TYPING_RENEW_S)


def _turn_key(event: IncomingMessage) -> tuple[str, str, str]:
    """What the store keys a turn by."""
    return (event.platform, event.chat_id, event.message_id)


def _where(event: IncomingMessage) -> tuple[str, str, str]:
    return (event.platform, event.message_id, event.chat_id)


def _completed() -> asyncio.Future[None]:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done
