"""The terminal chat: in-process with the fake engine, and as a real subprocess with the
real default model."""

from __future__ import annotations

import asyncio
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
def test_terminal_chat_subprocess_answers_at_a_first_start_and_quitting_stops_the_compile(
    default_engine: object, model_cache_dir: Path, tmp_path: Path
) -> None:
    import psutil

    # The de-quantized model without a compiled step: `echo … | make run` on a first start.
    (model_dir,) = [p for p in model_cache_dir.iterdir() if (p / "config.json").is_file()]
    cache = tmp_path / "cache"
    fresh = cache / model_dir.name
    fresh.mkdir(parents=True)
    for file in model_dir.iterdir():
        if file.is_file():
            (fresh / file.name).symlink_to(file)
    env = {
        "MODEL_CACHE_DIR": str(cache),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
        "MAX_NEW_TOKENS": "24",
        "LOG_LEVEL": "INFO",
    }
    proc = run_bot_process(tmp_path, "What is the capital of France?\n/config\n/reset\n", env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    assert "max_new_tokens = 24" in proc.stdout
    assert "forgot our conversation (2 messages)" in proc.stdout
    # It answered while the compile ran in the background, and stopped it on quitting.
    assert "Compiling the fast decode step in the background" in proc.stderr
    assert not list((fresh / "inductor").glob("compiled-*"))  # not finished, not marked
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(cache) in " ".join(p.info["cmdline"] or [])]
    assert left == []


async def test_the_same_line_after_a_restart_is_a_new_message(harness: Harness) -> None:
    outputs = []
    for _ in range(2):
        stdout = io.StringIO()
        async with harness.manager() as manager:
            await ConsoleAdapter(io.StringIO("hello again\n"), stdout).run(manager)
        outputs.append(stdout.getvalue())
    assert ["Echo: hello again" in out for out in outputs] == [True, True]  # not taken for a redelivery


async def test_a_line_accepted_before_a_restart_is_answered_at_start(harness: Harness) -> None:
    left = to_event("are you back?", "earlier.1", "ann")
    assert await harness.repo.accept_turn(left, "message", 5) is not None  # then the process died
    stdout = io.StringIO()
    adapter = ConsoleAdapter(io.StringIO(""), stdout)
    async with harness.manager() as manager:
        await adapter.run(manager)
        for _ in range(100):  # recovery queues the turn; its answer follows
            if "Echo: are you back?" in stdout.getvalue():
                break
            await asyncio.sleep(0.02)
    assert "Echo: are you back?" in stdout.getvalue()
    assert not adapter.connected


async def test_a_file_goes_into_the_exports_folder_and_its_path_is_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    stdout = io.StringIO()
    target = ConsoleAdapter(io.StringIO(""), stdout).target_for(to_event("/export", 1, "ann"))
    await target.send_file("conversation.md", b"# Conversation\n", "Your conversation")
    await target.send_file("../../conversation.md", b"second", "")  # never outside exports/, never over a file
    first, second = tmp_path / "exports" / "conversation.md", tmp_path / "exports" / "conversation-1.md"
    assert first.read_text() == "# Conversation\n" and second.read_bytes() == b"second"
    assert f"Your conversation: {first}" in stdout.getvalue() and str(second) in stdout.getvalue()
