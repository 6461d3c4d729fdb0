"""A fake Discord for tests: the REST API and the gateway WebSocket on 127.0.0.1.

It speaks enough of the real protocol for an unmodified discord.py 2.7 client:
HELLO / IDENTIFY / READY / GUILD_CREATE, heartbeats, sequence numbers, RESUME with
replay of missed events, zlib-stream transport compression, intents (including the
privileged Message Content intent), the message and interaction REST routes, and
Discord's error bodies. Tests play the users (`user_sends`, `user_uses_slash_command`)
and read what the bot did from `calls` and the stored messages.

Unknown routes answer 404 like Discord and are logged and recorded, so a new
request the client starts making shows up in the test output.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import secrets
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

logger = logging.getLogger(__name__)

Json = dict[str, Any]

DISCORD_EPOCH_MS = 1420070400000
API_PREFIX = "/api/v10"

# Permission bits (https://discord.com/developers/docs/topics/permissions)
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
READ_MESSAGE_HISTORY = 1 << 16
SEND_MESSAGES_IN_THREADS = 1 << 38
MANAGE_GUILD = 1 << 5
ADMINISTRATOR = 1 << 3
EVERYONE_PERMISSIONS = VIEW_CHANNEL | SEND_MESSAGES | READ_MESSAGE_HISTORY | SEND_MESSAGES_IN_THREADS

# Gateway intents
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15

CHANNEL_TEXT = 0
CHANNEL_DM = 1
CHANNEL_PUBLIC_THREAD = 11

MESSAGE_DEFAULT = 0
MESSAGE_REPLY = 19

EPHEMERAL = 1 << 6
LOADING = 1 << 7

_MENTION = re.compile(r"<@!?(\d+)>")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


class _Snowflakes:
    """Real-looking snowflakes (time in the high bits), so `created_at` works."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def next(self) -> int:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (next(self._counter) & 0x3FFFFF)


@dataclass(eq=False)
class FakeUser:
    id: int
    username: str
    bot: bool = False

    def payload(self) -> Json:
        return {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": self.username.title(),
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"


@dataclass(eq=False)
class FakeRole:
    id: int
    name: str
    permissions: int
    position: int

    def payload(self) -> Json:
        return {
            "id": str(self.id),
            "name": self.name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }


@dataclass(eq=False)
class FakeChannel:
    id: int
    type: int
    name: str
    guild: FakeGuild | None = None
    parent: FakeChannel | None = None
    recipient: FakeUser | None = None

    def payload(self) -> Json:
        data: Json = {"id": str(self.id), "type": self.type, "name": self.name, "flags": 0}
        if self.type == CHANNEL_DM:
            assert self.recipient is not None
            data.update(recipients=[self.recipient.payload()], last_message_id=None)
            del data["name"]
            return data
        assert self.guild is not None
        data.update(
            guild_id=str(self.guild.id),
            position=0,
            permission_overwrites=[],
            nsfw=False,
            topic=None,
            rate_limit_per_user=0,
            last_message_id=None,
        )
        if self.type == CHANNEL_PUBLIC_THREAD:
            assert self.parent is not None
            data.update(
                parent_id=str(self.parent.id),
                owner_id=str(self.guild.owner.id),
                message_count=0,
                member_count=1,
                thread_metadata={
                    "archived": False,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": _iso(time.time()),
                    "locked": False,
                },
            )
            del data["permission_overwrites"]
        return data


@dataclass(eq=False)
class FakeGuild:
    id: int
    name: str
    owner: FakeUser
    roles: list[FakeRole] = field(default_factory=list)
    channels: list[FakeChannel] = field(default_factory=list)
    threads: list[FakeChannel] = field(default_factory=list)
    members: dict[int, tuple[FakeUser, list[FakeRole]]] = field(default_factory=dict)

    def member_payload(self, user: FakeUser, *, with_user: bool = True) -> Json:
        roles = self.members[user.id][1] if user.id in self.members else []
        data: Json = {
            "roles": [str(r.id) for r in roles],
            "nick": None,
            "avatar": None,
            "joined_at": _iso(time.time() - 86400),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
        }
        if with_user:
            data["user"] = user.payload()
        return data

    def permissions_of(self, user: FakeUser) -> int:
        if user.id == self.owner.id:
            return (1 << 53) - 1
        value = 0
        for role in [self.roles[0], *self.members.get(user.id, (user, []))[1]]:
            value |= role.permissions
        return (1 << 53) - 1 if value & ADMINISTRATOR else value

    def payload(self) -> Json:
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": str(self.owner.id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": [r.payload() for r in self.roles],
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "vanity_url_code": None,
            "description": None,
            "banner": None,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "joined_at": _iso(time.time() - 86400),
            "large": False,
            "unavailable": False,
            "member_count": len(self.members),
            "voice_states": [],
            "members": [self.member_payload(u) for u, _ in self.members.values()],
            "channels": [c.payload() for c in self.channels],
            "threads": [t.payload() for t in self.threads],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }


