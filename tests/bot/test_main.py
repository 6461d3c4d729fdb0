"""Start-up: bad settings stop with one clear line naming the setting, and a non-zero exit.
Adapters are supervised: restarted with backoff after an unexpected error."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

import pytest

from bot.app import Backoff, supervise
from bot.errors import ConfigError
from bot.ports import IncomingHandler
from tests.conftest import run_bot_process
from tests.fakes.echo_handler import EchoHandler


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
@pytest.mark.parametrize(("platform", "setting"), [("TELEGRAM", "TELEGRAM_API_BASE"), ("DISCORD", "DISCORD_API_BASE")])
def test_an_unreachable_platform_stops_with_one_line_naming_the_setting(
    default_engine: object, model_cache_dir: Path, tmp_path: Path, platform: str, setting: str
) -> None:
    import socket

    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}" + ("/api/v10" if platform == "DISCORD" else "")
    proc = run_bot(
        tmp_path,
        **{f"{platform}_TOKEN": "123:very-secret-token", setting: base},
        MODEL_CACHE_DIR=str(model_cache_dir),
    )
    assert proc.returncode == 2
    assert f"Configuration error: {setting}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "very-secret-token" not in proc.stderr + proc.stdout


# --------------------------------------------------------------------------- supervision


class Flaky:
    """An adapter whose runs go by a script: an exception to raise at once, a number of
    seconds to serve before failing, or None to serve until cancelled."""

    name = "flaky"

    def __init__(self, *script: BaseException | float | None) -> None:
        self.script = list(script)
        self.started: list[float] = []
        self.serving = asyncio.Event()  # set when a run serves until cancelled

    @property
    def connected(self) -> bool:
        return False

    async def run(self, handler: IncomingHandler) -> None:
        self.started.append(asyncio.get_running_loop().time())
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        if step is None:
            self.serving.set()
            await asyncio.Event().wait()
        await asyncio.sleep(step or 0.0)
        raise RuntimeError("failed after a while")


def restart_delays(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage().rpartition(" in ")[2]
        for r in caplog.records
        if r.name == "bot.app" and "stopped with an error" in r.getMessage()
    ]


async def test_an_adapter_that_fails_is_logged_and_restarted_with_growing_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    adapter = Flaky(RuntimeError("boom 1"), RuntimeError("boom 2"), RuntimeError("boom 3"), None)
    task = asyncio.create_task(supervise(adapter, EchoHandler(), Backoff(first=0.02, most=0.05, stable=10)))
    await asyncio.wait_for(adapter.serving.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert restart_delays(caplog) == ["0.02 s", "0.04 s", "0.05 s"]  # doubling, up to the most
    gaps = [b - a for a, b in zip(adapter.started, adapter.started[1:], strict=False)]
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.05
    failures = [r for r in caplog.records if r.name == "bot.app"]
    assert all(r.levelno == logging.ERROR and r.exc_info for r in failures)  # with the traceback
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == ["boom 1", "boom 2", "boom 3"]


async def test_a_run_that_lasted_resets_the_wait(caplog: pytest.LogCaptureFixture) -> None:
    adapter = Flaky(RuntimeError("at once"), RuntimeError("at once"), 0.15, None)
    task = asyncio.create_task(supervise(adapter, EchoHandler(), Backoff(first=0.02, most=1.0, stable=0.1)))
    await asyncio.wait_for(adapter.serving.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert restart_delays(caplog) == ["0.02 s", "0.04 s", "0.02 s"]


async def test_a_config_error_is_not_restarted_and_a_finished_adapter_is_not_either(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rejected = Flaky(ConfigError("TELEGRAM_TOKEN", "rejected"), None)
    with pytest.raises(ConfigError):
        await supervise(rejected, EchoHandler(), Backoff(first=0.01))
    assert len(rejected.started) == 1 and restart_delays(caplog) == []

    class Finishes(Flaky):
        async def run(self, handler: IncomingHandler) -> None:
            self.started.append(0.0)  # the terminal at the end of its input

    finished = Finishes()
    await asyncio.wait_for(supervise(finished, EchoHandler(), Backoff(first=0.01)), 1)
    assert finished.started == [0.0]
