"""Any transformers model: a tiny GPT-2 built in the test answers through the whole
pipeline (worker, manager, SQLite) with the fallback prompt format."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from bot.chat.conversation import ConversationManager
from bot.config import Settings
from bot.events import ConversationKey, IncomingMessage
from bot.model.hf import load_engine
from bot.model.scheduler import Worker
from storage.database import create_engine, init_db
from storage.repository import SqlRepository
from tests.fakes.targets import RecordingTarget


async def test_tiny_gpt2_directory_answers_through_the_fallback_format(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    engine = load_engine(str(tiny_gpt2_dir), cache_dir=tmp_path / "cache", context_tokens=2048)
    assert engine.context_length == 128  # capped at the model's n_positions
    assert engine.stop_strings == ("\nUser:",)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
        temperature=0.0,
        max_new_tokens=12,
        system_prompt="Be nice.",
    )
    db = create_engine(settings.database_url)
    await init_db(db)
    repo = SqlRepository.from_engine(db)
    try:
        async with Worker(engine) as worker, ConversationManager(settings, repo, worker) as manager:
            target = RecordingTarget()
            event = IncomingMessage(
                platform="console",
                chat_id="local",
                user_id="local",
                display_name="me",
                message_id="1",
                text="Hello there, how are you?",
                is_private=True,
                timestamp=datetime.now(UTC),
            )
            await manager.handle(event, target)
            assert target.messages, "no reply"
            assert "\nUser:" not in target.text
            stored = await repo.recent_messages(ConversationKey("console", "local", "local"), 5)
            assert [m.role for m in stored] == ["user", "assistant"]
            assert stored[1].content == target.text
            # the fallback format is what the model saw
            prompt = engine.decode(await worker.render_prompt("Be nice.", []))
            assert prompt.startswith("Be nice.") and prompt.rstrip().endswith("Assistant:")
    finally:
        await repo.close()
        await db.dispose()
