"""A real OpenAI-compatible server for the tests: `transformers serve` (installed by the
`test` extra, `transformers[serving]`) serving the default model's de-quantized cache
directory on 127.0.0.1, offline. Loaded as a pytest plugin by tests/conftest.py, so
the session-scoped server is started once, by the first test that asks for it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from bot.model.hf import HFEngine

READY_TIMEOUT_S = 180.0


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A running `transformers serve`: its API root (with /v1), the model id it lists,
    its process id and its log file."""

    base_url: str
    model_id: str
    pid: int
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # 127.0.0.1 only
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def transformers_serve(
    default_engine: HFEngine, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedModel]:
    """`transformers serve` on the directory `default_engine` cached (about 7 s to be ready)."""
    model_dir = next(p for p in model_cache_dir.iterdir() if p.is_dir() and (p / "config.json").is_file())
    port = _free_port()
    log = tmp_path_factory.mktemp("transformers-serve") / "serve.log"
    cli = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _healthy(f"http://127.0.0.1:{port}/health"):
            if proc.poll() is not None:
                raise AssertionError(f"transformers serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"transformers serve not ready in {READY_TIMEOUT_S} s: {log.read_text()[-2000:]}")
            time.sleep(0.25)
        yield ServedModel(f"http://127.0.0.1:{port}/v1", str(model_dir), proc.pid, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