@dataclass(frozen=True, slots=True)
class RestCall:
    """One REST request as the fake received it."""

    method: str
    path: str  # without the /api/v10 prefix
    query: Mapping[str, str]
    json: Any
    status: int
    at: float  # time.monotonic()


@dataclass(eq=False)
class FakeInteraction:
    """A slash command a user ran, and what the bot answered."""

    id: int
    token: str
    user: FakeUser
    channel: FakeChannel
    name: str
    callbacks: list[Json] = field(default_factory=list)
    original: Json | None = None
    followups: list[Json] = field(default_factory=list)
    sent_at: float = 0.0

    @property
    def responses(self) -> list[Json]:
        """The messages the user sees: the original response, then followups."""
        return ([self.original] if self.original is not None else []) + self.followups


@dataclass(eq=False)
class FakeAttachment:
    filename: str
    data: bytes
    content_type: str | None = None


class _Connection:
    """One gateway WebSocket. Sends are serialised: the zlib stream must stay in order."""

    def __init__(self, ws: web.WebSocketResponse, compress: bool) -> None:
        self.ws = ws
        self._deflate = zlib.compressobj() if compress else None
        self._lock = asyncio.Lock()
        self.session: _Session | None = None

    async def send(self, payload: Json) -> None:
        text = json.dumps(payload, separators=(",", ":"))
        async with self._lock:
            if self.ws.closed:
                return
            try:
                if self._deflate is None:
                    await self.ws.send_str(text)
                else:
                    data = self._deflate.compress(text.encode()) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
                    await self.ws.send_bytes(data)
            except ConnectionResetError:
                logger.debug("gateway send on a closing socket")


@dataclass(eq=False)
class _Session:
    id: str
    shard: tuple[int, int]
    intents: int
    seq: int = 0
    buffer: deque[Json] = field(default_factory=lambda: deque(maxlen=5000))
    conn: _Connection | None = None


