"""The terminal chat: in-process with the fake engine, and as a real subprocess with the
real default model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from adapters.console import ConsoleAdapter, to_event
from tests.conftest import Harness, run_bot_process

ROOT = Path(__file__).resolve().parents[2]


def test_a_line_becomes_a_private_admin_event() -> None:
    event = to_event("hello\n", 3, "ann")
    assert (event.platform, event.chat_id, event.user_id, event.message_id) == ("console", "local", "local", "3")
    assert event.text == "hello" and event.is_private


async def test_piped_lines_are_answered_in_order_until_end_of_input(harness: Harness) -> None:
    stdin = io.StringIO("first question\n\n/config\nsecond question\n")
    stdout = io.StringIO()
    async with harness.manager() as manager:
        await ConsoleAdapter(stdin, stdout).run(manager)
    out = stdout.getvalue()
    assert (
        out.index("Echo: first question") < out.index("Settings for this session") < out.index("Echo: second question")
    )
    assert "bot>" not in out  # no prompts when piped


@pytest.mark.model
def test_terminal_chat_subprocess_answers_resets_and_exits(
    default_engine: object, model_cache_dir: Path, tmp_path: Path
) -> None:
    env = {
        "MODEL_CACHE_DIR": str(model_cache_dir),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
        "MAX_NEW_TOKENS": "24",
        "LOG_LEVEL": "WARNING",
    }
    proc = run_bot_process(tmp_path, "What is the capital of France?\n/config\n/reset\n", env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    assert "max_new_tokens = 24" in proc.stdout
    assert "forgot our conversation (2 messages)" in proc.stdout
