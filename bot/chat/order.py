"""Per-conversation order: each conversation's queue of chat turns and the task that
answers them one at a time, in the order they were accepted (different conversations
run concurrently), with a typing indicator while any wait. Also what this process
counts of its turns: accepted and not ended (the busy bound), the stored turn ids it
works on (`recover` leaves them alone) and the messages being stored right now."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Set
from dataclasses import dataclass, field

from bot.chat.background import Background
from bot.chat.records import TurnRecorder
from bot.chat.turn import TurnRunner
from bot.errors import BotError
from bot.events import ConversationKey, IncomingMessage
from bot.ports import OpenTurn, ReplyTarget

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class QueuedTurn:
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
    previous: QueuedTurn | None = None  # the one before it in its conversation, when it arrived


@dataclass(slots=True)
class _Conversation:
    waiting: deque[QueuedTurn] = field(default_factory=deque)
    active: QueuedTurn | None = None  # taken from the queue, not ended yet
    current: asyncio.Task[None] | None = None  # the active turn's task, once it runs
    runner: asyncio.Task[None] | None = None

    @property
    def unanswered(self) -> int:
        return len(self.waiting) + (self.active is not None)


def turn_key(event: IncomingMessage) -> tuple[str, str, str]:
    """What the store keys a turn by."""
    return (event.platform, event.chat_id, event.message_id)


class ConversationQueues:
    """The queues of every conversation of one manager. A turn shows the typing indicator
    after `typing_delay` seconds of waiting or being answered, renewed every
    `typing_renew` seconds."""

    def __init__(
        self,
        turns: TurnRunner,
        records: TurnRecorder,
        background: Background,
        *,
        typing_delay: float,
        typing_renew: float,
    ) -> None:
        self._turns = turns
        self._records = records
        self._background = background
        self._typing_delay = typing_delay
        self._typing_renew = typing_renew
        self._conversations: dict[ConversationKey, _Conversation] = {}
        # Accepted chat turns not ended yet in this process (the busy bound counts them).
        self._pending = 0
        # Turn ids being answered or delivered here: `recover` leaves them alone.
        self._in_flight: set[int] = set()
        # Messages queued here whose turn is being stored (its id not known yet): a
        # `recover` reading the store meanwhile must not take them for a restart's.
        self._accepting: set[tuple[str, str, str]] = set()

    # ------------------------------------------------------------------ admission

    def reserve(self, event: IncomingMessage, target: ReplyTarget) -> QueuedTurn:
        """Queue a chat message in its conversation (not accepted yet: see `stored`)."""
        conv = self._conversations.setdefault(event.key, _Conversation())
        turn = self._new_turn(event, target)
        turn.ahead = conv.unanswered
        turn.pending_ahead = self._pending
        turn.previous = conv.waiting[-1] if conv.waiting else conv.active
        conv.waiting.append(turn)
        self._accepting.add(turn_key(event))
        self._pending += 1
        self._start(event.key, conv)
        return turn

    def unreserve(self, turn: QueuedTurn | None) -> None:
        """A queued message that is not accepted after all: it leaves the queue."""
        if turn is None or turn.settled:
            return
        self._accepting.discard(turn_key(turn.event))
        if not turn.accepted.done():
            turn.accepted.set_result(None)
        conv = self._conversations.get(turn.event.key)
        if conv is not None and turn in conv.waiting:
            conv.waiting.remove(turn)
        self._settle(turn)

    def stored(self, turn: QueuedTurn, turn_id: int | None) -> None:
        """The queued message was stored as the turn `turn_id` (None: a redelivery)."""
        self._accepting.discard(turn_key(turn.event))
        turn.previous = None
        if turn_id is not None:
            self._in_flight.add(turn_id)
        turn.accepted.set_result(turn_id)

    def not_stored(self, turn: QueuedTurn) -> None:
        """Storing the queued message failed (or was cancelled)."""
        self._accepting.discard(turn_key(turn.event))
        if not turn.accepted.done():
            turn.accepted.set_result(None)

    # ------------------------------------------------------------------ recovery

    def works_on(self, open_turn: OpenTurn) -> bool:
        """Whether this process answers (or is storing) the open turn already."""
        return open_turn.id in self._in_flight or turn_key(open_turn.event) in self._accepting

    def claim(self, turn_id: int) -> None:
        """This process works on the stored turn (until `release`, or its turn settles)."""
        self._in_flight.add(turn_id)

    def release(self, turn_id: int) -> None:
        """This process is done with the stored turn."""
        self._in_flight.discard(turn_id)

    def recovered(self, open_turn: OpenTurn, target: ReplyTarget) -> QueuedTurn:
        """A turn for an open turn of a restart (not queued yet: see `queue_recovered`)."""
        turn = self._new_turn(open_turn.event, target)
        turn.accepted.set_result(open_turn.id)
        turn.shown, turn.reply = open_turn.reply_message_ids, open_turn.reply
        return turn

    def queue_recovered(self, key: ConversationKey, turns: list[QueuedTurn]) -> None:
        """Queue recovered turns of a conversation ahead of anything waiting there."""
        conv = self._conversations.setdefault(key, _Conversation())
        conv.waiting.extendleft(reversed(turns))  # accepted before anything waiting here
        self._pending += len(turns)
        self._start(key, conv)

    # ------------------------------------------------------------------ stopping and counts

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
            await self._records.finish(turn_id, "failed")
        return len(stopped)

    async def stop_replies(self) -> None:
        """Cancel every reply in progress and wait for them to end (closing)."""
        current = [c.current for c in self._conversations.values() if c.current is not None and not c.current.done()]
        for task in current:
            task.cancel()
        if current:
            await asyncio.wait(current)

    def waiting_turns(self) -> int:
        """Messages accepted but waiting for an earlier turn of their conversation."""
        return sum(len(c.waiting) for c in self._conversations.values())

    @property
    def in_flight(self) -> Set[int]:
        """Stored turn ids this process works on (queued, being answered, claimed)."""
        return self._in_flight

    # ------------------------------------------------------------------ running a conversation

    def _new_turn(self, event: IncomingMessage, target: ReplyTarget) -> QueuedTurn:
        loop = asyncio.get_running_loop()
        return QueuedTurn(event, target, loop.create_future(), loop.create_future())

    def _start(self, key: ConversationKey, conv: _Conversation) -> None:
        if conv.runner is None:
            conv.runner = self._background.spawn(self._run_conversation(key, conv), f"conversation:{key}")

    def _settle(self, turn: QueuedTurn) -> None:
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

    async def _run_conversation(self, key: ConversationKey, conv: _Conversation) -> None:
        typing = asyncio.create_task(self._keep_typing(conv), name=f"typing:{key}")
        try:
            while conv.waiting and not self._background.closing:
                turn = conv.active = conv.waiting.popleft()
                try:
                    turn_id = await asyncio.shield(turn.accepted)
                    if turn_id is not None and not turn.dropped:
                        conv.current = asyncio.create_task(
                            self._turns.run(turn_id, turn.event, turn.target, shown=turn.shown, reply=turn.reply),
                            name=f"turn:{key}:{turn.event.message_id}",
                        )
                        await asyncio.wait({conv.current})
                    elif turn_id is not None:  # a /reset dropped it while it was being stored
                        await self._records.finish(turn_id, "failed")
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

    async def _keep_typing(self, conv: _Conversation) -> None:
        """While the conversation has turns waiting or being answered."""
        await asyncio.sleep(self._typing_delay)
        while True:
            turn = conv.active or (conv.waiting[0] if conv.waiting else None)
            if turn is not None:
                try:
                    await turn.target.typing()
                except BotError as exc:
                    logger.debug("typing indicator failed: %s", exc)
            await asyncio.sleep(self._typing_renew)