class FakeDiscordServer:
    """The fake Discord. Use as `async with FakeDiscordServer() as server:`."""

    def __init__(
        self,
        *,
        token: str = "fake-bot-token.abc.def",
        bot_name: str = "llmbot",
        heartbeat_interval_ms: int = 41250,
        message_content_enabled: bool = True,
        echo_bot_messages: bool = True,
    ) -> None:
        self.token = token
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.message_content_enabled = message_content_enabled
        """False: IDENTIFY with the Message Content intent is closed with 4014, as when
        the intent is not enabled in the developer portal."""
        self.echo_bot_messages = echo_bot_messages
        self._ids = _Snowflakes()
        self.bot = FakeUser(self._ids.next(), bot_name, bot=True)
        self.application_id = self._ids.next()
        self.owner = FakeUser(self._ids.next(), "appowner")
        self.users: dict[int, FakeUser] = {self.bot.id: self.bot}
        self.guilds: list[FakeGuild] = []
        self.channels: dict[int, FakeChannel] = {}
        self.messages: dict[int, Json] = {}
        self.deleted: set[int] = set()
        self.attachments: dict[int, bytes] = {}
        self.interactions: dict[int, FakeInteraction] = {}
        self.calls: list[RestCall] = []
        self.unknown_routes: list[tuple[str, str]] = []
        self.gateway_queries: list[dict[str, str]] = []
        """The query string of every gateway connection (v, encoding, compress)."""
        self.identifies: list[Json] = []
        self.resumes: list[Json] = []
        self.synced_commands: list[Json] | None = None
        self.user_message_times: dict[int, float] = {}
        """message id → time.monotonic() when `user_sends` dispatched it (for latency)."""
        self._fail_next: dict[int, list[int]] = {}
        self._sessions: dict[str, _Session] = {}
        self._connections: set[_Connection] = set()
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._listeners: list[Callable[[RestCall], None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeDiscordServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_get("/", self._gateway)
        app.router.add_get("/attachments/{channel}/{id}/{filename}", self._cdn)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self._port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def close(self) -> None:
        for conn in list(self._connections):
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

    # ------------------------------------------------------------------ the world

    def add_user(self, name: str, *, bot: bool = False) -> FakeUser:
        user = FakeUser(self._ids.next(), name, bot=bot)
        self.users[user.id] = user
        return user

    def add_guild(self, name: str = "Test Server", owner: FakeUser | None = None) -> FakeGuild:
        owner = owner or self.add_user("guildowner")
        guild = FakeGuild(self._ids.next(), name, owner)
        guild.roles.append(FakeRole(guild.id, "@everyone", EVERYONE_PERMISSIONS, 0))
        self.guilds.append(guild)
        self.add_member(guild, owner)
        self.add_member(guild, self.bot)
        return guild

    def add_role(self, guild: FakeGuild, name: str, permissions: int) -> FakeRole:
        role = FakeRole(self._ids.next(), name, permissions, len(guild.roles))
        guild.roles.append(role)
        return role

    def add_member(self, guild: FakeGuild, user: FakeUser, roles: Sequence[FakeRole] = ()) -> None:
        guild.members[user.id] = (user, list(roles))

    def add_text_channel(self, guild: FakeGuild, name: str) -> FakeChannel:
        channel = FakeChannel(self._ids.next(), CHANNEL_TEXT, name, guild=guild)
        guild.channels.append(channel)
        self.channels[channel.id] = channel
        return channel

    def add_thread(self, parent: FakeChannel, name: str) -> FakeChannel:
        assert parent.guild is not None
        thread = FakeChannel(self._ids.next(), CHANNEL_PUBLIC_THREAD, name, guild=parent.guild, parent=parent)
        parent.guild.threads.append(thread)
        self.channels[thread.id] = thread
        return thread

    def dm_channel(self, user: FakeUser) -> FakeChannel:
        for channel in self.channels.values():
            if channel.type == CHANNEL_DM and channel.recipient is user:
                return channel
        channel = FakeChannel(self._ids.next(), CHANNEL_DM, "", recipient=user)
        self.channels[channel.id] = channel
        return channel

    # ------------------------------------------------------------------ payloads

    def message_payload(
        self,
        channel: FakeChannel,
        author: FakeUser,
        content: str,
        *,
        reference: Json | None = None,
        ping_reply: bool = True,
        attachments: Sequence[FakeAttachment] = (),
        flags: int = 0,
        gateway: bool = False,
    ) -> Json:
        """A message object as Discord sends it (`gateway=True` adds guild_id and member)."""
        message_id = self._ids.next()
        mentioned = [self.users[int(m)] for m in _MENTION.findall(content) if int(m) in self.users]
        replied_author: FakeUser | None = None
        if reference is not None and ping_reply:
            replied_author = self.users.get(int(reference["author"]["id"]))
            if replied_author is not None and replied_author not in mentioned:
                mentioned.append(replied_author)
        guild = channel.guild
        data: Json = {
            "id": str(message_id),
            "channel_id": str(channel.id),
            "author": author.payload(),
            "content": content,
            "timestamp": _iso(time.time()),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [
                {**u.payload(), **({"member": guild.member_payload(u, with_user=False)} if guild and gateway else {})}
                for u in mentioned
            ],
            "mention_roles": [],
            "attachments": [self._attachment_payload(channel, a) for a in attachments],
            "embeds": [],
            "pinned": False,
            "type": MESSAGE_REPLY if reference is not None else MESSAGE_DEFAULT,
            "flags": flags,
            "components": [],
        }
        if reference is not None:
            data["message_reference"] = {
                "type": 0,
                "message_id": reference["id"],
                "channel_id": reference["channel_id"],
                **({"guild_id": str(guild.id)} if guild else {}),
            }
            data["referenced_message"] = None if int(reference["id"]) in self.deleted else reference
        if guild is not None and gateway:
            data["guild_id"] = str(guild.id)
            data["member"] = guild.member_payload(author, with_user=False)
        return data

    def _attachment_payload(self, channel: FakeChannel, attachment: FakeAttachment) -> Json:
        attachment_id = self._ids.next()
        self.attachments[attachment_id] = attachment.data
        url = f"http://127.0.0.1:{self._port}/attachments/{channel.id}/{attachment_id}/{attachment.filename}"
        data: Json = {
            "id": str(attachment_id),
            "filename": attachment.filename,
            "size": len(attachment.data),
            "url": url,
            "proxy_url": url,
        }
        if attachment.content_type is not None:
            data["content_type"] = attachment.content_type
        return data

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
        self.user_message_times[int(data["id"])] = time.monotonic()
        await self._dispatch_message_event("MESSAGE_CREATE", channel, data)
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
        options={"key": "temperature", "value": "0.5"})`."""
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
            opts = [{"name": subcommand, "type": 1, "options": opts}]
        command: Json = {"id": synced[name]["id"], "name": name, "type": 1, "options": opts}
        if resolved:
            command["resolved"] = resolved
        interaction = FakeInteraction(self._ids.next(), "itoken-" + secrets.token_urlsafe(24), user, channel, name)
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
        interaction.sent_at = time.monotonic()
        await self._dispatch(self._shard_sessions(guild), "INTERACTION_CREATE", data, intent=0)
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
        await self._dispatch_message_event("MESSAGE_DELETE", channel, data)

    def fail_next_message(self, channel: FakeChannel, status: int = 403) -> None:
        """The bot's next create-message in `channel` fails (403: Missing Permissions)."""
        self._fail_next.setdefault(channel.id, []).append(status)

    async def drop_gateway(self, code: int = 4000) -> None:
        """Close every gateway connection (4000 = Discord's resumable "unknown error")."""
        for conn in list(self._connections):
            await conn.ws.close(code=code, message=b"fake server dropped the connection")

    async def send_reconnect(self) -> None:
        """Ask every connected client to reconnect and resume (op 7)."""
        for conn in list(self._connections):
            await conn.send({"op": 7, "d": None, "s": None, "t": None})

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
        await self.wait_for(lambda: sum(1 for s in self._sessions.values() if s.seq > 0) >= count, timeout)

    @property
    def open_connections(self) -> int:
        """Gateway WebSockets currently open."""
        return len(self._connections)

    def bot_messages(self, channel: FakeChannel) -> list[Json]:
        """The bot's messages in `channel` that still exist, oldest first, as edited."""
        return [
            m
            for mid, m in self.messages.items()
            if m["channel_id"] == str(channel.id) and m["author"]["id"] == str(self.bot.id) and mid not in self.deleted
        ]

    def bot_texts(self, channel: FakeChannel) -> list[str]:
        return [m["content"] for m in self.bot_messages(channel)]

    def message_calls(self) -> list[RestCall]:
        """Every create-message, edit-message and interaction response the bot made."""
        return [
            c
            for c in self.calls
            if (re.fullmatch(r"/channels/\d+/messages(/\d+)?", c.path)
            and c.method in ("POST", "PATCH"))
            or c.path.startswith(("/interactions/", "/webhooks/"))
        ]

    def add_listener(self, listener: Callable[[RestCall], None]) -> None:
        """Called synchronously for every REST call (benchmarks time replies with it)."""
        self._listeners.append(listener)

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ gateway

    def _shard_sessions(self, guild: FakeGuild | None) -> list[_Session]:
        out = []
        for session in self._sessions.values():
            shard_id, count = session.shard
            if (0 if guild is None else (guild.id >> 22) % count) == shard_id:
                out.append(session)
        return out

    async def _dispatch_message_event(self, event: str, channel: FakeChannel, data: Json) -> None:
        intent = INTENT_GUILD_MESSAGES if channel.guild is not None else INTENT_DIRECT_MESSAGES
        sessions = self._shard_sessions(channel.guild)
        for session in sessions:
            payload = data
            if (
                event == "MESSAGE_CREATE"
                and not session.intents & INTENT_MESSAGE_CONTENT
                and channel.guild is not None
                and data["author"]["id"] != str(self.bot.id)
                and not any(u["id"] == str(self.bot.id) for u in data["mentions"])
            ):
                payload = {**data, "content": "", "embeds": [], "attachments": []}
            await self._dispatch([session], event, payload, intent=intent)

    async def _dispatch(self, sessions: Iterable[_Session], event: str, data: Json, *, intent: int) -> None:
        for session in sessions:
            if intent and not session.intents & intent:
                continue
            session.seq += 1
            payload = {"op": 0, "t": event, "s": session.seq, "d": data}
            session.buffer.append(payload)
            if session.conn is not None:
                await session.conn.send(payload)
        await self._notify()

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.gateway_queries.append(dict(request.query))
        if request.query.get("encoding", "json") != "json":
            await ws.close(code=4002, message=b"only encoding=json is supported")
            return ws
        conn = _Connection(ws, request.query.get("compress") == "zlib-stream")
        self._connections.add(conn)
        try:
            await conn.send({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}, "s": None, "t": None})
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                await self._gateway_op(conn, json.loads(msg.data))
        finally:
            self._connections.discard(conn)
            if conn.session is not None and conn.session.conn is conn:
                conn.session.conn = None
            await self._notify()
        return ws

    async def _gateway_op(self, conn: _Connection, msg: Json) -> None:
        op, data = msg.get("op"), msg.get("d") or {}
        if op == 1:
            await conn.send({"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:
            await self._identify(conn, data)
        elif op == 6:
            await self._resume(conn, data)
        elif op in (3, 4, 8):
            pass  # presence, voice, member requests: nothing to do here
        else:
            logger.warning("fake gateway: unknown op %s", op)

    async def _identify(self, conn: _Connection, data: Json) -> None:
        self.identifies.append(
            {k: v for k, v in data.items() if k != "token"} | {"token_ok": data["token"] == self.token}
        )
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        intents = int(data.get("intents", 0))
        if intents & INTENT_MESSAGE_CONTENT and not self.message_content_enabled:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        shard = tuple(data.get("shard", (0, 1)))
        session = _Session(secrets.token_hex(16), (int(shard[0]), int(shard[1])), intents, conn=conn)
        conn.session = session
        self._sessions[session.id] = session
        guilds = [g for g in self.guilds if (g.id >> 22) % session.shard[1] == session.shard[0]]
        ready: Json = {
            "v": 10,
            "user": {**self.bot.payload(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "shard": list(session.shard),
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
        }
        await self._dispatch([session], "READY", ready, intent=0)
        for guild in guilds:
            await self._dispatch([session], "GUILD_CREATE", guild.payload(), intent=INTENT_GUILDS)

    async def _resume(self, conn: _Connection, data: Json) -> None:
        self.resumes.append({"session_id": data.get("session_id"), "seq": data.get("seq")})
        session = self._sessions.get(str(data.get("session_id")))
        if session is None or data.get("token") != self.token:
            await conn.send({"op": 9, "d": False, "s": None, "t": None})
            return
        conn.session = session
        session.conn = conn
        last = int(data.get("seq") or 0)
        for payload in list(session.buffer):
            if payload["s"] > last:
                await conn.send(payload)
        await self._dispatch([session], "RESUMED", {}, intent=0)

    # ------------------------------------------------------------------ REST

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        data = self.attachments.get(int(request.match_info["id"]))
        if data is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=data, content_type="application/octet-stream")

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            if request.content_type == "application/json" and raw:
                body = json.loads(raw)
            elif raw:
                body = {"_raw": raw.decode(errors="replace")[:2000]}
        status, reply = await self._route(request, path, body)
        call = RestCall(request.method, path, dict(request.query), body, status, time.monotonic())
        self.calls.append(call)
        for listener in self._listeners:
            listener(call)
        await self._notify()
        if status == 204:
            return web.Response(status=204)
        # Exactly "application/json" (no charset): discord.py compares the header verbatim.
        return web.Response(
            status=status, body=json.dumps(reply).encode(), headers={"Content-Type": "application/json"}
        )

    async def _route(self, request: web.Request, path: str, body: Any) -> tuple[int, Any]:
        method = request.method
        for route_method, pattern, handler, bot_auth in self._routes():
            if method != route_method:
                continue
            match = re.fullmatch(pattern, path)
            if match is None:
                continue
            if bot_auth and request.headers.get("Authorization") != f"Bot {self.token}":
                return 401, {"message": "401: Unauthorized", "code": 0}
            return await handler(body, *match.groups())
        logger.warning("fake Discord: unknown route %s %s", method, path)
        self.unknown_routes.append((method, path))
        return 404, {"message": "404: Not Found", "code": 0}

    def _routes(self) -> list[tuple[str, str, Callable[..., Awaitable[tuple[int, Any]]], bool]]:
        return [
            ("GET", r"/users/@me", self._get_me, True),
            ("GET", r"/oauth2/applications/@me", self._get_application, True),
            ("GET", r"/gateway", self._get_gateway, False),
            ("GET", r"/gateway/bot", self._get_gateway_bot, True),
            ("POST", r"/channels/(\d+)/messages", self._create_message, True),
            ("PATCH", r"/channels/(\d+)/messages/(\d+)", self._edit_message, True),
            ("GET", r"/channels/(\d+)/messages/(\d+)", self._get_message, True),
            ("POST", r"/channels/(\d+)/typing", self._typing, True),
            ("PUT", r"/applications/(\d+)/commands", self._sync_commands, True),
            ("POST", r"/interactions/(\d+)/([^/]+)/callback", self._interaction_callback, False),
            ("PATCH", r"/webhooks/(\d+)/([^/]+)/messages/@original", self._edit_original, False),
            ("POST", r"/webhooks/(\d+)/([^/]+)", self._followup, False),
            ("PATCH", r"/webhooks/(\d+)/([^/]+)/messages/(\d+)", self._edit_followup, False),
        ]

    async def _get_me(self, body: Any) -> tuple[int, Any]:
        return 200, {**self.bot.payload(), "verified": True, "mfa_enabled": False, "flags": 0, "email": None}

    async def _get_application(self, body: Any) -> tuple[int, Any]:
        return 200, {
            "id": str(self.application_id),
            "name": self.bot.username,
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "flags": 0,
            "owner": self.owner.payload(),
            "team": None,
            "bot": self.bot.payload(),
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "tags": [],
        }

    async def _get_gateway(self, body: Any) -> tuple[int, Any]:
        return 200, {"url": self.gateway_url}

    async def _get_gateway_bot(self, body: Any) -> tuple[int, Any]:
        return 200, {
            "url": self.gateway_url,
            "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1},
        }

    @staticmethod
    def _content_error(content: Any) -> tuple[int, Any] | None:
        if not isinstance(content, str) or not content:
            return 400, {"message": "Cannot send an empty message", "code": 50006}
        if len(content) > 2000:
            return 400, {
                "message": "Invalid Form Body",
                "code": 50035,
                "errors": {
                    "content": {
                        "_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]
                    }
                },
            }
        return None

    async def _create_message(self, body: Any, channel_id: str) -> tuple[int, Any]:
        channel = self.channels.get(int(channel_id))
        if channel is None:
            return 404, {"message": "Unknown Channel", "code": 10003}
        failures = self._fail_next.get(channel.id)
        if failures:
            status = failures.pop(0)
            if status == 403:
                return 403, {"message": "Missing Permissions", "code": 50013}
            return status, {"message": f"{status}: scripted failure", "code": 0}
        error = self._content_error((body or {}).get("content"))
        if error is not None:
            return error
        reference: Json | None = None
        if "message_reference" in body:
            ref_id = int(body["message_reference"]["message_id"])
            if ref_id in self.deleted or ref_id not in self.messages:
                if body["message_reference"].get("fail_if_not_exists", True):
                    return 400, {
                        "message": "Invalid Form Body",
                        "code": 50035,
                        "errors": {
                            "message_reference": {
                                "_errors": [{"code": "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "message": "Unknown message"}]
                            }
                        },
                    }
            else:
                reference = self.messages[ref_id]
        ping = bool((body.get("allowed_mentions") or {}).get("replied_user", True))
        data = self.message_payload(channel, self.bot, body["content"], reference=reference, ping_reply=ping)
        self.messages[int(data["id"])] = data
        if self.echo_bot_messages:
            gateway_copy = dict(data)
            if channel.guild is not None:
                gateway_copy["guild_id"] = str(channel.guild.id)
                gateway_copy["member"] = channel.guild.member_payload(self.bot, with_user=False)
            await self._dispatch_message_event("MESSAGE_CREATE", channel, gateway_copy)
        return 200, data

    async def _edit_message(self, body: Any, channel_id: str, message_id: str) -> tuple[int, Any]:
        message = self.messages.get(int(message_id))
        if message is None or int(message_id) in self.deleted or message["channel_id"] != channel_id:
            return 404, {"message": "Unknown Message", "code": 10008}
        if message["author"]["id"] != str(self.bot.id):
            return 403, {"message": "Cannot edit a message authored by another user", "code": 50005}
        if "content" in body:
            error = self._content_error(body["content"])
            if error is not None:
                return error
            message["content"] = body["content"]
        message["edited_timestamp"] = _iso(time.time())
        if self.echo_bot_messages:
            channel = self.channels[int(channel_id)]
            update = dict(message)
            if channel.guild is not None:
                update["guild_id"] = str(channel.guild.id)
            await self._dispatch_message_event("MESSAGE_UPDATE", channel, update)
        return 200, message

    async def _get_message(self, body: Any, channel_id: str, message_id: str) -> tuple[int, Any]:
        message = self.messages.get(int(message_id))
        if message is None or int(message_id) in self.deleted or message["channel_id"] != channel_id:
            return 404, {"message": "Unknown Message", "code": 10008}
        return 200, message

    async def _typing(self, body: Any, channel_id: str) -> tuple[int, Any]:
        if int(channel_id) not in self.channels:
            return 404, {"message": "Unknown Channel", "code": 10003}
        return 204, None

    async def _sync_commands(self, body: Any, application_id: str) -> tuple[int, Any]:
        if application_id != str(self.application_id):
            return 403, {"message": "Missing Access", "code": 50001}
        out = []
        for command in body:
            out.append(
                {
                    "id": str(self._ids.next()),
                    "application_id": application_id,
                    "version": str(self._ids.next()),
                    "type": 1,
                    "default_member_permissions": None,
                    "dm_permission": True,
                    "nsfw": False,
                    "integration_types": [0],
                    "contexts": None,
                    "options": [],
                    **command,
                }
            )
        self.synced_commands = out
        return 200, out

    def _interaction_by_token(self, token: str) -> FakeInteraction | None:
        return next((i for i in self.interactions.values() if i.token == token), None)

    def _interaction_message(self, interaction: FakeInteraction, content: str, flags: int) -> Json:
        data = self.message_payload(interaction.channel, self.bot, content, flags=flags)
        data["webhook_id"] = str(self.application_id)
        data["application_id"] = str(self.application_id)
        data["type"] = 20  # CHAT_INPUT_COMMAND
        data["interaction_metadata"] = {
            "id": str(interaction.id),
            "type": 2,
            "name": interaction.name,
            "user": interaction.user.payload(),
            "authorizing_integration_owners": {},
        }
        return data

    async def _interaction_callback(self, body: Any, interaction_id: str, token: str) -> tuple[int, Any]:
        interaction = self.interactions.get(int(interaction_id))
        if interaction is None or interaction.token != token:
            return 404, {"message": "Unknown interaction", "code": 10062}
        if interaction.callbacks:
            return 400, {"message": "Interaction has already been acknowledged.", "code": 40060}
        interaction.callbacks.append(body)
        kind, data = body["type"], body.get("data") or {}
        flags = int(data.get("flags", 0))
        if kind == 4:
            error = self._content_error(data.get("content"))
            if error is not None:
                return error
            interaction.original = self._interaction_message(interaction, data["content"], flags)
        elif kind == 5:
            interaction.original = self._interaction_message(interaction, "", flags | LOADING)
        else:
            return 400, {"message": f"fake server: unsupported callback type {kind}", "code": 50035}
        return 200, {
            "interaction": {
                "id": str(interaction.id),
                "type": 2,
                "response_message_id": interaction.original["id"],
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool(flags & EPHEMERAL),
            },
            "resource": {"type": kind, "message": interaction.original},
        }

    async def _edit_original(self, body: Any, application_id: str, token: str) -> tuple[int, Any]:
        interaction = self._interaction_by_token(token)
        if interaction is None or interaction.original is None:
            return 404, {"message": "Unknown Webhook", "code": 10015}
        if "content" in body:
            error = self._content_error(body["content"])
            if error is not None:
                return error
            interaction.original["content"] = body["content"]
        interaction.original["flags"] = int(interaction.original["flags"]) & ~LOADING
        return 200, interaction.original

    async def _followup(self, body: Any, application_id: str, token: str) -> tuple[int, Any]:
        interaction = self._interaction_by_token(token)
        if interaction is None or not interaction.callbacks:
            return 404, {"message": "Unknown Webhook", "code": 10015}
        error = self._content_error(body.get("content"))
        if error is not None:
            return error
        message = self._interaction_message(interaction, body["content"], int(body.get("flags", 0)))
        interaction.followups.append(message)
        return 200, message

    async def _edit_followup(self, body: Any, application_id: str, token: str, message_id: str) -> tuple[int, Any]:
        interaction = self._interaction_by_token(token)
        message = next((m for m in interaction.followups if m["id"] == message_id), None) if interaction else None
        if message is None:
            return 404, {"message": "Unknown Message", "code": 10008}
        if "content" in body:
            error = self._content_error(body["content"])
            if error is not None:
                return error
            message["content"] = body["content"]
        return 200, message
