"""`SqlRepository` against real SQLite files."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.errors import StorageError
from bot.events import ConversationKey
from bot.ports import Repository, RepoStats
from storage.database import open_database
from storage.models import Conversation, Message
from storage.repository import SqlRepository
from tests.pg import DbBackend
from tests.storage.conftest import ALICE, ALICE_ELSEWHERE, BOB, SAME_IDS_ON_DISCORD, captured_sql


def test_sql_repository_satisfies_the_repository_protocol(repo: SqlRepository) -> None:
    checked: Repository = repo  # mypy checks the signatures; this checks it imports
    assert checked is repo


async def test_message_round_trip_keeps_every_field(repo: SqlRepository) -> None:
    before = datetime.now(UTC)
    stored = await repo.add_message(ALICE, "assistant", "hello", 2, platform_message_id="777")
    after = datetime.now(UTC)

    assert stored.role == "assistant" and stored.content == "hello"
    assert stored.token_count == 2 and stored.platform_message_id == "777"
    assert stored.created_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= stored.created_at <= after + timedelta(seconds=1)
    assert await repo.recent_messages(ALICE, 10) == [stored]


async def test_recent_messages_are_the_newest_n_oldest_first(repo: SqlRepository) -> None:
    for i in range(10):
        await repo.add_message(ALICE, "user" if i % 2 == 0 else "assistant", f"m{i}", i)
    await repo.add_message(BOB, "user", "not alice's", 1)

    recent = await repo.recent_messages(ALICE, 3)

    assert [m.content for m in recent] == ["m7", "m8", "m9"]
    assert [m.id for m in recent] == sorted(m.id for m in recent)
    assert len(await repo.recent_messages(ALICE, 1000)) == 10


@pytest.mark.parametrize("limit", [0, -5])
async def test_non_positive_limit_returns_nothing(repo: SqlRepository, limit: int) -> None:
    await repo.add_message(ALICE, "user", "hi", 1)
    assert await repo.recent_messages(ALICE, limit) == []
    assert await repo.add_and_recent(ALICE, "user", "stored, nothing read", 1, None, limit) == []
    assert len(await repo.recent_messages(ALICE, 10)) == 2


async def test_unknown_conversation_has_no_messages_and_no_settings(repo: SqlRepository) -> None:
    assert await repo.recent_messages(ALICE, 10) == []
    assert await repo.get_settings(ALICE) == {}
    assert await repo.clear_conversation(ALICE) == 0


@pytest.mark.parametrize(
    "content",
    [
        "emoji 👩🏽‍💻🚀 and flags 🇺🇦",
        "RTL: שלום עולם, مرحبا بالعالم",
        "NUL\x00inside\x00",
        "combining é vs é, zero-width \u200b joiner",
        "  leading and trailing whitespace\n\t\r\n  ",
        "",
        "x" * 100_000,
        "🙂" * 30_000,
    ],
    ids=["emoji", "rtl", "nul", "combining", "whitespace", "empty", "100k-ascii", "120kb-emoji"],
)
async def test_content_is_stored_verbatim(repo: SqlRepository, content: str, db_backend: DbBackend) -> None:
    if db_backend == "postgresql" and "\x00" in content:
        # PostgreSQL's text cannot hold NUL: refused like any unstorable text (the manager
        # never gets this far: it refuses NULs as binary input).
        with pytest.raises(StorageError, match="0x00"):
            await repo.add_message(ALICE, "user", content, 1)
        assert await repo.recent_messages(ALICE, 1) == []
        return
    await repo.add_message(ALICE, "user", content, 1)
    [stored] = await repo.recent_messages(ALICE, 1)
    assert stored.content == content


async def test_text_without_a_utf8_form_raises_storage_error(repo: SqlRepository) -> None:
    with pytest.raises(StorageError):
        await repo.add_message(ALICE, "user", "lone surrogate \ud800", 1)
    assert await repo.recent_messages(ALICE, 10) == []


async def test_history_and_settings_survive_a_restart(db_url: str) -> None:
    async with open_database(db_url) as engine:
        first = SqlRepository.from_engine(engine)
        written = [await first.add_message(ALICE, "user", f"old {i}", i) for i in range(3)]
        await first.set_setting(ALICE, "temperature", 0.25)

    async with open_database(db_url) as engine:
        second = SqlRepository.from_engine(engine)
        assert await second.recent_messages(ALICE, 10) == written
        assert await second.get_settings(ALICE) == {"temperature": 0.25}
        later = await second.add_message(ALICE, "assistant", "after restart", 1)
        assert later.id > written[-1].id


async def test_clear_conversation_touches_only_that_conversation_and_keeps_settings(
    repo: SqlRepository,
) -> None:
    for key in (ALICE, BOB, ALICE_ELSEWHERE):
        await repo.add_message(key, "user", "q", 1)
        await repo.add_message(key, "assistant", "a", 1)
    await repo.set_setting(ALICE, "max_new_tokens", 64)

    assert await repo.clear_conversation(ALICE) == 2

    assert await repo.recent_messages(ALICE, 10) == []
    assert len(await repo.recent_messages(BOB, 10)) == 2
    assert len(await repo.recent_messages(ALICE_ELSEWHERE, 10)) == 2
    assert await repo.get_settings(ALICE) == {"max_new_tokens": 64}
    assert await repo.clear_conversation(ALICE) == 0


async def test_clear_chat_empties_every_conversation_of_that_chat_only(repo: SqlRepository) -> None:
    for key, count in ((ALICE, 3), (BOB, 2), (ALICE_ELSEWHERE, 1), (SAME_IDS_ON_DISCORD, 4)):
        for i in range(count):
            await repo.add_message(key, "user", f"{key} {i}", 1)
    await repo.set_setting(BOB, "system_prompt", "Be terse.")

    assert await repo.clear_chat("telegram", "chat-1") == 5

    assert await repo.recent_messages(ALICE, 10) == []
    assert await repo.recent_messages(BOB, 10) == []
    assert len(await repo.recent_messages(ALICE_ELSEWHERE, 10)) == 1
    assert len(await repo.recent_messages(SAME_IDS_ON_DISCORD, 10)) == 4
    assert await repo.get_settings(BOB) == {"system_prompt": "Be terse."}


async def test_deleting_a_conversation_cascades_to_its_messages(repo: SqlRepository, db_engine: AsyncEngine) -> None:
    await repo.add_message(ALICE, "user", "q", 1)
    await repo.add_message(BOB, "user", "q", 1)
    async with db_engine.begin() as connection:
        await connection.execute(delete(Conversation).where(Conversation.user_id == "alice"))
        remaining = (await connection.execute(select(func.count()).select_from(Message))).scalar()
    assert remaining == 1


async def test_move_chat_carries_history_and_settings_except_where_the_user_is_already_there(
    repo: SqlRepository,
) -> None:
    await repo.add_message(ALICE, "user", "alice in the old chat", 1)
    await repo.add_message(BOB, "user", "bob in the old chat", 1)
    await repo.set_setting(BOB, "temperature", 0.3)
    alice_new = ConversationKey("telegram", "chat-9", "alice")
    bob_new = ConversationKey("telegram", "chat-9", "bob")
    await repo.add_message(alice_new, "user", "alice got there first", 1)

    assert await repo.move_chat("telegram", "chat-1", "chat-9") == 1
    assert await repo.move_chat("telegram", "chat-1", "chat-9") == 0  # idempotent

    assert [m.content for m in await repo.recent_messages(bob_new, 5)] == ["bob in the old chat"]
    assert await repo.get_settings(bob_new) == {"temperature": 0.3}
    assert [m.content for m in await repo.recent_messages(alice_new, 5)] == ["alice got there first"]
    assert [m.content for m in await repo.recent_messages(ALICE, 5)] == ["alice in the old chat"]
    # A reply still being stored under the old key joins the moved conversation.
    await repo.add_message(BOB, "assistant", "late reply", 1)
    assert [m.content for m in await repo.recent_messages(bob_new, 5)] == ["bob in the old chat", "late reply"]


async def test_move_chat_carries_the_chat_wide_settings_unless_the_new_chat_has_its_own(
    repo: SqlRepository,
) -> None:
    await repo.set_chat_setting("telegram", "group-1", "enabled", 0)
    await repo.set_chat_setting("telegram", "group-2", "system_prompt", "old")
    await repo.set_chat_setting("telegram", "super-2", "system_prompt", "new")

    await repo.move_chat("telegram", "group-1", "super-1")
    await repo.move_chat("telegram", "group-2", "super-2")

    assert await repo.get_chat_settings("telegram", "super-1") == {"enabled": 0}
    assert await repo.get_chat_settings("telegram", "group-1") == {}
    assert await repo.get_chat_settings("telegram", "super-2") == {"system_prompt": "new"}


async def test_settings_keep_their_types_and_can_be_overwritten_and_cleared(
    repo: SqlRepository,
) -> None:
    await repo.set_setting(ALICE, "temperature", 0.5)
    await repo.set_setting(ALICE, "max_new_tokens", 128)
    await repo.set_setting(ALICE, "system_prompt", "Réponds en français 🙂")
    await repo.set_setting(ALICE, "temperature", 1.0)

    settings = await repo.get_settings(ALICE)
    assert settings == {
        "temperature": 1.0,
        "max_new_tokens": 128,
        "system_prompt": "Réponds en français 🙂",
    }
    assert type(settings["temperature"]) is float and type(settings["max_new_tokens"]) is int
    assert await repo.get_settings(BOB) == {}

    await repo.add_message(ALICE, "user", "still here", 1)
    await repo.clear_settings(ALICE)
    assert await repo.get_settings(ALICE) == {}
    assert [m.content for m in await repo.recent_messages(ALICE, 10)] == ["still here"]
    await repo.clear_settings(BOB)  # no conversation yet: nothing to do, no error


async def test_concurrent_first_messages_of_one_conversation_are_all_stored(
    repo: SqlRepository, db_engine: AsyncEngine
) -> None:
    stored = await asyncio.gather(*(repo.add_message(ALICE, "user", f"m{i}", i) for i in range(20)))

    assert len({m.id for m in stored}) == 20
    assert sorted(m.content for m in await repo.recent_messages(ALICE, 100)) == sorted(f"m{i}" for i in range(20))
    async with db_engine.connect() as connection:
        count = select(func.count()).select_from(Conversation)
        assert (await connection.execute(count)).scalar() == 1


async def test_concurrent_setting_changes_are_not_lost(repo: SqlRepository) -> None:
    await asyncio.gather(*(repo.set_setting(ALICE, f"key{i}", i) for i in range(20)))
    assert await repo.get_settings(ALICE) == {f"key{i}": i for i in range(20)}


async def test_stats_count_users_conversations_with_messages_and_messages(
    repo: SqlRepository,
) -> None:
    assert await repo.stats() == RepoStats(users=0, conversations=0, messages=0)
    await repo.add_message(ALICE, "user", "q", 1)
    await repo.add_message(ALICE, "assistant", "a", 1)
    await repo.add_message(ALICE_ELSEWHERE, "user", "q", 1)  # same user, another chat
    await repo.add_message(SAME_IDS_ON_DISCORD, "user", "q", 1)  # another platform: another user
    await repo.set_setting(BOB, "temperature", 0.1)  # a user without messages

    assert await repo.stats() == RepoStats(users=3, conversations=3, messages=4)

    await repo.clear_conversation(ALICE)
    assert await repo.stats() == RepoStats(users=3, conversations=2, messages=2)


async def test_database_failures_raise_storage_error(repo: SqlRepository, db_engine: AsyncEngine) -> None:
    await repo.add_message(ALICE, "user", "q", 1)
    async with db_engine.begin() as connection:
        cascade = " CASCADE" if db_engine.dialect.name == "postgresql" else ""  # turns refer to it
        await connection.execute(text(f"DROP TABLE messages{cascade}"))

    with pytest.raises(StorageError) as info:
        await repo.recent_messages(ALICE, 10)
    assert "no such table" in str(info.value) or 'relation "messages" does not exist' in str(info.value)
    with pytest.raises(StorageError):
        await repo.add_message(ALICE, "user", "q", 1)


# --------------------------------------------------------------------------- scale


async def _bulk_insert(engine: AsyncEngine, key: ConversationKey, count: int) -> None:
    now = datetime.now(UTC)
    async with engine.begin() as connection:
        conversation_id = (
            await connection.execute(
                insert(Conversation)
                .values(platform=key.platform, chat_id=key.chat_id, user_id=key.user_id, settings={})
                .returning(Conversation.id)
            )
        ).scalar_one()
        await connection.execute(
            insert(Message),
            [
                {
                    "conversation_id": conversation_id,
                    "role": "user",
                    "content": f"m{i}",
                    "token_count": 1,
                    "created_at": now,
                }
                for i in range(count)
            ],
        )
    if engine.dialect.name == "postgresql":
        # PostgreSQL plans by statistics: with only one or two conversations it would
        # rightly guess that any conversation holds half the table. A real database has
        # many; so does this one. Then ANALYZE, as autovacuum would.
        async with engine.begin() as connection:
            ids = (
                await connection.execute(
                    insert(Conversation).returning(Conversation.id),
                    [
                        {"platform": "discord", "chat_id": f"other-{i}", "user_id": "u", "settings": {}}
                        for i in range(2_000)
                    ],
                )
            ).scalars()
            await connection.execute(
                insert(Message),
                [
                    {"conversation_id": i, "role": "user", "content": "x", "token_count": 1, "created_at": now}
                    for i in ids
                    for _ in range(3)
                ],
            )
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            await connection.exec_driver_sql("ANALYZE")


async def _query_plans(
    engine: AsyncEngine, statements: list[tuple[str, Any]], *, avoid_seq_scans: bool = False
) -> list[list[str]]:
    """The plan steps of each statement: SQLite's `detail` column, or the lines of
    PostgreSQL's EXPLAIN. `avoid_seq_scans`: PostgreSQL reads a tiny table whole, however
    good its indexes; this asks whether an index *can* serve the statement."""
    async with engine.connect() as connection:
        explain = connection.exec_driver_sql
        if engine.dialect.name == "sqlite":
            return [
                [row.detail for row in await explain(f"EXPLAIN QUERY PLAN {sql}", params)] for sql, params in statements
            ]
        if avoid_seq_scans:
            await explain("SET enable_seqscan = off")
        plans = [[row[0].strip() for row in await explain(f"EXPLAIN {sql}", params)] for sql, params in statements]
        await connection.rollback()  # nothing of the EXPLAINs (a DELETE's) is kept
        return plans


def _pg_walks_index_backwards(plan: list[str]) -> bool:
    walks = ("Backward using ix_messages_conversation_id_id" in step for step in plan if step.startswith("->  Index"))
    return any(walks)


async def test_recent_messages_walks_the_index_even_with_100k_messages(
    repo: SqlRepository, db_engine: AsyncEngine
) -> None:
    await _bulk_insert(db_engine, ALICE, 100_000)
    for i in range(10):
        await repo.add_message(BOB, "user", f"bob {i}", 1)
    seen = captured_sql(db_engine)

    newest = await repo.recent_messages(ALICE, 10)

    assert [m.content for m in newest] == [f"m{i}" for i in range(99_990, 100_000)]
    selects = [s for s in seen if s[0].lstrip().upper().startswith("SELECT")]
    assert len(selects) == 1  # one query, the conversation looked up inside it
    [plan] = await _query_plans(db_engine, selects)
    if db_engine.dialect.name == "postgresql":
        assert _pg_walks_index_backwards(plan), plan
        assert not any("Seq Scan on messages" in step or "Sort" in step for step in plan), plan
        return
    assert any(
        step.startswith("SEARCH messages USING") and "ix_messages_conversation_id_id" in step for step in plan
    ), plan
    assert not any("SCAN" in step or "TEMP B-TREE" in step for step in plan), plan


async def test_reading_back_a_group_commit_walks_the_index_per_conversation(
    repo: SqlRepository, db_engine: AsyncEngine
) -> None:
    await _bulk_insert(db_engine, ALICE, 100_000)
    await repo.add_message(BOB, "user", "bob 0", 1)
    await repo.add_message(ALICE, "user", "warm the id cache", 1)
    blocker = asyncio.create_task(repo.add_message(ALICE_ELSEWHERE, "user", "first", 1))
    seen = captured_sql(db_engine)

    alice, bob = await asyncio.gather(
        repo.add_and_recent(ALICE, "user", "a", 1, None, 3), repo.add_and_recent(BOB, "user", "b", 1, None, 3)
    )
    await blocker

    assert [m.content for m in alice] == ["m99999", "warm the id cache", "a"]
    assert [m.content for m in bob] == ["bob 0", "b"]
    [batch_select] = [s for s in seen if s[0].lstrip().upper().startswith("SELECT") and "UNION ALL" in s[0]]
    [plan] = await _query_plans(db_engine, [batch_select])
    if db_engine.dialect.name == "postgresql":
        # Alice holds nearly every row, so walking the primary key back finds her newest
        # at once, and the planner knows it; either way each part is one short backward walk.
        walks = [step for step in plan if step.startswith("->  Index Scan Backward using")]
        assert len(walks) == 2, plan
        assert not any("Seq Scan on messages" in step or "Sort" in step for step in plan), plan
        return
    searches = [step for step in plan if "ix_messages_conversation_id_id" in step]
    assert len(searches) == 2, plan
    assert not any("SCAN messages" in step or "TEMP B-TREE" in step for step in plan), plan


async def test_clear_chat_finds_its_rows_through_indexes(repo: SqlRepository, db_engine: AsyncEngine) -> None:
    await repo.add_message(ALICE, "user", "q", 1)
    seen = captured_sql(db_engine)

    await repo.clear_chat("telegram", "chat-1")

    deletes = [s for s in seen if s[0].lstrip().upper().startswith("DELETE")]
    [plan] = await _query_plans(db_engine, deletes, avoid_seq_scans=True)
    if db_engine.dialect.name == "postgresql":
        assert not any("Seq Scan" in step for step in plan), plan
        assert any("ix_messages_conversation_id_id" in step for step in plan), plan
        return
    assert not any("SCAN" in step for step in plan), plan
    assert any("ix_messages_conversation_id_id" in step for step in plan), plan


async def test_add_and_recent_stores_then_reads_the_newest_in_one_go(repo: SqlRepository) -> None:
    for i in range(5):
        await repo.add_message(ALICE, "user", f"m{i}", 1)
    newest = await repo.add_and_recent(ALICE, "user", "new", 2, "p9", 3)
    assert [m.content for m in newest] == ["m3", "m4", "new"]
    assert newest[-1].platform_message_id == "p9" and newest[-1].token_count == 2
    assert [m.content for m in await repo.add_and_recent(BOB, "user", "first", 1, None, 10)] == ["first"]
    assert [m.content for m in await repo.add_and_recent(BOB, "user", "only", 1, None, 1)] == ["only"]
    assert await repo.add_and_recent(BOB, "user", "none", 1, None, 0) == []
    assert [m.content for m in await repo.recent_messages(BOB, 10)] == ["first", "only", "none"]
