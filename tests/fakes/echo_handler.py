"""A test-local `IncomingHandler` for adapter tests that really uses the target."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from bot.chat.streaming import ReplyStreamer
from bot.errors import DeliveryError
from bot.events import IncomingMessage, Platform
from bot.ports import ReplyTarget


class TestHandler:
    """The `IncomingHandler` port around a test's own `handle`: `submit` accepts at once
    and runs `handle` in a task (the awaitable it returns); `recover` records its calls
    (``recoveries``: the platform and the adapter's target factory)."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.recoveries: list[tuple[Platform, Callable[[IncomingMessage], ReplyTarget]]] = []
        self.moves: list[tuple[str, str, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
        raise NotImplementedError

    async def submit(self, event: IncomingMessage, target: ReplyTarget) -> Awaitable[None]:
        task = asyncio.create_task(self.handle(event, target), name=f"test-handler:{event.message_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def recover(self, platform: Platform, make_target: Callable[[IncomingMessage], ReplyTarget]) -> None:
        self.recoveries.append((platform, make_target))

    async def move_chat(self, platform: str, old_chat_id: str, new_chat_id: str) -> None:
        self.moves.append((platform, old_chat_id, new_chat_id))


class EchoHandler(TestHandler):
    """Streams a reply (default ``"Echo: <text>"``) word by word through the core's
    `ReplyStreamer`, as the manager would.

    ``gates[text]`` (an `asyncio.Event`) holds that message's reply until set;
    ``started[text]`` is set when it arrives. With ``check_admin`` every message asks
    `sender_is_chat_admin` (recorded in ``admin_checks``); with ``typing`` it shows the
    typing indicator first. Target errors are recorded in ``errors``, then re-raised
    when ``reraise`` (as a careless handler would let them escape) or end the reply
    quietly, as the core does."""

    def __init__(
        self,
        reply_for: Callable[[str], str] | None = None,
        piece_delay: float = 0.002,
        *,
        check_admin: bool = False,
        typing: bool = False,
        reraise: bool = False,
    ) -> None:
        super().__init__()
        self.events: list[IncomingMessage] = []
        self.targets: list[ReplyTarget] = []
        self.errors: list[DeliveryError] = []
        self.finished: list[str] = []
        self.admin_checks: list[bool] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.reply_for = reply_for or (lambda text: f"Echo: {text}")
        self.piece_delay = piece_delay
        self.check_admin = check_admin
        self.typing = typing
        self.reraise = reraise

    async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
        self.events.append(event)
        self.targets.append(target)
        self.started.setdefault(event.text, asyncio.Event()).set()
        if self.check_admin:
            self.admin_checks.append(await target.sender_is_chat_admin())
        gate = self.gates.get(event.text)
        if gate is not None:
            await gate.wait()
        streamer = ReplyStreamer(target)
        try:
            if self.typing:
                await target.typing()
            for word in self.reply_for(event.text).split(" "):
                await streamer.push(word if not streamer.text else " " + word)
                await asyncio.sleep(self.piece_delay)
            await streamer.finish()
        except DeliveryError as exc:
            self.errors.append(exc)
            if self.reraise:
                raise
            return
        self.finished.append(event.text)

    def texts(self) -> list[str]:
        return [e.text for e in self.events]
