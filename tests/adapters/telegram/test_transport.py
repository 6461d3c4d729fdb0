"""`AiohttpRequest`, PTB's transport on aiohttp: proxies from the environment."""

from __future__ import annotations

import asyncio

import pytest

from adapters.telegram.transport import AiohttpRequest
from tests.adapters.telegram.chats import ALICE, PRIVATE_ALICE
from tests.adapters.telegram.conftest import EchoHandler, RunAdapter
from tests.fakes.telegram import FakeTelegramServer


async def test_the_bot_api_is_reached_through_the_proxy_the_environment_names(
    server: FakeTelegramServer, run_adapter: RunAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    # The fake server plays the proxy: the API host itself does not even resolve.
    monkeypatch.setenv("HTTP_PROXY", server.api_base)
    async with run_adapter(EchoHandler(), telegram_api_base="http://api.telegram.invalid"):
        server.user_sends(PRIVATE_ALICE, ALICE, "via the proxy")
        await server.wait_for(lambda: server.bot_texts(ALICE.id) == ["Echo: via the proxy"])


def test_no_proxy_hosts_bypass_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://bot:s3cret@proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal")

    async def proxies() -> list[tuple[str, dict[str, str]] | None]:
        request = AiohttpRequest()
        await request.initialize()
        try:
            return [
                request.proxy_for("https://api.telegram.org/bot/getMe"),
                request.proxy_for("https://bots.internal/bot/getMe"),
                request.proxy_for("http://localhost:8081/bot/getMe"),
                request.proxy_for("http://api.telegram.org/bot/getMe"),
            ]
        finally:
            await request.shutdown()

    credentials = {"Proxy-Authorization": "Basic Ym90OnMzY3JldA=="}  # bot:s3cret, not in the URL
    assert asyncio.run(proxies()) == [("http://proxy.example:3128", credentials), None, None, None]
