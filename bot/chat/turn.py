"""Running one chat turn: its prompt, a model slot, the streamed reply, and how it ends
(answered, stopped, cut off, failed, or parked for redelivery). While the reply streams,
the messages it shows are recorded (`Repository.reply_started`), so that a restart edits
them instead of sending them again."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Callable

from bot.chat.background import Background
from bot.chat.delivery import Delivery
from bot.chat.policy import Policy
from bot.chat.prompt import build_prompt
from bot.chat.records import StorageFailureLog, TurnRecorder
from bot.chat.session import SessionStore
from bot.chat.streaming import ReplyStreamer
from bot.config import Settings
from bot.errors import (
    BotError,
    BusyError,
    DeliveryError,
    GenerationCancelled,
    GenerationError,
    ReplyCutOff,
    StorageError,
)
from bot.events import IncomingMessage, Platform
from bot.ports import (
    FinishedReply,
    GenerationParams,
    ModelBackend,
    Observer,
    RenderedPrompt,
    ReplyChunk,
    ReplyTarget,
    Repository,
    SamplingParams,
)

logger = logging.getLogger(__name__)

EMPTY_REPLY = "(I have no answer to that.)"
STOPPED_SUFFIX = " … [stopped]"
CUT_OFF_SUFFIX = " … [cut off]"
# A full model queue makes an accepted turn wait: it asks again after these pauses.
BUSY_RETRY_S = 0.05
BUSY_RETRY_MAX_S = 2.0


class TurnRunner:
    """Answers accepted chat turns, one call of `run` per turn."""

    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        model: ModelBackend,
        sessions: SessionStore,
        policy: Policy,
        *,
        records: TurnRecorder,
        delivery: Delivery,
        storage: StorageFailureLog,
        background: Background,
        observer: Observer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repo = repository
        self._model = model
        self._sessions = sessions
        self._policy = policy
        self._records = records
        self._delivery = delivery
        self._storage = storage
        self._background = background
        self._observer = observer
        self._clock = clock
        # Generations this process lets wait in the model's queue or run at once: never
        # more than its queue and batch hold, so an accepted turn waits here instead of
        # being refused as busy.
        running = settings.openai_max_concurrency if settings.model_backend == "openai" else settings.max_batch_size
        self._model_slots = asyncio.Semaphore(settings.queue_size + running)

    async def run(
        self,
        turn_id: int,
        event: IncomingMessage,
        target: ReplyTarget,
        *,
        shown: tuple[str, ...] = (),
        reply: str | None = None,
    ) -> None:
        """Answer the stored turn `turn_id`. A recovered turn brings the reply's messages
        already in the chat (`shown`) or, undelivered, the stored `reply` to deliver.
        Never raises `BotError`: the user is told, the turn's end is stored."""

        async def reply_started(message_ids: list[str]) -> None:
            self._records.record_shown(turn_id, message_ids)

        streamer = ReplyStreamer(target, clock=self._clock, shown=shown, on_new_message=reply_started)
        tokens = 0
        prompt_tokens = 0
        complete = False  # the chat shows the whole reply

        def as_shown(text: str | None = None, *, cut_off: bool = False) -> FinishedReply:
            return FinishedReply(
                streamer.text if text is None else text, tokens, tuple(streamer.message_ids), cut_off, prompt_tokens
            )

        try:
            if reply is not None:  # recovered: its reply is stored, deliver it
                streamer.add(reply)
                await self._delivery.deliver(turn_id, event, streamer, as_shown())
                return
            # Other processes sharing the store wait for this turn of the conversation.
            async with self._repo.conversation_turn(event.key):
                prompt = await self._prompt(turn_id, event)
                if prompt is None:  # a /reset deleted the message meanwhile
                    await self._records.finish(turn_id, "failed")
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
                    await self._delivery.park(turn_id, event, streamer, as_shown(), undelivered)
                    return
                empty = streamer.text == EMPTY_REPLY
                await self._records.finish(turn_id, "answered", None if empty else as_shown())
                if not empty:
                    self._policy.charge(event.platform, event.user_id, tokens)  # DAILY_TOKEN_QUOTA
                self._observer.message(event.platform, "answered")
        except asyncio.CancelledError:
            if complete:  # shown in full: only storing it was cut short
                await self._records.finish(turn_id, "answered", None if streamer.text == EMPTY_REPLY else as_shown())
            elif reply is None:  # (a stored reply being delivered stays "undelivered")
                await self._stopped(turn_id, streamer, as_shown)
            raise
        except DeliveryError as exc:  # permanent: the chat is gone, the bot blocked, ...
            logger.warning("reply to %s not delivered: %s", event.sender, exc)
            self._observer.platform_error(event.platform, exc.kind)
            self._observer.message(event.platform, "failed")
            # What the user saw before it failed stays, as the history's answer.
            await self._records.finish(turn_id, "failed", as_shown(cut_off=True) if streamer.message_ids else None)
        except ReplyCutOff as exc:
            # The user saw part of the reply (a model server went away mid-stream): it
            # stays, marked as cut off, in the chat and in the history.
            logger.warning("reply to %s cut off: %s", event.sender, exc)
            with contextlib.suppress(DeliveryError):
                await streamer.finish(CUT_OFF_SUFFIX)
            await self._records.finish(turn_id, "answered", as_shown(cut_off=True))
            await self._delivery.notice(target, exc.user_message, event.platform)
            self._observer.message(event.platform, "failed")
        except GenerationCancelled as exc:
            if self._background.closing:  # the model stopped first: answered after a restart
                await self._stopped(turn_id, streamer, as_shown)
            else:
                logger.warning("turn of %s stopped: %s", event.key, exc)
                await self._fail(turn_id, target, event.platform, streamer, as_shown, GenerationError.user_message)
                self._observer.message(event.platform, "failed")
        except StorageError as exc:
            self._storage.failed(exc, f"a turn of {event.sender}")
            await self._delivery.notice(target, exc.user_message, event.platform)
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
            await self._records.finish(turn_id, "answered", as_shown(cut_off=True))
        elif not self._background.closing:
            await self._records.finish(turn_id, "failed")

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
        await self._records.finish(turn_id, "failed", as_shown(cut_off=True) if shown else None)
        await self._delivery.notice(target, notice, platform)
