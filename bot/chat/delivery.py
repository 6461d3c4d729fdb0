"""Getting text to a chat outside a streaming reply: short notices, replies the platform
did not take (stored as "undelivered" and retried in the background, with backoff),
recovered undelivered replies, and telling a sender that their message was missed."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Set

from bot.chat.background import Background
from bot.chat.records import TurnRecorder
from bot.chat.streaming import ReplyStreamer
from bot.errors import DeliveryError
from bot.events import IncomingMessage, Platform
from bot.ports import FinishedReply, Observer, OpenTurn, ReplyTarget

logger = logging.getLogger(__name__)

MISSED_QUOTE_CHARS = 60


def _quote(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MISSED_QUOTE_CHARS else line[: MISSED_QUOTE_CHARS - 1].rstrip() + "…"


class Delivery:
    """Delivers notices and stored replies; retries a reply the platform did not take
    after each of `redelivery_delays` (seconds), then every last one, until it is
    delivered or the bot stops (a restart delivers it then)."""

    def __init__(
        self,
        observer: Observer,
        records: TurnRecorder,
        background: Background,
        *,
        redelivery_delays: tuple[float, ...],
    ) -> None:
        self._observer = observer
        self._records = records
        self._background = background
        self._delays = redelivery_delays
        # Turn ids whose stored reply is being retried here (`_redeliver`).
        self._redelivering: set[int] = set()

    @property
    def redelivering(self) -> Set[int]:
        """Turn ids whose stored reply is being retried here: `recover` leaves them alone."""
        return self._redelivering

    async def notice(self, target: ReplyTarget, text: str, platform: Platform) -> None:
        """Send a short notice; a platform failure is logged and counted, never raised."""
        try:
            await ReplyStreamer(target).finish(text)
        except DeliveryError as exc:
            logger.warning("could not deliver a notice: %s", exc)
            self._observer.platform_error(platform, exc.kind)

    async def park(
        self, turn_id: int, event: IncomingMessage, streamer: ReplyStreamer, reply: FinishedReply, exc: DeliveryError
    ) -> None:
        """The platform did not take the reply: store it as undelivered, and retry later."""
        logger.warning(
            "reply to %s not delivered (%s: %s); it is stored and will be retried", event.sender, exc.kind, exc
        )
        self._observer.platform_error(event.platform, exc.kind)
        self._observer.message(event.platform, "undelivered")
        await self._records.finish(turn_id, "undelivered", reply)
        self._redelivering.add(turn_id)  # until delivered: `recover` leaves it to the retries
        self._background.spawn(self._redeliver(turn_id, event, streamer, reply), f"redeliver:{turn_id}")

    async def _redeliver(
        self, turn_id: int, event: IncomingMessage, streamer: ReplyStreamer, reply: FinishedReply
    ) -> None:
        try:
            for attempt in itertools.count():
                await asyncio.sleep(self._delays[min(attempt, len(self._delays) - 1)])
                try:
                    await streamer.finish()
                except DeliveryError as exc:
                    self._observer.platform_error(event.platform, exc.kind)
                    if exc.permanent:
                        logger.warning("reply to %s can never be delivered: %s", event.sender, exc)
                        await self._records.finish(turn_id, "failed", reply)
                        return
                    logger.info("reply to %s still not delivered (attempt %d): %s", event.sender, attempt + 2, exc)
                    continue
                await self._records.finish(
                    turn_id, "answered", dataclasses.replace(reply, platform_message_ids=tuple(streamer.message_ids))
                )
                logger.info("reply to %s delivered after %d attempt(s)", event.sender, attempt + 2)
                return
        finally:
            self._redelivering.discard(turn_id)

    async def deliver(
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
            self._background.spawn(self._redeliver(turn_id, event, streamer, reply), f"redeliver:{turn_id}")
            return
        await self._records.finish(
            turn_id, "answered", dataclasses.replace(reply, platform_message_ids=tuple(streamer.message_ids))
        )
        self._observer.message(event.platform, "answered")

    async def tell_missed(self, open_turn: OpenTurn, target: ReplyTarget) -> None:
        """A turn too old to answer after a restart: its sender is told, and it ends as
        "missed". A notice the platform did not take leaves it pending: the next start
        tells them."""
        event = open_turn.event
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
        await self._records.finish(open_turn.id, "missed")
        self._observer.message(event.platform, "missed")
