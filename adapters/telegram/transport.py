"""python-telegram-bot's HTTP transport on aiohttp, with proxies from the environment.

Failures are told apart by whether the request can have reached Telegram: `NotSent`
(no connection was made: safe to retry even a ``sendMessage``), `ReadTimedOut` (the
request went out and no answer came in time: it may have been carried out), and
PTB's plain `NetworkError` for a connection lost mid-request.
"""

from __future__ import annotations

import base64
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
from telegram.error import NetworkError, TimedOut
from telegram.request import BaseRequest, RequestData


class NotSent(NetworkError):
    """The request never reached the server: no connection could be made (refused,
    unreachable, DNS, or the connect timeout). Retrying it cannot do anything twice."""


class ReadTimedOut(TimedOut):
    """The request was sent but no answer came within the read timeout: Telegram may
    have carried it out."""


class AiohttpRequest(BaseRequest):
    """python-telegram-bot's HTTP transport on aiohttp instead of httpx.

    A documented extension point of PTB (`telegram.request.BaseRequest`). aiohttp is
    already a dependency and costs far less CPU per request than httpx, which matters
    because every reply is several Bot API calls made from the one event loop.
    Timeouts and failures map to PTB's `TimedOut` and `NetworkError` as its own
    transport does; proxies come from the usual environment variables (``HTTPS_PROXY``,
    ``NO_PROXY``, ...), read once at `initialize`.
    """

    def __init__(
        self,
        connection_pool_size: int = 256,
        *,
        read_timeout: float | None = 5.0,
        connect_timeout: float | None = 5.0,
        pool_timeout: float | None = 1.0,
        on_unauthorized: Callable[[], None] | None = None,
    ) -> None:
        self._on_unauthorized = on_unauthorized
        self._pool_size = connection_pool_size
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[str, str] = {}
        self._proxy_for_host: dict[tuple[str, str], tuple[str, dict[str, str]] | None] = {}

    @property
    def read_timeout(self) -> float | None:
        return self._read_timeout

    async def initialize(self) -> None:
        if self._session is None or self._session.closed:
            self._proxies = urllib.request.getproxies_environment()
            self._proxy_for_host.clear()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size),
                headers={"User-Agent": self.USER_AGENT},
                # aiohttp's own trust_env re-reads the environment and ~/.netrc in a
                # thread on every request; the proxy is chosen here instead.
                trust_env=False,
                # PTB reads the body and handles every status itself.
                raise_for_status=False,
            )

    async def shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def proxy_for(self, url: str) -> tuple[str, dict[str, str]] | None:
        """The proxy the environment names for `url` and the headers it needs (its
        credentials), or None (also when NO_PROXY matches)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        key = (parts.scheme, host)
        if key not in self._proxy_for_host:
            found = None
            named = self._proxies.get(parts.scheme) or self._proxies.get("all")
            if host and named and not urllib.request.proxy_bypass(host):
                proxy = urlsplit(named)
                headers = {}
                if proxy.username is not None:
                    credentials = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
                    headers["Proxy-Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
                netloc = proxy.netloc.rpartition("@")[2]  # credentials go in the header only
                found = (urlunsplit(proxy._replace(netloc=netloc)), headers)
            self._proxy_for_host[key] = found
        return self._proxy_for_host[key]

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = BaseRequest.DEFAULT_NONE,
        write_timeout: Any = BaseRequest.DEFAULT_NONE,
        connect_timeout: Any = BaseRequest.DEFAULT_NONE,
        pool_timeout: Any = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        session = self._session
        if session is None or session.closed:
            raise RuntimeError("This AiohttpRequest is not initialized!")
        connect = _seconds(connect_timeout, self._connect_timeout)
        pool = _seconds(pool_timeout, self._pool_timeout)
        # aiohttp has no write timeout; Bot API request bodies are small.
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None if connect is None or pool is None else connect + pool,  # incl. waiting for the pool
            sock_connect=connect,
            sock_read=_seconds(read_timeout, self._read_timeout),
        )
        data: aiohttp.FormData | dict[str, str] | None = None
        if request_data is not None:
            files = request_data.multipart_data
            if files:
                form = aiohttp.FormData()
                for name, value in request_data.json_parameters.items():
                    form.add_field(name, value)
                for name, (filename, content, mimetype) in files.items():
                    form.add_field(name, content, filename=filename, content_type=mimetype)
                data = form
            else:
                data = request_data.json_parameters
        proxy, proxy_headers = self.proxy_for(url) or (None, None)
        try:
            async with session.request(
                method, url, data=data, timeout=timeout, proxy=proxy, proxy_headers=proxy_headers
            ) as response:
                if response.status == 401 and self._on_unauthorized is not None:
                    self._on_unauthorized()  # the token no longer works
                return response.status, await response.read()
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            # Before the subclasses of TimeoutError/ClientError below: nothing was sent.
            raise NotSent(f"aiohttp.{type(exc).__name__}: {_safe_detail(exc)}") from exc
        except TimeoutError as exc:
            raise ReadTimedOut("Timed out waiting for Telegram's answer") from exc
        except aiohttp.ClientError as exc:
            raise NetworkError(f"aiohttp.{type(exc).__name__}: {_safe_detail(exc)}") from exc


def _safe_detail(exc: Exception) -> str:
    detail = str(exc)
    # Some aiohttp errors quote the URL, and the URL holds the token.
    return "request failed" if "/bot" in detail else detail


def _seconds(value: Any, default: float | None) -> float | None:
    """A PTB timeout argument: its "not given" marker means the transport's default."""
    if isinstance(value, type(BaseRequest.DEFAULT_NONE)):
        return default
    return None if value is None else float(value)
