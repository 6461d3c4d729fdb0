"""Start-up: bad settings stop with one clear line naming the setting, and a non-zero exit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_bot_process


def run_bot(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_bot_process(
        tmp_path, "", {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'db' / 'bot.db'}", **env}, timeout=120
    )


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"ADMIN_IDS": "root"}, "ADMIN_IDS"),
        ({"DATABASE_URL": "nosuchdb+driver:///x"}, "DATABASE_URL"),
        ({"MODEL": "/nonexistent/model-dir"}, "MODEL"),
        ({"TEMPERATURE": "hot"}, "TEMPERATURE"),
    ],
)
def test_bad_setting_stops_start_up_with_one_line_naming_it(tmp_path: Path, env: dict[str, str], setting: str) -> None:
    proc = run_bot(tmp_path, **env)
    assert proc.returncode == 2
    assert setting in proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr


def test_secrets_are_never_logged(tmp_path: Path) -> None:
    proc = run_bot(tmp_path, TELEGRAM_TOKEN="123:very-secret-token", ADMIN_IDS="bad", LOG_LEVEL="DEBUG")
    assert proc.returncode == 2
    assert "very-secret-token" not in proc.stderr + proc.stdout


@pytest.mark.model
def test_an_unreachable_platform_stops_with_one_line_naming_the_setting(
    default_engine: object, model_cache_dir: Path, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = run_bot(
        tmp_path,
        TELEGRAM_TOKEN="123:very-secret-token",
        TELEGRAM_API_BASE=f"http://127.0.0.1:{port}",
        MODEL_CACHE_DIR=str(model_cache_dir),
    )
    assert proc.returncode == 2
    assert "Configuration error: TELEGRAM_API_BASE" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "very-secret-token" not in proc.stderr + proc.stdout
