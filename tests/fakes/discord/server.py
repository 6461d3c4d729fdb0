"""A fake Discord for tests: the REST API and the gateway WebSocket on 127.0.0.1.

It speaks enough of the real protocol for an unmodified discord.py 2.7 client (see
`gateway.py` and `rest.py`; the world they serve is in `world.py`). Tests play the
users (`user_sends`, `user_uses_slash_command`) and read what the bot did from
`calls` and the stored messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Mapping, Sequence

from aiohttp import web

from tests.fakes.discord.gateway import Gateway
from tests.fakes.discord.rest import API_PREFIX, RestApi, RestCall
from tests.fakes.discord.world import (
    EVERYONE_PERMISSIONS,
    FakeAttachment,
    FakeChannel,
    FakeInteraction,
    FakeUser,
    FakeWorld,
    Json,
)


class FakeDiscordServer(FakeWorld):
    """The fake Discord: its world, served. Use as `async with FakeDiscordServer() as server:`."""

    def __init__(self) -> None:
        super().__init__()
        self.gateway = Gateway(self, self._notify)
        self.rest = RestApi(self, self.gateway, self._notify)
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeDiscordServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_get("/", self.gateway.serve)
        app.router.add_get("/attachments/{channel}/{id}/{filename}", self.rest.cdn)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self.rest.serve)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self._port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.cdn_base = f"http://127.0.0.1:{self._port}"
        self.gateway.url = self.gateway_url

    async def close(self) -> None:
        for conn in list(self.gateway.connections):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        """For DISCORD_API_BASE."""
        return f"http://127.0.0.1:{self._port}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        """For DISCORD_GATEWAY_URL."""
        return f"ws://127.0.0.1:{self._port}/"

    # ------------------------------------------------------------------ test API: users act

    async def user_sends(
        self,
        channel: FakeChannel,
        user: FakeUser,
        content: str,
        *,
        reply_to: Json | int | None = None,
        ping_reply: bool = True,
        attachments: Sequence[FakeAttachment] = (),
    ) -> Json:
        """A user posts a message (mentions are parsed from `<@id>` in `content`, as
        Discord does). `reply_to` is a stored message (payload or id). Returns the
        message as dispatched."""
        reference: Json | None = None
        if reply_to is not None:
            reference = self.messages[int(reply_to["id"])] if isinstance(reply_to, dict) else self.messages[reply_to]
        data = self.message_payload(
            channel, user, content, reference=reference, ping_reply=ping_reply, attachments=attachments, gateway=True
        )
        self.messages[int(data["id"])] = data
        await self.gateway.dispatch_message_event("MESSAGE_CREATE", channel, data)
        return data

    async def user_uses_slash_command(
        self,
        channel: FakeChannel,
        user: FakeUser,
        name: str,
        *,
        subcommand: str | None = None,
        options: Mapping[str, str | int | bool | FakeUser] | None = None,
    ) -> FakeInteraction:
        """A user runs a synced slash command, e.g. `("config", subcommand="set",
        options={"key": "temperature", "value": "0.5"})`; a subcommand of a group is
        named with its group (`subcommand="chat set"`)."""
        synced = {c["name"]: c for c in self.synced_commands or []}
        if name not in synced:
            raise AssertionError(f"/{name} was not synced; synced: {sorted(synced)}")
        resolved: Json = {}
        opts: list[Json] = []
        for key, value in (options or {}).items():
            if isinstance(value, FakeUser):
                opts.append({"name": key, "type": 6, "value": str(value.id)})
                resolved.setdefault("users", {})[str(value.id)] = value.payload()
                if channel.guild is not None and value.id in channel.guild.members:
                    resolved.setdefault("members", {})[str(value.id)] = {
                        **channel.guild.member_payload(value, with_user=False),
                        "permissions": str(channel.guild.permissions_of(value)),
                    }
            elif isinstance(value, bool):
                opts.append({"name": key, "type": 5, "value": value})
            elif isinstance(value, int):
                opts.append({"name": key, "type": 4, "value": value})
            else:
                opts.append({"name": key, "type": 3, "value": value})
        if subcommand is not None:
            *groups, leaf = subcommand.split()
            opts = [{"name": leaf, "type": 1, "options": opts}]
            for group in reversed(groups):
                opts = [{"name": group, "type": 2, "options": opts}]
        command: Json = {"id": synced[name]["id"], "name": name, "type": 1, "options": opts}
        if resolved:
            command["resolved"] = resolved
        interaction = FakeInteraction(self.ids.next(), "itoken-" + secrets.token_urlsafe(24), user, channel, name)
        self.interactions[interaction.id] = interaction
        guild = channel.guild
        data: Json = {
            "id": str(interaction.id),
            "application_id": str(self.application_id),
            "type": 2,
            "token": interaction.token,
            "version": 1,
            "data": command,
            "channel_id": str(channel.id),
            "channel": channel.payload(),
            "locale": "en-US",
            "app_permissions": str(EVERYONE_PERMISSIONS),
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild.id) if guild else "0"},
            "context": 0 if guild else 1,
            "attachment_size_limit": 8 * 1024 * 1024,
        }
        if guild is not None:
            data["guild_id"] = str(guild.id)
            data["guild_locale"] = "en-US"
            data["guild"] = {"id": str(guild.id), "locale": "en-US", "features": []}
            data["member"] = {**guild.member_payload(user), "permissions": str(guild.permissions_of(user))}
        else:
            data["user"] = user.payload()
        await self.gateway.dispatch(self.gateway.shard_sessions(guild), "INTERACTION_CREATE", data, intent=0)
        return interaction

    async def delete_message(self, message_id: int | str) -> None:
        """Delete a message (user's or bot's): later edits of it get 404, replies to it 400."""
        message_id = int(message_id)
        self.deleted.add(message_id)
        message = self.messages[message_id]
        channel = self.channels[int(message["channel_id"])]
        data: Json = {"id": str(message_id), "channel_id": str(channel.id)}
        if channel.guild is not None:
            data["guild_id"] = str(channel.guild.id)
        await self.gateway.dispatch_message_event("MESSAGE_DELETE", channel, data)

    def fail_next_message(self, channel: FakeChannel, status: int = 403) -> None:
        """The bot's next create-message in `channel` fails (403: Missing Permissions)."""
        self.rest.fail_next_message(channel, status)

    async def send_malformed_event(self, channel: FakeChannel) -> None:
        """A MESSAGE_CREATE without its author: a payload discord.py cannot parse."""
        data = self.message_payload(channel, self.users[next(iter(self.users))], "no author", gateway=True)
        del data["author"]
        await self.gateway.dispatch_message_event("MESSAGE_CREATE", channel, data)

    async def drop_gateway(self, code: int = 4000) -> None:
        """Close every gateway connection (4000 = Discord's resumable "unknown error")."""
        for conn in list(self.gateway.connections):
            await conn.ws.close(code=code, message=b"fake server dropped the connection")

    async def send_reconnect(self) -> None:
        """Ask every connected client to reconnect and resume (op 7)."""
        await self.gateway.send_all({"op": 7, "d": None, "s": None, "t": None})

    # ------------------------------------------------------------------ test API: observe

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until `predicate()` holds. It is re-checked after every request or event,
        and every 10 ms for state outside the server (a handler's records)."""
        assert self._changed is not None
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"condition not met within {timeout} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, 0.01))

    async def wait_identified(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until `count` gateway sessions have received READY and their guilds."""
        await self.wait_for(lambda: self.gateway.identified >= count, timeout)

    @property
    def calls(self) -> list[RestCall]:
        """Every REST request, in order."""
        return self.rest.calls

    @property
    def unknown_routes(self) -> list[tuple[str, str]]:
        """REST requests no route matched: `(method, path)`."""
        return self.rest.unknown_routes

    def message_calls(self) -> list[RestCall]:
        """Every create-message, edit-message and interaction response the bot made."""
        return self.rest.message_calls()

    def add_listener(self, listener: Callable[[RestCall], None]) -> None:
        """Called synchronously for every REST call (benchmarks time replies with it)."""
        self.rest.add_listener(listener)

    @property
    def gateway_queries(self) -> list[dict[str, str]]:
        """The query string of every gateway connection (v, encoding, compress)."""
        return self.gateway.queries

    @property
    def identifies(self) -> list[Json]:
        """Every IDENTIFY, its token replaced by `token_ok`."""
        return self.gateway.identifies

    @property
    def resumes(self) -> list[Json]:
        """Every RESUME: `session_id` and `seq`."""
        return self.gateway.resumes

    @property
    def open_connections(self) -> int:
        """Gateway WebSockets currently open."""
        return len(self.gateway.connections)

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()
