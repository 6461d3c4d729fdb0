"""The operator-control methods of `SqlRepository` (storage/controls.py) on SQLite and
PostgreSQL: daily usage, blocks, chat-wide settings and the export read."""

from __future__ import annotations

import asyncio
from datetime import date

from sqlalchemy import insert, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.ports import Usage
from storage.models import DailyUsage, Message
from storage.repository import SqlRepository
from tests.storage.conftest import ALICE, ALICE_ELSEWHERE, BOB

DAY = date(2026, 12, 3)
NEXT_DAY = date(2026, 12, 4)


async def record_usage(
    engine: AsyncEngine, user_id: str, day: date, generated: int, platform: str = "telegram"
) -> None:
    """A daily_usage row as `finish_turn` writes it."""
    async with engine.begin() as connection:
        await connection.execute(
            insert(DailyUsage).values(
                platform=platform, user_id=user_id, day=day, prompt_tokens=10, generated_tokens=generated, messages=2
            )
        )


async def test_usage_is_per_user_per_platform_per_day_and_zero_when_none(
    repo: SqlRepository, db_engine: AsyncEngine
) -> None:
    assert await repo.usage("telegram", "alice", DAY) == Usage(DAY, 0, 0, 0)
    await record_usage(db_engine, "alice", DAY, 120)
    await record_usage(db_engine, "alice", NEXT_DAY, 7)
    await record_usage(db_engine, "alice", DAY, 99, platform="discord")
    assert await repo.usage("telegram", "alice", DAY) == Usage(DAY, 10, 120, 2)
    assert await repo.usage("telegram", "alice", NEXT_DAY) == Usage(NEXT_DAY, 10, 7, 2)
    assert await repo.usage("discord", "alice", DAY) == Usage(DAY, 10, 99, 2)
    assert await repo.usage("telegram", "bob", DAY) == Usage(DAY, 0, 0, 0)


async def test_reset_usage_forgets_one_day_of_one_user(repo: SqlRepository, db_engine: AsyncEngine) -> None:
    await record_usage(db_engine, "alice", DAY, 120)
    await record_usage(db_engine, "alice", NEXT_DAY, 7)
    await record_usage(db_engine, "bob", DAY, 5)
    await repo.reset_usage("telegram", "alice", DAY)
    await repo.reset_usage("telegram", "nobody", DAY)  # nothing to reset is fine
    assert await repo.usage("telegram", "alice", DAY) == Usage(DAY, 0, 0, 0)
    assert (await repo.usage("telegram", "alice", NEXT_DAY)).generated_tokens == 7
    assert (await repo.usage("telegram", "bob", DAY)).generated_tokens == 5


async def test_blocks_are_added_once_removed_once_and_listed(repo: SqlRepository) -> None:
    assert await repo.blocks() == frozenset()
    assert await repo.add_block("telegram:123", "telegram:admin") is True
    assert await repo.add_block("telegram:123", "telegram:admin") is False
    assert await repo.add_block("discord:guild:9", "discord:admin") is True
    assert await repo.blocks() == {"telegram:123", "discord:guild:9"}
    assert await repo.remove_block("telegram:123") is True
    assert await repo.remove_block("telegram:123") is False
    assert await repo.blocks() == {"discord:guild:9"}


async def test_concurrent_blocks_of_one_entry_add_it_once(repo: SqlRepository) -> None:
    results = await asyncio.gather(*(repo.add_block("telegram:7", f"telegram:admin{i}") for i in range(5)))
    assert sorted(results) == [False, False, False, False, True]
    assert await repo.blocks() == {"telegram:7"}


async def test_chat_settings_are_per_chat_merged_and_cleared(repo: SqlRepository) -> None:
    assert await repo.get_chat_settings("telegram", "g1") == {}
    await repo.set_chat_setting("telegram", "g1", "enabled", 0)
    await repo.set_chat_setting("telegram", "g1", "system_prompt", "Be brief.")
    await repo.set_chat_setting("telegram", "g1", "enabled", 1)
    await repo.set_chat_setting("discord", "g1", "temperature", 0.5)
    assert await repo.get_chat_settings("telegram", "g1") == {"enabled": 1, "system_prompt": "Be brief."}
    assert await repo.get_chat_settings("discord", "g1") == {"temperature": 0.5}
    await repo.clear_chat_settings("telegram", "g1")
    assert await repo.get_chat_settings("telegram", "g1") == {}
    assert await repo.get_chat_settings("discord", "g1") == {"temperature": 0.5}


async def test_concurrent_chat_setting_writes_lose_nothing(repo: SqlRepository) -> None:
    await asyncio.gather(*(repo.set_chat_setting("telegram", "g2", f"key{i}", i) for i in range(6)))
    assert await repo.get_chat_settings("telegram", "g2") == {f"key{i}": i for i in range(6)}


async def test_conversation_messages_are_all_of_one_conversation_oldest_first_with_status(
    repo: SqlRepository, db_engine: AsyncEngine
) -> None:
    assert await repo.conversation_messages(ALICE) == []
    written = [await repo.add_message(ALICE, "user" if i % 2 == 0 else "assistant", f"m{i}", i) for i in range(30)]
    await repo.add_message(BOB, "user", "bob's", 1)
    await repo.add_message(ALICE_ELSEWHERE, "user", "alice elsewhere", 1)
    async with db_engine.begin() as connection:
        await connection.execute(update(Message).where(Message.id == written[3].id).values(status="hidden"))
    every = await repo.conversation_messages(ALICE)
    assert [m.content for m in every] == [f"m{i}" for i in range(30)]
    assert [m.id for m in every] == [m.id for m in written]
    assert every[3].status == "hidden" and every[4].status is None
    assert [(m.role, m.token_count) for m in every[:2]] == [("user", 0), ("assistant", 1)]
