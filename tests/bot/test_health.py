"""The health and metrics server (bot/health.py) over real HTTP: `/healthz`, `/readyz`
following the database, the model server and the adapters, `/metrics` from a real bot
process, and bad values of `METRICS_PORT` / `METRICS_HOST` at start-up."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import bot.health
from bot.config import load_settings
from bot.core import Core
from bot.errors import ConfigError
from tests.conftest import Harness
from tests.fakes.console_process import console_bot
from tests.fakes.events import incoming
from tests.fakes.openai_server import FakeOpenAIServer
from tests.fakes.processes import free_port
from tests.fakes.targets import RecordingTarget


class FakeAdapter:
    """An adapter whose connection the test switches."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connected = True


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def ready(core: Core) -> tuple[int, dict[str, Any]]:
    assert core.health is not None
    status, body = await get(f"{core.health.url}/readyz")
    assert isinstance(body, dict)
    return status, body


async def test_healthz_answers_while_the_process_runs(harness: Harness) -> None:
    async with harness.core(metrics_port=0) as core:
        assert core.health is not None and core.health.host == "127.0.0.1"
        assert await get(f"{core.health.url}/healthz") == (200, {"status": "ok"})
        url = core.health.url
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"{url}/healthz")  # closed with the core


async def test_readyz_follows_the_adapters(harness: Harness) -> None:
    async with harness.core(metrics_port=0) as core:
        assert core.health is not None
        assert await ready(core) == (
            503,
            {
                "ready": False,
                "not_ready": ["adapters"],
                "checks": {"database": "ok", "model": "ok", "adapters": "not started"},
            },
        )
        telegram, discord = FakeAdapter("telegram"), FakeAdapter("discord")
        core.health.adapters = [telegram, discord]
        status, body = await ready(core)
        assert (status, body["ready"], body["not_ready"]) == (200, True, [])
        discord.connected = False
        status, body = await ready(core)
        assert (status, body["not_ready"]) == (503, ["adapter:discord"])
        assert body["checks"]["adapter:discord"] == "not connected"
        assert body["checks"]["adapter:telegram"] == "ok"


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_readyz_is_503_while_the_database_is_gone_and_200_once_it_is_back(
    harness: Harness, tmp_path: Path
) -> None:
    directory = tmp_path / "data"
    async with harness.core(metrics_port=0) as core:
        assert core.health is not None
        core.health.adapters = [FakeAdapter("telegram")]
        assert (await ready(core))[0] == 200
        moved = directory.rename(tmp_path / "moved-away")
        status, body = await ready(core)
        assert (status, body["not_ready"]) == (503, ["database"])
        assert body["checks"]["database"].startswith("StorageError: ")
        moved.rename(directory)
        assert (await ready(core))[0] == 200


async def test_readyz_is_503_while_the_model_server_is_down(harness: Harness) -> None:
    server = FakeOpenAIServer()
    await server.start()
    try:
        async with harness.core(
            metrics_port=0, model_backend="openai", openai_base_url=server.base_url, openai_max_retries=0
        ) as core:
            assert core.health is not None
            core.health.adapters = []
            assert (await ready(core))[0] == 200
            port = server.port
            await server.close()
            status, body = await ready(core)
            assert (status, body["not_ready"]) == (503, ["model"])
            assert body["checks"]["model"].startswith("ModelUnavailable: ")
            await server.start(port)
            assert (await ready(core))[0] == 200
    finally:
        await server.close()


async def test_readyz_is_503_from_the_moment_shutdown_begins(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bot.app
    from bot.ports import IncomingHandler
    from tests.fakes.fake_engine import FakeEngine

    monkeypatch.setattr(bot.app, "load_local_engine", lambda _settings: FakeEngine())
    port = free_port()
    readyz = f"http://127.0.0.1:{port}/readyz"
    seen: dict[str, tuple[int, Any]] = {}

    serving = asyncio.Event()

    class Probe:
        """ "waits" checks /readyz while it serves and again when it is stopped;
        "finishes" ends the bot (as the terminal does at the end of its input)."""

        def __init__(self, name: str) -> None:
            self.name = name
            self.connected = True

        async def run(self, handler: IncomingHandler) -> None:
            if self.name == "finishes":
                await serving.wait()
                return
            seen["serving"] = await get(readyz)
            serving.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                seen["stopping"] = await get(readyz)
                raise

    settings = harness.settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}", metrics_port=port)
    code = await asyncio.wait_for(bot.app.serve(settings, [Probe("waits"), Probe("finishes")]), 30)
    assert code == 0
    assert seen["serving"][0] == 200
    status, body = seen["stopping"]
    assert (status, body["not_ready"], body["checks"]["shutdown"]) == (503, ["shutdown"], "shutting down")


