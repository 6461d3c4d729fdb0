"""The OpenAI-compatible backend through the real manager, repository and `openai`
client, against the fake SSE server on 127.0.0.1 (the faults a real server will not
make on demand). The real `transformers serve` is in test_remote_real.py."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from bot.core import Core
from bot.errors import ConfigError, GenerationError, ModelUnavailable
from bot.events import ChatTurn, ConversationKey
from bot.model import remote
from bot.model.remote import CHARS_PER_TOKEN, OpenAIBackend
from bot.ports import GenerationParams, SamplingParams
from tests.conftest import Harness
from tests.fakes.events import incoming
from tests.fakes.openai_server import FakeOpenAIServer
from tests.fakes.targets import RecordingTarget

ROOT = Path(__file__).resolve().parents[3]
KEY = ConversationKey("telegram", "g1", "u1")
SECRET = "sk-test-secret-never-logged"


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer() as fake:
        yield fake


def remote_settings(server: FakeOpenAIServer, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "model_backend": "openai",
        "openai_base_url": server.base_url,
        "openai_timeout": 5.0,
        "openai_max_retries": 2,
        "model_context_tokens": 2048,
    }
    values.update(overrides)
    return values


@asynccontextmanager
async def remote_core(harness: Harness, server: FakeOpenAIServer, **overrides: Any) -> AsyncIterator[Core]:
    async with harness.core(**remote_settings(server, **overrides)) as core:
        yield core


async def say(core: Core, text: str, *, user: str = "u1") -> RecordingTarget:
    target = RecordingTarget()
    await core.manager.handle(incoming(text, user=user, chat="g1"), target)
    return target


async def stored(harness: Harness, user: str = "u1") -> list[tuple[str, str]]:
    key = ConversationKey("telegram", "g1", user)
    return [(m.role, m.content) for m in await harness.repo.recent_messages(key, 20)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------- replies


async def test_a_reply_streams_from_the_server_and_is_stored_with_the_session_settings(
    harness: Harness, server: FakeOpenAIServer
) -> None:
    server.tokens_per_s = 200
    async with remote_core(harness, server, temperature=0.7, top_p=0.5, max_new_tokens=40) as core:
        assert core.settings.model_backend == "openai"
        target = await say(core, "hello there")
    assert target.messages == ["Echo: hello there"]
    assert await stored(harness) == [("user", "hello there"), ("assistant", "Echo: hello there")]
    body = server.requests[-1].body
    assert body["stream"] is True and body["model"] == "fake-model"  # the first id /v1/models lists
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.7, 0.5, 40)
    assert body["messages"] == [
        {"role": "system", "content": "You are a test bot."},
        {"role": "user", "content": "hello there"},
    ]
    assert "seed" not in body and "stop" not in body and "stream_options" not in body
    reply = (await harness.repo.recent_messages(KEY, 2))[-1]
    assert reply.token_count == 3  # the server's usage: three words


async def test_seed_and_stop_strings_are_sent_per_request_and_text_arrives_as_it_is_streamed(
    server: FakeOpenAIServer,
) -> None:
    server.reply = lambda _m: "one two three STOP four"
    server.tokens_per_s = 20
    async with OpenAIBackend(base_url=server.base_url, model="other-model") as backend:
        prompt = await backend.render("sys", [ChatTurn("user", "count")])
        params = GenerationParams(
            max_new_tokens=10, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=42), stop=("STOP",)
        )
        arrivals: list[tuple[float, str]] = []
        started = time.monotonic()
        async for chunk in backend.generate(prompt, params):
            arrivals.append((time.monotonic() - started, chunk.text))
    body = server.requests[-1].body
    assert (body["seed"], body["stop"], body["model"]) == (42, ["STOP"], "other-model")
    assert "".join(t for _, t in arrivals) == "one two three "
    # 20 chunks/s: the first word arrives long before the last (streamed, not buffered)
    assert arrivals[0][0] < arrivals[2][0] - 0.05


@pytest.mark.parametrize(
    "ending", ["done_with_usage", "usage_then_done_vllm", "done_no_usage", "no_done", "usage_no_done"]
)
async def test_every_servers_way_of_ending_a_stream_gives_the_whole_reply(
    harness: Harness, server: FakeOpenAIServer, ending: Any
) -> None:
    server.ending = ending
    server.reply = lambda _m: "a b c d e"
    async with remote_core(harness, server) as core:
        target = await say(core, "go")
        assert core.model.stats().tokens_generated == 5
    assert target.messages == ["a b c d e"]
    reply = (await harness.repo.recent_messages(KEY, 2))[-1]
    assert (reply.content, reply.token_count) == ("a b c d e", 5)


async def test_usage_larger_than_the_chunks_counted_corrects_the_token_count(server: FakeOpenAIServer) -> None:
    server.reply = lambda _m: "two words"
    server.tokens_per_chunk = 3  # the server's usage: each chunk held three tokens
    async with OpenAIBackend(base_url=server.base_url) as backend:
        prompt = await backend.render(None, [ChatTurn("user", "x")])
        chunks = [c async for c in backend.generate(prompt, GenerationParams(max_new_tokens=10))]
        one = [c async for c in backend.generate(prompt, GenerationParams(max_new_tokens=1))]
    assert [(c.text, c.tokens, c.finish_reason) for c in chunks] == [
        ("two ", 1, None),
        ("words", 1, None),
        ("", 4, "stop"),
    ]
    assert [c.finish_reason for c in one] == [None, "length"]  # max_tokens reached
    assert backend.stats().tokens_generated == 6 + 3


# ----------------------------------------------------------------------------- failures


async def test_429_with_retry_after_is_retried_after_that_delay(
    harness: Harness, server: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.fail_next(429, "Rate limit reached", headers={"Retry-After": "1"})
    async with remote_core(harness, server) as core:
        with caplog.at_level(logging.INFO):
            target = await say(core, "hi")
    assert target.messages == ["Echo: hi"]
    first, second = server.requests[-2:]
    assert second.at - first.at >= 0.9
    assert "Retrying request" in caplog.text  # each try is logged (by the openai client)


async def test_503s_are_retried_and_past_the_bound_the_user_hears_the_server_is_unavailable(
    harness: Harness, server: FakeOpenAIServer
) -> None:
    server.fail_next(503, "overloaded", times=2)
    async with remote_core(harness, server, openai_max_retries=2) as core:
        assert (await say(core, "first")).messages == ["Echo: first"]
        server.fail_next(503, "overloaded", times=3)
        target = await say(core, "second")
        assert target.messages == [ModelUnavailable.user_message]
        assert (await say(core, "third")).messages == ["Echo: third"]
    assert len(server.requests) == 3 + 3 + 1
    assert await stored(harness) == [
        ("user", "first"),
        ("assistant", "Echo: first"),
        ("user", "second"),
        ("user", "third"),
        ("assistant", "Echo: third"),
    ]


async def test_a_401_while_running_tells_the_user_and_never_logs_the_key(
    harness: Harness, server: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.api_key = SECRET
    with caplog.at_level(logging.DEBUG):
        async with remote_core(harness, server, openai_api_key=SECRET) as core:
            assert (await say(core, "hi")).messages == ["Echo: hi"]
            server.api_key = "rotated"
            target = await say(core, "again")
    assert target.messages == [ModelUnavailable.user_message]
    assert server.requests[0].authorization == f"Bearer {SECRET}"
    assert "OPENAI_API_KEY" in caplog.text
    assert SECRET not in caplog.text
    assert ("user", "again") in await stored(harness)


async def test_a_connection_dropped_mid_stream_keeps_the_partial_reply_marked_cut_off(
    harness: Harness, server: FakeOpenAIServer
) -> None:
    server.reply = lambda _m: "one two three four five six"
    server.drop_after = 3
    async with remote_core(harness, server) as core:
        target = await say(core, "count")
        server.drop_after = None
        after = await say(core, "again")
    assert target.messages[0] == "one two three  … [cut off]"
    assert "cut off" in target.messages[1] and "try again" in target.messages[1]
    assert after.messages == ["one two three four five six"]
    history = await stored(harness)
    assert history[:3] == [("user", "count"), ("assistant", "one two three  … [cut off]"), ("user", "again")]


async def test_a_malformed_data_line_ends_the_reply_as_cut_off_without_losing_history(
    harness: Harness, server: FakeOpenAIServer
) -> None:
    server.reply = lambda _m: "alpha beta gamma"
    server.malformed_after = 2
    async with remote_core(harness, server) as core:
        target = await say(core, "go")
    assert target.messages[0] == "alpha beta  … [cut off]"
    assert "cut off" in target.messages[1]
    assert await stored(harness) == [("user", "go"), ("assistant", "alpha beta  … [cut off]")]


async def test_a_malformed_line_before_any_text_is_a_clear_failure(harness: Harness, server: FakeOpenAIServer) -> None:
    server.malformed_after = 0
    async with remote_core(harness, server) as core:
        target = await say(core, "go")
    assert target.messages == [ModelUnavailable.user_message]
    assert await stored(harness) == [("user", "go")]


async def test_a_first_token_slower_than_the_timeout_is_a_clear_message(
    harness: Harness, server: FakeOpenAIServer
) -> None:
    server.first_token_delay = 2.0
    async with remote_core(harness, server, openai_timeout=0.5, openai_max_retries=0) as core:
        started = time.monotonic()
        target = await say(core, "slow?")
        assert time.monotonic() - started < 1.9
    assert target.messages == [remote.SLOW_SERVER]
    assert await stored(harness) == [("user", "slow?")]


async def test_the_server_saying_the_prompt_is_too_long_gets_one_harder_trimmed_retry(
    harness: Harness, server: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(6):
        await harness.repo.add_message(KEY, "user" if i % 2 == 0 else "assistant", f"old turn {i} " + "x" * 100, 40)
    server.context_limit = 300  # characters; the bot's estimate lets every turn through
    async with remote_core(harness, server) as core:
        with caplog.at_level(logging.WARNING, logger="bot.model.remote"):
            target = await say(core, "newest question")
        assert target.messages == ["Echo: newest question"]
        first, retry = server.requests[-2:]
        assert len(retry.body["messages"]) < len(first.body["messages"])
        assert retry.body["messages"][-1] == {"role": "user", "content": "newest question"}
        assert "too long" in caplog.text
        server.context_limit = 5  # not even the newest message fits: refused after one retry
        requests_before = len(server.requests)
        refused = await say(core, "this one cannot fit")
    assert "too long" in refused.text
    assert len(server.requests) - requests_before == 2


# ----------------------------------------------------------------------------- start-up


async def test_a_wrong_key_at_start_up_is_a_config_error_naming_openai_api_key(
    harness: Harness, server: FakeOpenAIServer
) -> None:
    server.api_key = "right"
    with pytest.raises(ConfigError) as caught:
        async with remote_core(harness, server, openai_api_key="wrong"):
            pass
    assert caught.value.setting == "OPENAI_API_KEY"
    assert "wrong" not in str(caught.value)


async def test_an_unknown_openai_model_at_start_up_names_openai_model(
    harness: Harness, server: FakeOpenAIServer
) -> None:
    with pytest.raises(ConfigError) as caught:
        async with remote_core(harness, server, openai_model="no-such-model"):
            pass
    assert caught.value.setting == "OPENAI_MODEL"
    assert "fake-model" in str(caught.value)  # the ids it does list


def run_bot(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("TELEGRAM_TOKEN", "DISCORD_TOKEN", "MODEL")}
    full.update({"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", "MODEL_BACKEND": "openai", **env})
    return subprocess.run(
        [sys.executable, "-m", "bot"], input="hi\n", capture_output=True, text=True, cwd=tmp_path, env=full, timeout=60
    )


async def test_the_bot_exits_2_with_one_line_for_a_wrong_key_or_model(server: FakeOpenAIServer, tmp_path: Path) -> None:
    server.api_key = "right"
    proc = await asyncio.to_thread(run_bot, tmp_path, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY=SECRET)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "OPENAI_API_KEY" in errors[0]
    assert SECRET not in proc.stderr + proc.stdout
    proc = await asyncio.to_thread(
        run_bot, tmp_path, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="right", OPENAI_MODEL="gpt-nope"
    )
    assert proc.returncode == 2, proc.stderr
    assert "OPENAI_MODEL" in proc.stderr and "gpt-nope" in proc.stderr


async def test_a_server_down_at_start_up_does_not_stop_the_bot_and_is_used_once_it_is_up(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "RECONNECT_FIRST_S", 0.1)
    port = free_port()
    late = FakeOpenAIServer()
    settings: dict[str, Any] = {"openai_base_url": f"http://127.0.0.1:{port}/v1", "openai_max_retries": 0}
    with caplog.at_level(logging.INFO, logger="bot.model.remote"):
        async with harness.core(model_backend="openai", **settings) as core:
            target = await say(core, "anyone there?")
            assert target.messages == [ModelUnavailable.user_message]
            assert "(not known yet" in (await say(core, "/model")).text
            await asyncio.sleep(0.5)  # a few tries, each logged
            await late.start(port)
            try:
                deadline = time.monotonic() + 10
                while late.model_list_calls == 0:
                    assert time.monotonic() < deadline, "the backend never retried"
                    await asyncio.sleep(0.05)
                answered = await say(core, "now?")
            finally:
                await late.close()
    assert answered.messages == ["Echo: now?"]
    tries = [r for r in caplog.records if "still unreachable" in r.getMessage()]
    assert len(tries) >= 2
    assert await stored(harness) == [("user", "anyone there?"), ("user", "now?"), ("assistant", "Echo: now?")]


async def test_a_server_that_goes_down_later_gets_users_a_clear_answer(harness: Harness) -> None:
    server = FakeOpenAIServer()
    await server.start()
    async with harness.core(**remote_settings(server, openai_max_retries=1)) as core:
        assert (await say(core, "hi")).messages == ["Echo: hi"]
        await server.close()
        target = await say(core, "still there?")
    assert target.messages == [ModelUnavailable.user_message]
    assert ("user", "still there?") in await stored(harness)


# ----------------------------------------------------------------------------- load and cancellation


async def test_requests_beyond_the_concurrency_wait_in_the_bounded_queue_then_get_busy(
    harness: Harness, server: FakeOpenAIServer
) -> None:
    server.tokens_per_s = 20
    server.reply = lambda _m: "w " * 10
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, server.streaming_now)
            await asyncio.sleep(0.005)

    # The manager lets no more than the backend's concurrency + queue reach it: accepted
    # messages wait in the bot; beyond MAX_PENDING_MESSAGES they are refused as busy.
    async with remote_core(harness, server, openai_max_concurrency=2, queue_size=2, max_pending_messages=5) as core:
        watcher = asyncio.create_task(watch())
        targets = await asyncio.gather(*(say(core, f"q{i}", user=f"u{i}") for i in range(7)))
        watcher.cancel()
    busy = [t for t in targets if "busy" in t.text]
    answered = [t for t in targets if t.text.startswith("w w")]
    assert len(answered) == 5 and len(busy) == 2
    assert peak == 2


async def test_reset_mid_reply_closes_the_http_stream(harness: Harness, server: FakeOpenAIServer) -> None:
    server.tokens_per_s = 20
    server.reply = lambda _m: "word " * 200
    async with remote_core(harness, server, max_new_tokens=1000) as core:
        target = RecordingTarget()
        reply = asyncio.create_task(core.manager.handle(incoming("talk", user="u1", chat="g1"), target))
        await asyncio.wait_for(target.first_send.wait(), 5)
        await say(core, "/reset")
        await asyncio.wait_for(reply, 5)
        deadline = time.monotonic() + 5
        while server.client_closed == 0:
            assert time.monotonic() < deadline, "the server never saw the stream close"
            await asyncio.sleep(0.02)
        assert core.model.stats().active == 0
    assert "[stopped]" in target.text
    assert server.completed == 0 and server.streaming_now == 0
    assert await stored(harness) == []


# ----------------------------------------------------------------------------- models


async def test_model_command_and_switching_to_a_listed_model_only(harness: Harness, server: FakeOpenAIServer) -> None:
    async with remote_core(harness, server) as core:
        shown = (await say(core, "/model", user="admin")).text
        assert "fake-model (the default)" in shown and "other-model" in shown
        refused = (await say(core, "/config set model gpt-nope", user="admin")).text
        assert "Unknown model 'gpt-nope'" in refused and "fake-model" in refused
        assert "Only admins" in (await say(core, "/config set model other-model", user="u1")).text
        assert "model is now 'other-model'" in (await say(core, "/config set model other-model", user="admin")).text
        assert "other-model (set for this session)" in (await say(core, "/model", user="admin")).text
        await say(core, "hello", user="admin")
        assert server.requests[-1].body["model"] == "other-model"
        await say(core, "hello", user="u1")  # other sessions keep the default
        assert server.requests[-1].body["model"] == "fake-model"
        assert "model = 'fake-model'" in (await say(core, "/config", user="u1")).text
    key = ConversationKey("telegram", "g1", "admin")
    assert await harness.repo.get_settings(key) == {"model": "other-model"}


async def test_a_session_model_the_server_dropped_gets_a_clear_message(
    harness: Harness, server: FakeOpenAIServer
) -> None:
    await harness.repo.set_setting(KEY, "model", "other-model")
    server.models = ("fake-model",)
    async with remote_core(harness, server) as core:
        target = await say(core, "hi")
    assert "'other-model' is not available" in target.text and "/config set model" in target.text


async def test_the_local_backend_says_it_serves_one_model(harness: Harness) -> None:
    async with harness.core() as core:
        shown = (await say(core, "/model", user="admin")).text
        refused = (await say(core, "/config set model gpt-4o", user="admin")).text
    assert "one local model" in shown
    assert "one local model" in refused
    assert await harness.repo.get_settings(ConversationKey("telegram", "g1", "admin")) == {}


# ----------------------------------------------------------------------------- prompt budget


async def test_without_a_tokenizer_tokens_are_estimated_at_the_stated_characters_per_token() -> None:
    backend = OpenAIBackend(base_url="http://127.0.0.1:9/v1")
    assert CHARS_PER_TOKEN == 3.0
    assert await backend.count_tokens("abcdefg") == 3  # ceil(7 / 3)
    rendered = await backend.render("sys", [ChatTurn("user", "abcdef")])
    assert rendered.length == remote.REPLY_PRIMING + (1 + remote.MESSAGE_OVERHEAD) + (2 + remote.MESSAGE_OVERHEAD)
    assert rendered.ids == ()


async def test_a_local_tokenizer_counts_tokens_exactly(server: FakeOpenAIServer, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    async with OpenAIBackend(base_url=server.base_url, tokenizer=tmp_path) as backend:
        assert await backend.count_tokens("hello world hello unknownword") == 4
        assert await backend.count_tokens("x" * 30) == 1  # the estimate would say 10


async def test_a_tokenizer_setting_that_is_not_one_is_refused_at_start_up(tmp_path: Path) -> None:
    from bot.config import load_settings

    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, openai_tokenizer=str(tmp_path))
    assert caught.value.setting == "OPENAI_TOKENIZER"
    bad = tmp_path / "tokenizer.json"
    bad.write_text("not json")
    with pytest.raises(ConfigError) as caught:
        async with OpenAIBackend(base_url="http://127.0.0.1:9/v1", tokenizer=bad):
            pass
    assert caught.value.setting == "OPENAI_TOKENIZER"


async def test_generate_refuses_a_zero_token_budget(server: FakeOpenAIServer) -> None:
    async with OpenAIBackend(base_url=server.base_url, api_key=SecretStr("k")) as backend:
        prompt = await backend.render(None, [ChatTurn("user", "x")])
        with pytest.raises(GenerationError):
            await anext(backend.generate(prompt, GenerationParams(max_new_tokens=0)))
    assert server.requests == []
