"""Any transformers model: a tiny GPT-2 built in the test answers through the whole
pipeline (worker, manager, SQLite) with the fallback prompt format."""

from __future__ import annotations

from pathlib import Path

from bot.config import Settings
from bot.core import open_core
from bot.events import ConversationKey
from bot.model.hf import load_engine
from tests.fakes.events import incoming
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
    async with open_core(settings, lambda: engine) as core:
        target = RecordingTarget()
        event = incoming("Hello there, how are you?", user="local", chat="local", platform="console")
        await core.manager.handle(event, target)
        assert target.messages, "no reply"
        assert "\nUser:" not in target.text
        stored = await core.repository.recent_messages(ConversationKey("console", "local", "local"), 5)
        assert [m.role for m in stored] == ["user", "assistant"]
        assert stored[1].content == target.text
        # the fallback format is what the model saw
        prompt = engine.decode(await core.worker.render_prompt("Be nice.", []))
        assert prompt.startswith("Be nice.") and prompt.rstrip().endswith("Assistant:")
