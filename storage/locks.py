"""One chat turn at a time per conversation across every process sharing a PostgreSQL
database: a session-level advisory lock per conversation, held for the turn.

Within a process the conversation manager already runs a conversation's turns one after
another, so a lock is only ever contended by another process. The uncontended case is
one `pg_try_advisory_lock` on one of the few connections this process keeps for its
locks, which in the same round trip reads the session's stored settings (the turn needs
them first, and with other processes changing them they are read at every turn), and
one unlock. When another process holds the lock, the turn waits in a blocking
`pg_advisory_lock` on a connection of its own: PostgreSQL queues waiters in arrival order
and hands the lock over on release, so turns of one conversation run in the order their
processes asked. Waiting turns therefore never take connections from the repository's
pool.

These are plain asyncpg connections (the driver SQLAlchemy uses for the rest), opened
with the engine's own connection arguments: two tiny statements per turn are the hot
path, and asyncpg alone runs them at a fraction of the cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.errors import StorageError
from bot.events import ConversationKey
from bot.ports import SettingValue

logger = logging.getLogger(__name__)

# Connections each process keeps for uncontended locks: a conversation's lock is always
# taken and released on the same one (chosen by its number), and turns of different
# conversations do not queue behind one connection's round trips.
LOCK_CONNECTIONS = 4

_TRY_LOCK_AND_SETTINGS = (
    "SELECT pg_try_advisory_lock($1), "
    "(SELECT settings FROM conversations WHERE platform = $2 AND chat_id = $3 AND user_id = $4)"
)
_LOCK_THEN_SETTINGS = (
    "SELECT pg_advisory_lock($1), "
    "(SELECT settings FROM conversations WHERE platform = $2 AND chat_id = $3 AND user_id = $4)"
)
_UNLOCK = "SELECT pg_advisory_unlock($1)"
_FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


def lock_id(key: ConversationKey) -> int:
    """The conversation's advisory lock number: the same in every process (a stable hash)."""
    raw = "\x1f".join((key.platform, key.chat_id, key.user_id)).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=b"bot-turn").digest(), "big", signed=True)


def _storage_error(exc: BaseException) -> StorageError:
    return StorageError(f"conversation lock failed: {type(exc).__name__}: {exc}")


def _settings(raw: str | None) -> dict[str, SettingValue]:
    """The JSON column as asyncpg returns it (text)."""
    if raw is None:
        return {}
    value = json.loads(raw)
    return dict(value) if isinstance(value, dict) else {}


class _SharedConnection:
    """One of the connections a process keeps for uncontended locks, opened on first use
    and replaced after a failure; one statement at a time."""

    def __init__(self) -> None:
        self.connection: asyncpg.Connection | None = None
        self.statements = asyncio.Lock()


class AdvisoryLocks:
    """Per-conversation advisory locks on the PostgreSQL database `engine` connects to."""

    def __init__(self, engine: AsyncEngine) -> None:
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        self._connect_args: tuple[list[Any], dict[str, Any]] = (list(args), dict(kwargs))
        self._shared = [_SharedConnection() for _ in range(LOCK_CONNECTIONS)]

    @asynccontextmanager
    async def hold(self, key: ConversationKey) -> AsyncIterator[dict[str, SettingValue]]:
        """Hold `key`'s lock for the block, which gets the session's stored settings as
        they were when the lock was taken. Raises `StorageError` if it cannot be taken."""
        number = lock_id(key)
        shared = self._shared[number % LOCK_CONNECTIONS]
        own, settings = await self._acquire(key, number, shared)
        try:
            yield settings
        finally:
            await self._release(number, shared, own)

    async def close(self) -> None:
        """Close the lock connections (which releases any lock still held)."""
        for shared in self._shared:
            async with shared.statements:
                await self._drop(shared)

    async def _acquire(
        self, key: ConversationKey, number: int, shared: _SharedConnection
    ) -> tuple[asyncpg.Connection | None, dict[str, SettingValue]]:
        """Take the lock: on the shared connection (own connection None) when free, else
        waiting on a connection of its own (returned; closing it releases the lock)."""
        attempt = asyncio.ensure_future(self._try_shared(key, number, shared))
        try:
            # Shielded: a statement cut off half-way would leave the shared connection,
            # and every lock on it, in doubt.
            taken, settings = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # the attempt goes on: give back what it took
                if (await attempt)[0]:
                    await self._release(number, shared, None)
            raise
        if taken:
            return None, settings
        try:
            connection = await self._connect()
        except _FAILURES as exc:
            raise _storage_error(exc) from exc
        try:
            # The settings are read once the lock is ours: they may have changed meanwhile.
            row = await connection.fetchrow(_LOCK_THEN_SETTINGS, number, key.platform, key.chat_id, key.user_id)
        except BaseException as exc:
            # Cancelled while waiting (a /reset, shutdown) or failed: the connection goes,
            # and with it the request or the lock.
            connection.terminate()
            if isinstance(exc, _FAILURES):
                raise _storage_error(exc) from exc
            raise
        assert row is not None
        return connection, _settings(row[1])

    async def _try_shared(
        self, key: ConversationKey, number: int, shared: _SharedConnection
    ) -> tuple[bool, dict[str, SettingValue]]:
        async with shared.statements:
            try:
                if shared.connection is None:
                    shared.connection = await self._connect()
                row = await shared.connection.fetchrow(
                    _TRY_LOCK_AND_SETTINGS, number, key.platform, key.chat_id, key.user_id
                )
            except _FAILURES as exc:
                await self._drop(shared)
                raise _storage_error(exc) from exc
            assert row is not None
            return bool(row[0]), _settings(row[1])

    async def _release(self, number: int, shared: _SharedConnection, own: asyncpg.Connection | None) -> None:
        if own is not None:
            own.terminate()  # ends its session, and the lock with it
            return
        async with shared.statements:
            if shared.connection is None:  # lost with its connection: nothing left to release
                return
            try:
                await shared.connection.fetchval(_UNLOCK, number)
            except _FAILURES as exc:
                logger.warning("releasing a conversation lock failed (%s); reconnecting", type(exc).__name__)
                await self._drop(shared)

    async def _connect(self) -> asyncpg.Connection:
        args, kwargs = self._connect_args
        connection: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
        return connection

    @staticmethod
    async def _drop(shared: _SharedConnection) -> None:
        connection, shared.connection = shared.connection, None
        if connection is not None:
            connection.terminate()  # its state may be mid-statement: never reused
