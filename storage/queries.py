"""Statements and clauses for `SqlRepository`: those it needs in several places, and
those of the hot path, built once where they can be (SQLAlchemy then reuses their
compiled form).

Reads of a conversation's newest messages walk the (conversation_id, id) index
backwards, so their cost does not grow with the size of its history.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    ScalarSelect,
    Select,
    bindparam,
    insert,
    literal_column,
    select,
    union_all,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import ReturningInsert

from bot.errors import StorageError
from bot.events import ConversationKey
from bot.ports import SettingValue
from storage.models import Conversation, Message, utcnow

# Appends written in one unit of work at most: `newest_of_many` reads all their histories
# back in one statement (SQLite allows 500 terms in a UNION).
MAX_APPEND_BATCH = 64

# The dialects whose INSERT has ON CONFLICT (the race-safe way to create a conversation).
_UPSERT_INSERTS: dict[str, Callable[[Any], sqlite.Insert | postgresql.Insert]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}

# In the order of `StoredMessage`'s fields.
_MESSAGE_COLUMNS = (
    Message.id,
    Message.role,
    Message.content,
    Message.token_count,
    Message.created_at,
    Message.platform_message_id,
)


def matches_key(key: ConversationKey) -> ColumnElement[bool]:
    """True for the conversation row of `key`."""
    return (
        (Conversation.platform == key.platform)
        & (Conversation.chat_id == key.chat_id)
        & (Conversation.user_id == key.user_id)
    )


def conversation_id_of(key: ConversationKey) -> ScalarSelect[int]:
    """The conversation's id as a scalar subquery (NULL when it does not exist)."""
    return select(Conversation.id).where(matches_key(key)).scalar_subquery()


def upsert_conversation(dialect: str, key: ConversationKey) -> ReturningInsert[int, dict[str, SettingValue]]:
    """Create the conversation of `key` if missing (race-safe) or touch its `updated_at`;
    returns its id and settings."""
    if dialect not in _UPSERT_INSERTS:
        raise StorageError(f"unsupported database dialect {dialect!r}")
    now = utcnow()
    stmt = _UPSERT_INSERTS[dialect](Conversation).values(
        platform=key.platform,
        chat_id=key.chat_id,
        user_id=key.user_id,
        settings={},
        created_at=now,
        updated_at=now,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[Conversation.platform, Conversation.chat_id, Conversation.user_id],
        set_={"updated_at": stmt.excluded.updated_at},
    )
    return stmt.returning(Conversation.id, Conversation.settings)


# Built once: SQLAlchemy then reuses the compiled form without re-deriving cache keys.
# Run with a list of parameter sets it is one multi-row INSERT ... RETURNING.
INSERT_MESSAGES = insert(Message).returning(Message.id, Message.conversation_id)


def newest_messages(conversation_id: Any, limit: Any = None, *, part: int | None = None) -> Select[*tuple[Any, ...]]:
    """The newest `limit` (default `:limit`) messages of a conversation, newest first,
    by one walk backwards along the (conversation_id, id) index. With `part`, each row
    starts with that number."""
    columns: tuple[Any, ...] = _MESSAGE_COLUMNS
    if part is not None:
        columns = (literal_column(str(part)).label("part"), *columns)
    return (
        select(*columns)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.id.desc())
        .limit(bindparam("limit") if limit is None else limit)
    )


# The newest `:limit` messages of conversation `:conversation_id`, or of the conversation
# `:platform`, `:chat_id`, `:user_id` (looked up inside the same statement).
RECENT_BY_ID = newest_messages(bindparam("conversation_id"))
RECENT_BY_KEY = newest_messages(
    select(Conversation.id)
    .where(
        Conversation.platform == bindparam("platform"),
        Conversation.chat_id == bindparam("chat_id"),
        Conversation.user_id == bindparam("user_id"),
    )
    .scalar_subquery()
)


@functools.lru_cache(maxsize=MAX_APPEND_BATCH)
def newest_of_many(count: int) -> CompoundSelect[*tuple[Any, ...]]:
    """`newest_messages` of conversations `:conversation_i` (`:limit_i` each) for
    i < count, as one statement; each row starts with its i."""
    return union_all(
        *(
            select(newest_messages(bindparam(f"conversation_{i}"), bindparam(f"limit_{i}"), part=i).subquery())
            for i in range(count)
        )
    )