async def test_a_real_bot_process_serves_health_and_metrics(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    directory = tmp_path / "data"
    async with console_bot(directory / "bot.db", tmp_path, {"METRICS_PORT": str(port)}) as bot:
        await bot.wait_ready()
        assert any(f"Health and metrics on {base}" in line for line in bot.log)
        assert await bot.ask("hello") == "P echo: hello"
        assert await bot.ask("again") == "P echo: again"
        assert (await get(f"{base}/healthz"))[0] == 200
        status, body = await get(f"{base}/readyz")
        assert (status, body["checks"]) == (200, {"database": "ok", "model": "ok", "adapter:console": "ok"})
        status, text = await get(f"{base}/metrics")
        assert status == 200
        assert 'llm_chat_bot_messages_total{outcome="answered",platform="console"} 2.0' in text
        assert "llm_chat_bot_time_to_first_token_seconds_count" in text

        moved = directory.rename(tmp_path / "moved-away")
        status, body = await get(f"{base}/readyz")
        assert (status, body["not_ready"]) == (503, ["database"])
        moved.rename(directory)
        assert (await get(f"{base}/readyz"))[0] == 200
        assert await bot.finish() == 0


async def test_a_port_in_use_stops_start_up_with_one_line(harness: Harness, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            async with harness.core(metrics_port=port):
                pass
        assert info.value.setting == "METRICS_PORT"
        assert info.value.problem.startswith(f"cannot listen on 127.0.0.1:{port}: ")

        # The same from a real process: exit code 2 and one line, before anything else is opened.
        async with console_bot(tmp_path / "bot.db", tmp_path, {"METRICS_PORT": str(port)}) as bot:
            assert await bot.exit_code() == 2
        [error] = bot.errors()
        assert f"Configuration error: METRICS_PORT: cannot listen on 127.0.0.1:{port}: " in error
        assert not (tmp_path / "bot.db").exists()


async def test_an_address_that_is_not_this_machines_stops_start_up(harness: Harness) -> None:
    with pytest.raises(ConfigError) as info:
        async with harness.core(metrics_port=0, metrics_host="192.0.2.1"):  # TEST-NET-1: nobody's
            pass
    assert info.value.setting == "METRICS_HOST"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"METRICS_PORT": "abc"}, "METRICS_PORT"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT"),
        ({"METRICS_PORT": "-1"}, "METRICS_PORT"),
        ({"METRICS_PORT": "9090", "METRICS_HOST": "not a host!"}, "METRICS_HOST"),
        ({"METRICS_PORT": "9090", "METRICS_HOST": " "}, "METRICS_HOST"),
    ],
)
def test_bad_values_stop_start_up_naming_the_setting(
    env: dict[str, str], setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, raw in env.items():
        monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=None)
    assert info.value.setting == setting
    assert "\n" not in str(info.value)


def test_metrics_host_defaults_to_this_machine_only() -> None:
    settings = load_settings(_env_file=None, metrics_port="9100")
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9100)


async def test_metrics_count_a_refused_message_through_the_same_server(harness: Harness) -> None:
    async with harness.core(metrics_port=0) as core:
        assert core.health is not None
        await core.manager.handle(incoming("x" * 10_000), RecordingTarget())  # over MAX_INPUT_CHARS
        status, text = await get(f"{core.health.url}/metrics")
    assert status == 200
    assert 'llm_chat_bot_messages_total{outcome="refused_input",platform="telegram"} 1.0' in text


class HungDatabase:
    """A repository whose ping never answers (a database stuck behind a lock)."""

    async def ping(self) -> None:
        await asyncio.sleep(3600)


async def test_a_check_that_hangs_is_not_ready_within_the_bound(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.health, "CHECK_TIMEOUT", 0.2)
    async with harness.core(metrics_port=0) as core:
        assert core.health is not None
        core.health.adapters = []
        core.health.repository = HungDatabase()  # type: ignore[assignment]
        started = time.monotonic()
        status, body = await ready(core)
        assert time.monotonic() - started < 2
        assert (status, body["checks"]["database"]) == (503, "no answer within 0.2 s")
