"""The fake Discord's gateway WebSocket: HELLO / IDENTIFY / READY / GUILD_CREATE,
heartbeats, sequence numbers, shards, intents (including the privileged Message
Content intent), zlib-stream transport compression, and RESUME with replay of the
events a client missed."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from tests.fakes.discord.world import FakeChannel, FakeGuild, FakeWorld, Json

logger = logging.getLogger(__name__)

INTENT_GUILDS = 1 << 0
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15

HEARTBEAT_INTERVAL_MS = 41250  # what Discord sends


class Connection:
    """One gateway WebSocket. Sends are serialised: the zlib stream must stay in order."""

    def __init__(self, ws: web.WebSocketResponse, compress: bool) -> None:
        self.ws = ws
        self._deflate = zlib.compressobj() if compress else None
        self._lock = asyncio.Lock()
        self.session: Session | None = None

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
class Session:
    """A gateway session: it outlives its connection, so a client can RESUME it."""

    id: str
    shard: tuple[int, int]
    intents: int
    seq: int = 0
    buffer: deque[Json] = field(default_factory=lambda: deque(maxlen=5000))
    conn: Connection | None = None


class Gateway:
    """Serves the world's events to the bot's gateway sessions. `notify` is awaited
    after every dispatch and every closed connection (tests wait on it)."""

    def __init__(self, world: FakeWorld, notify: Callable[[], Awaitable[None]]) -> None:
        self._world = world
        self._notify = notify
        self.url = ""
        """The gateway's ws:// URL (the server sets it when it starts)."""
        self.queries: list[dict[str, str]] = []
        """The query string of every gateway connection (v, encoding, compress)."""
        self.identifies: list[Json] = []
        self.resumes: list[Json] = []
        self.connections: set[Connection] = set()
        self.refuse_handshakes = 0
        """How many of the next connections are refused before the WebSocket handshake
        (HTTP 503), as a gateway in trouble would."""
        self._sessions: dict[str, Session] = {}

    @property
    def identified(self) -> int:
        """Sessions that have received READY and their guilds."""
        return sum(1 for s in self._sessions.values() if s.seq > 0)

    async def send_all(self, payload: Json) -> None:
        for conn in list(self.connections):
            await conn.send(payload)

    # ------------------------------------------------------------------ dispatch

    def shard_sessions(self, guild: FakeGuild | None) -> list[Session]:
        """The sessions whose shard receives `guild`'s events (DMs go to shard 0)."""
        out = []
        for session in self._sessions.values():
            shard_id, count = session.shard
            if (0 if guild is None else (guild.id >> 22) % count) == shard_id:
                out.append(session)
        return out

    async def dispatch_message_event(self, event: str, channel: FakeChannel, data: Json) -> None:
        """A message event, with its content hidden from sessions without the Message
        Content intent unless it mentions the bot (as Discord does)."""
        intent = INTENT_GUILD_MESSAGES if channel.guild is not None else INTENT_DIRECT_MESSAGES
        bot_id = str(self._world.bot.id)
        for session in self.shard_sessions(channel.guild):
            payload = data
            if (
                event == "MESSAGE_CREATE"
                and not session.intents & INTENT_MESSAGE_CONTENT
                and channel.guild is not None
                and data["author"]["id"] != bot_id
                and not any(u["id"] == bot_id for u in data["mentions"])
            ):
                payload = {**data, "content": "", "embeds": [], "attachments": []}
            await self.dispatch([session], event, payload, intent=intent)

    async def dispatch(self, sessions: Iterable[Session], event: str, data: Json, *, intent: int) -> None:
        """Send an event to each of `sessions` that asked for `intent` (0: to all), and
        keep it for a RESUME."""
        for session in sessions:
            if intent and not session.intents & intent:
                continue
            session.seq += 1
            payload = {"op": 0, "t": event, "s": session.seq, "d": data}
            session.buffer.append(payload)
            if session.conn is not None:
                await session.conn.send(payload)
        await self._notify()

    # ------------------------------------------------------------------ the WebSocket

    async def serve(self, request: web.Request) -> web.StreamResponse:
        if self.refuse_handshakes > 0:
            self.refuse_handshakes -= 1
            self.queries.append(dict(request.query))
            await self._notify()
            return web.Response(status=503, text="gateway unavailable")
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.queries.append(dict(request.query))
        if request.query.get("encoding", "json") != "json":
            await ws.close(code=4002, message=b"only encoding=json is supported")
            return ws
        conn = Connection(ws, request.query.get("compress") == "zlib-stream")
        self.connections.add(conn)
        try:
            await conn.send({"op": 10, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}, "s": None, "t": None})
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                await self._op(conn, json.loads(msg.data))
        finally:
            self.connections.discard(conn)
            if conn.session is not None and conn.session.conn is conn:
                conn.session.conn = None
            await self._notify()
        return ws

    async def _op(self, conn: Connection, msg: Json) -> None:
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

    async def _identify(self, conn: Connection, data: Json) -> None:
        world = self._world
        self.identifies.append(
            {k: v for k, v in data.items() if k != "token"} | {"token_ok": data["token"] == world.token}
        )
        if data.get("token") != world.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        intents = int(data.get("intents", 0))
        if intents & INTENT_MESSAGE_CONTENT and not world.message_content_enabled:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        shard = tuple(data.get("shard", (0, 1)))
        session = Session(secrets.token_hex(16), (int(shard[0]), int(shard[1])), intents, conn=conn)
        conn.session = session
        self._sessions[session.id] = session
        guilds = [g for g in world.guilds if (g.id >> 22) % session.shard[1] == session.shard[0]]
        ready: Json = {
            "v": 10,
            "user": {**world.bot.payload(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.url,
            "shard": list(session.shard),
            "application": {"id": str(world.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
        }
        await self.dispatch([session], "READY", ready, intent=0)
        for guild in guilds:
            await self.dispatch([session], "GUILD_CREATE", guild.payload(), intent=INTENT_GUILDS)

    async def _resume(self, conn: Connection, data: Json) -> None:
        self.resumes.append({"session_id": data.get("session_id"), "seq": data.get("seq")})
        session = self._sessions.get(str(data.get("session_id")))
        if session is None or data.get("token") != self._world.token:
            await conn.send({"op": 9, "d": False, "s": None, "t": None})
            return
        conn.session = session
        session.conn = conn
        last = int(data.get("seq") or 0)
        for payload in list(session.buffer):
            if payload["s"] > last:
                await conn.send(payload)
        await self.dispatch([session], "RESUMED", {}, intent=0)
