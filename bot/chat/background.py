"""The conversation manager's background work: named tasks, tracked so that closing the
manager cancels and awaits every one of them, and the flag that says it is closing."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Background:
    """Named tasks of one conversation manager and its parts (conversation runners,
    commands, records of shown messages, redeliveries, missed-message notices)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        # Set once the manager closes: nothing new starts, and a turn stopped meanwhile
        # stays "pending" for the next start.
        self.closing = False

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run `coro` as a tracked task named `name`."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_all(self) -> None:
        """Cancel every task still running and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
