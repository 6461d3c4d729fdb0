"""Statements and clauses for `SqlRepository`: those it needs in several places, and
those of the hot path, built once where they can be (SQLAlchemy then reuses their
compiled form).

Reads of a conversation's newest messages walk the (conversation_id, id) index
backwards, so their cost does not grow with the size of its history. Every history read
skips "hidden" messages (a missed turn's message, a reply not delivered yet, the empty
slot an accepted turn keeps for its reply).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    CompoundSelect,
    Delete,
    ScalarSelect,
    Select,
    Table,
    Update,
    bindparam,
    delete,
    insert,
    literal_column,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import ReturningInsert

from bot.errors import StorageError
from bot.events import ConversationKey
from bot.ports import SettingValue
from storage.models import Conversation, DailyUsage, Message, Turn, utcnow

# Appends written in one unit of work at most: `newest_of_many` reads all their histories
# back in one statement (SQLite allows 500 terms in a UNION).
MAX_APPEND_BATCH = 64

# The dialects whose INSERT has ON CONFLICT (the race-safe way to create a row that
# another process may create at the same moment).
UPSERT_INSERTS: dict[str, Callable[[Any], sqlite.Insert | postgresql.Insert]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}

# In the order of `StoredMessage`'s fields.
MESSAGE_COLUMNS = (
    Message.id,
    Message.role,
    Message.content,
    Message.token_count,
    Message.created_at,
    Message.platform_message_id,
    Message.status,
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
    if dialect not in UPSERT_INSERTS:
        raise StorageError(f"unsupported database dialect {dialect!r}")
    now = utcnow()
    stmt = UPSERT_INSERTS[dialect](Conversation).values(
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


# Prompts and histories skip hidden messages.
NOT_HIDDEN = or_(Message.status.is_(None), Message.status != "hidden")


def newest_messages(
    conversation_id: Any, limit: Any = None, *, part: int | None = None, upto: Any = None
) -> Select[*tuple[Any, ...]]:
    """The newest `limit` (default `:limit`) messages of a conversation that are not
    hidden, newest first (with `upto`, those whose id is at most that), by one walk
    backwards along the (conversation_id, id) index. With `part`, each row starts with
    that number."""
    columns: tuple[Any, ...] = MESSAGE_COLUMNS
    if part is not None:
        columns = (literal_column(str(part)).label("part"), *columns)
    stmt = select(*columns).where(Message.conversation_id == conversation_id, NOT_HIDDEN)
    if upto is not None:
        stmt = stmt.where(Message.id <= upto)
    return stmt.order_by(Message.id.desc()).limit(bindparam("limit") if limit is None else limit)


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


# --------------------------------------------------------------------------- turns


@functools.lru_cache(maxsize=MAX_APPEND_BATCH)
def turn_histories(count: int) -> CompoundSelect[*tuple[Any, ...]]:
    """The history of turns `:turn_i` (`:limit_i` messages each, up to and including the
    turn's user message) for i < count, as one statement; each row starts with its i.
    A turn whose message was deleted (a /reset) has none."""
    parts = []
    for i in range(count):
        turn: BindParameter[int] = bindparam(f"turn_{i}")
        conversation = select(Turn.conversation_id).where(Turn.id == turn).scalar_subquery()
        message = select(Turn.message_id).where(Turn.id == turn).scalar_subquery()
        parts.append(select(newest_messages(conversation, bindparam(f"limit_{i}"), part=i, upto=message).subquery()))
    return union_all(*parts)


# The user's message of an accepted turn, and the empty slot kept for its reply right
# after it (so a conversation's messages stay in turn order however turns overlap).
INSERT_TURN_MESSAGES = insert(Message).returning(
    Message.id, Message.conversation_id, Message.role, Message.platform_message_id
)

_TURN_KEY = [Turn.platform, Turn.chat_id, Turn.platform_message_id]


def insert_turns(dialect: str) -> Any:
    """INSERT of turns that skips those whose key (platform, chat, message id) is taken,
    returning the key and id of each inserted."""
    if dialect not in UPSERT_INSERTS:
        raise StorageError(f"unsupported database dialect {dialect!r}")
    return (
        UPSERT_INSERTS[dialect](Turn)
        .on_conflict_do_nothing(index_elements=_TURN_KEY)
        .returning(Turn.id, Turn.platform, Turn.chat_id, Turn.platform_message_id)
    )


def add_usage(dialect: str) -> Any:
    """Adds `:prompt_tokens`, `:generated_tokens`, `:messages` to a user's day."""
    if dialect not in UPSERT_INSERTS:
        raise StorageError(f"unsupported database dialect {dialect!r}")
    stmt = UPSERT_INSERTS[dialect](DailyUsage)
    return stmt.on_conflict_do_update(
        index_elements=[DailyUsage.platform, DailyUsage.user_id, DailyUsage.day],
        set_={
            "prompt_tokens": DailyUsage.prompt_tokens + stmt.excluded.prompt_tokens,
            "generated_tokens": DailyUsage.generated_tokens + stmt.excluded.generated_tokens,
            "messages": DailyUsage.messages + stmt.excluded.messages,
        },
    )


_turns = cast(Table, Turn.__table__)
_messages = cast(Table, Message.__table__)

# Run with a list of parameter sets (executemany).
SET_REPLY_IDS: Update = (
    update(_turns)
    .where(_turns.c.id == bindparam("b_turn"))
    .values(reply_message_ids=bindparam("b_ids"), updated_at=bindparam("b_now"))
)
SET_TURN_STATE: Update = (
    update(_turns)
    .where(_turns.c.id == bindparam("b_turn"))
    .values(state=bindparam("b_state"), reply_message_ids=bindparam("b_ids"), updated_at=bindparam("b_now"))
)
STORE_REPLY: Update = (
    update(_messages)
    .where(_messages.c.id == bindparam("b_id"))
    .values(
        content=bindparam("b_content"),
        token_count=bindparam("b_tokens"),
        platform_message_id=bindparam("b_platform_id"),
        status=bindparam("b_status"),
        created_at=bindparam("b_at"),
    )
)
SET_STATUS: Update = update(_messages).where(_messages.c.id == bindparam("b_id")).values(status=bindparam("b_status"))
DELETE_MESSAGES: Delete = delete(_messages).where(_messages.c.id.in_(bindparam("b_ids", expanding=True)))

# What `finish_turn` needs of each turn: (id, state, message_id, reply_id, reply
# message ids, platform, user_id, conversation_id).
TURNS_TO_FINISH = (
    select(
        Turn.id,
        Turn.state,
        Turn.message_id,
        Turn.reply_id,
        Turn.reply_message_ids,
        Conversation.platform,
        Conversation.user_id,
        Turn.conversation_id,
    )
    .join(Conversation, Conversation.id == Turn.conversation_id)
    .where(Turn.id.in_(bindparam("b_ids", expanding=True)))
)

# The open turns of `:platform`, oldest first, with what answering them needs. The state
# condition is written as in the partial index `ix_turns_open`, so that it serves.
_reply = _messages.alias("reply")
_user_message = _messages.alias("user_message")
OPEN_TURNS = (
    select(
        Turn.id,
        Turn.state,
        Turn.accepted_at,
        Turn.reply_message_ids,
        Turn.platform,
        Conversation.chat_id,
        Conversation.user_id,
        Turn.display_name,
        Turn.platform_message_id,
        Turn.is_private,
        Turn.thread_id,
        _user_message.c.content,
        _reply.c.content,
    )
    .join(Conversation, Conversation.id == Turn.conversation_id)
    .join(_user_message, _user_message.c.id == Turn.message_id)
    .outerjoin(_reply, _reply.c.id == Turn.reply_id)
    .where(Turn.platform == bindparam("platform"), text("turns.state IN ('pending', 'undelivered')"))
    .order_by(Turn.id)
)
