"""The conversation manager: per-conversation ordering, the turn, failure handling."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from bot.chat.commands import CommandRunner, parse_command
from bot.chat.prompt import build_prompt
from bot.chat.session import SessionStore
from bot.chat.streaming import ReplyStreamer
from bot.config import Settings
from bot.errors import (
    BotError,
    BusyError,
    CommandError,
    DeliveryError,
    GenerationError,
    InputRejected,
    ReplyCutOff,
)
from bot.events import ConversationKey, IncomingMessage, Platform
from bot.ports import GenerationParams, ModelBackend, ReplyTarget, Repository, SamplingParams

logger = logging.getLogger(__name__)

TYPING_RENEW_S = 4.0  # Telegram shows "typing" for 5 s, Discord for 10 s
TYPING_DELAY_S = 1.0  # an answer that starts sooner needs no indicator (saves requests)
MAX_WAITING_PER_CONVERSATION = 5
EMPTY_REPLY = "(I have no answer to that.)"
STOPPED_SUFFIX = " … [stopped]"
CUT_OFF_SUFFIX = " … [cut off]"
# Lone UTF-16 surrogates (JSON can carry them) cannot be stored as UTF-8.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(slots=True)
class _Turn:
    event: IncomingMessage
    target: ReplyTarget
    done: asyncio.Future[None]


@dataclass(slots=True)
class _Conversation:
    waiting: deque[_Turn] = field(default_factory=deque)
    runner: asyncio.Task[None] | None = None
    current: asyncio.Task[None] | None = None


def looks_binary(text: str) -> bool:
    """Text with NULs, or mostly control characters, is binary data pasted as text."""
    if "\x00" in text:
        return True
    controls = sum(1 for c in text if unicodedata.category(c) == "Cc" and c not in "\n\r\t")
    return controls > max(2, len(text) // 10)


class ConversationManager:
    """Handles every incoming message of every platform.

    Messages of one conversation are handled strictly in arrival order; different
    conversations run concurrently. Commands run at once (a `/reset` stops a reply in
    progress). Use as `async with manager:`; leaving stops every conversation.
    """

    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        model: ModelBackend,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._repo = repository
        self._model = model
        self._clock = clock
        self._sessions = SessionStore(settings.session_defaults(), repository, cache=not repository.shared)
        self._commands = CommandRunner(settings, repository, self._sessions, model, conversations=self)
        self._conversations: dict[ConversationKey, _Conversation] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every conversation (replies in progress end with a note) and wait."""
        self._closing = True
        await self.stop(lambda _key: True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ entry point

    async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
        """Handle one message; returns when its reply is complete. Never raises
        `BotError`: the user gets an explanation and the log the details."""
        if self._closing:
            return
        if _LONE_SURROGATE.search(event.text):
            event = dataclasses.replace(event, text=_LONE_SURROGATE.sub("\ufffd", event.text))
        try:
            command = parse_command(event.text)
            if command is not None:
                await self._reply(target, await self._commands.run(command, event, target))
                return
            self._check_input(event.text)
        except CommandError as exc:
            logger.info("%s from %s: %s", type(exc).__name__, event.sender, exc)
            await self._reply(target, exc.user_message)
            return
        except BotError as exc:
            logger.exception("command from %s failed", event.sender)
            await self._reply(target, exc.user_message)
            return
        if not event.text.strip():
            await self._reply(target, "Send me a message and I'll answer. /help lists the commands.")
            return
        await self._enqueue(event, target)

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

    async def _reply(self, target: ReplyTarget, text: str) -> None:
        """Send a short notice; a platform failure is logged, never raised."""
        try:
            await ReplyStreamer(target).finish(text)
        except DeliveryError as exc:
            logger.warning("could not deliver a notice: %s", exc)

    # ------------------------------------------------------------------ ordering

    async def _enqueue(self, event: IncomingMessage, target: ReplyTarget) -> None:
        key = event.key
        conv = self._conversations.setdefault(key, _Conversation())
        if len(conv.waiting) >= MAX_WAITING_PER_CONVERSATION:
            await self._reply(target, "You're writing faster than I can answer. Please wait for my replies.")
            return
        turn = _Turn(event, target, asyncio.get_running_loop().create_future())
        conv.waiting.append(turn)
        if conv.runner is None:
            conv.runner = self._spawn(self._run_conversation(key, conv), f"conversation:{key}")
        # The caller being cancelled (an adapter shutting down) must not cancel the turn.
        await asyncio.shield(turn.done)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run_conversation(self, key: ConversationKey, conv: _Conversation) -> None:
        try:
            while conv.waiting:
                turn = conv.waiting.popleft()
                conv.current = asyncio.create_task(
                    self._run_turn(turn.event, turn.target), name=f"turn:{key}:{turn.event.message_id}"
                )
                try:
                    await asyncio.wait({conv.current})
                finally:
                    if not turn.done.done():
                        turn.done.set_result(None)
                    conv.current = None
        finally:
            conv.runner = None
            for turn in conv.waiting:
                if not turn.done.done():
                    turn.done.set_result(None)
            conv.waiting.clear()
            if self._conversations.get(key) is conv:
                del self._conversations[key]

    async def stop(self, match: Callable[[ConversationKey], bool]) -> int:
        """Drop waiting turns and cancel replies in progress of matching conversations."""
        stopped: list[asyncio.Task[None]] = []
        for key, conv in list(self._conversations.items()):
            if not match(key):
                continue
            while conv.waiting:
                conv.waiting.popleft().done.set_result(None)
            if conv.current is not None and not conv.current.done():
                conv.current.cancel()
                stopped.append(conv.current)
        if stopped:
            await asyncio.wait(stopped)
        return len(stopped)

    def waiting_turns(self) -> int:
        """Messages accepted but waiting for an earlier turn of their conversation."""
        return sum(len(c.waiting) for c in self._conversations.values())

    # ------------------------------------------------------------------ the turn

    async def _run_turn(self, event: IncomingMessage, target: ReplyTarget) -> None:
        typing = asyncio.create_task(self._keep_typing(target), name=f"typing:{event.key}")
        streamer = ReplyStreamer(target, clock=self._clock)
        try:
            # Other processes sharing the store wait for this turn of the conversation.
            async with self._repo.conversation_turn(event.key):
                await self._generate_reply(event, target, streamer)
        except asyncio.CancelledError:
            typing.cancel()
            if streamer.message_ids:  # tell the user the partial reply is cut short
                with contextlib.suppress(BotError, asyncio.TimeoutError):
                    await asyncio.wait_for(streamer.finish(STOPPED_SUFFIX), timeout=2.0)
            raise
        except BotError as exc:
            if isinstance(exc, DeliveryError):
                logger.warning("reply to %s not delivered: %s", event.key, exc)
            else:
                logger.exception("turn of %s failed", event.key)
                await self._reply(target, exc.user_message)
        except Exception:
            logger.exception("unexpected error in turn of %s", event.key)
            await self._reply(target, GenerationError.user_message)
        finally:
            typing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await typing

    async def _generate_reply(self, event: IncomingMessage, target: ReplyTarget, streamer: ReplyStreamer) -> None:
        key = event.key
        settings = await self._sessions.effective(key)
        # Stored first: whatever happens to the reply, the user's message is kept.
        history = await self._repo.add_and_recent(
            key,
            "user",
            event.text,
            await self._model.count_tokens(event.text),
            event.message_id,
            settings.history_turns + 1,
        )
        prompt = await build_prompt(self._model, settings.system_prompt, history, settings.max_new_tokens)
        params = GenerationParams(
            max_new_tokens=prompt.max_new_tokens,
            sampling=SamplingParams(temperature=settings.temperature, top_p=settings.top_p),
            model=settings.model or None,
        )
        stream = self._model.generate(prompt.rendered, params)
        tokens = 0
        try:
            try:
                async for chunk in stream:
                    tokens += chunk.tokens
                    await streamer.push(chunk.text)
            finally:
                await stream.aclose()
            await streamer.finish("" if streamer.text.strip() else EMPTY_REPLY)
        except DeliveryError:
            if streamer.message_ids:  # the user saw part of it: keep what was said
                await self._store_reply(key, streamer, tokens)
            raise
        except ReplyCutOff:
            # The user saw part of the reply (a model server went away mid-stream): it
            # stays, marked as cut off, in the chat and in the history.
            if streamer.text.strip():
                try:
                    await streamer.finish(CUT_OFF_SUFFIX)
                finally:
                    await self._store_reply(key, streamer, tokens)
            raise
        except (BusyError, GenerationError):
            if streamer.text.strip():
                await streamer.finish(STOPPED_SUFFIX)
            raise
        await self._store_reply(key, streamer, tokens)

    async def _store_reply(self, key: ConversationKey, streamer: ReplyStreamer, tokens: int) -> None:
        text = streamer.text
        if text.strip() and text != EMPTY_REPLY:
            ids = streamer.message_ids
            await self._repo.add_message(key, "assistant", text, tokens, ids[0] if ids else None)

    async def _keep_typing(self, target: ReplyTarget) -> None:
        await asyncio.sleep(TYPING_DELAY_S)
        while True:
            try:
                await target.typing()
            except BotError as exc:
                logger.debug("typing indicator failed: %s", exc)
            await asyncio.sleep(TYPING_RENEW_S)
