"""The fake Discord's REST API (v10): the bot's user and application, the gateway URL,
messages (create, edit, read, typing), slash command sync, and interaction responses
and followups, with Discord's error bodies.

Unknown routes answer 404 like Discord and are logged and recorded, so a new request
the client starts making shows up in the test output.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from tests.fakes.discord.gateway import Gateway
from tests.fakes.discord.world import FakeAttachment, FakeChannel, FakeInteraction, FakeUpload, FakeWorld, Json, iso

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v10"

EPHEMERAL = 1 << 6
LOADING = 1 << 7

UNKNOWN_MESSAGE: Json = {"message": "Unknown Message", "code": 10008}

Reply = tuple[int, Any]
"""A status and the JSON body to answer with."""
Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Reply]])


@dataclass(frozen=True, slots=True)
class RestCall:
    """One REST request as the fake received it."""

    method: str
    path: str  # without the /api/v10 prefix
    query: Mapping[str, str]
    json: Any
    status: int
    at: float  # time.monotonic()
    files: tuple[FakeAttachment, ...] = ()  # the files of a multipart request


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: Callable[..., Awaitable[Reply]]
    bot_auth: bool


_ROUTES: list[_Route] = []


def _route(method: str, pattern: str, *, bot_auth: bool = True) -> Callable[[Handler], Handler]:
    """Register a `RestApi` method for `method` and a path matching `pattern` (its groups
    are the handler's arguments after the body); `bot_auth`: the route needs the token."""

    def register(handler: Handler) -> Handler:
        _ROUTES.append(_Route(method, re.compile(pattern), handler, bot_auth))
        return handler

    return register


def _invalid_form(field: str, code: str, message: str) -> Reply:
    """Discord's 400 for a field of the request it refuses."""
    errors = {field: {"_errors": [{"code": code, "message": message}]}}
    return 400, {"message": "Invalid Form Body", "code": 50035, "errors": errors}


def _content_error(content: Any, *, with_files: bool = False) -> Reply | None:
    if with_files and content in (None, ""):
        return None  # a message may be just a file
    if not isinstance(content, str) or not content:
        return 400, {"message": "Cannot send an empty message", "code": 50006}
    if len(content) > 2000:
        return _invalid_form("content", "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
    return None


def _edit_content(message: Json, body: Any, *, with_files: bool = False) -> Reply | None:
    """Apply an edit's new content, if any; the error when Discord would refuse it."""
    if "content" in body and not (with_files and body["content"] is None):
        error = _content_error(body["content"], with_files=with_files)
        if error is not None:
            return error
        message["content"] = body["content"]
    return None


class RestApi:
    """Serves the world over REST. A bot message also reaches the bot's gateway
    sessions, as on Discord; `notify` is awaited after every request."""

    def __init__(self, world: FakeWorld, gateway: Gateway, notify: Callable[[], Awaitable[None]]) -> None:
        self._world = world
        self._gateway = gateway
        self._notify = notify
        self.calls: list[RestCall] = []
        self.unknown_routes: list[tuple[str, str]] = []
        self._fail_next: dict[int, list[int]] = {}
        self._fail_after: dict[int, list[int]] = {}
        self._nonces: dict[tuple[int, str], Json] = {}
        self._listeners: list[Callable[[RestCall], None]] = []

    def fail_next_message(self, channel: FakeChannel, status: int) -> None:
        self._fail_next.setdefault(channel.id, []).append(status)

    def fail_after_next_message(self, channel: FakeChannel, status: int) -> None:
        self._fail_after.setdefault(channel.id, []).append(status)

    def add_listener(self, listener: Callable[[RestCall], None]) -> None:
        self._listeners.append(listener)

    def message_calls(self) -> list[RestCall]:
        """Every create-message, edit-message and interaction response the bot made."""
        return [
            c
            for c in self.calls
            if (re.fullmatch(r"/channels/\d+/messages(/\d+)?", c.path) and c.method in ("POST", "PATCH"))
            or c.path.startswith(("/interactions/", "/webhooks/"))
        ]

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        """Attachment downloads."""
        data = self._world.attachments.get(int(request.match_info["id"]))
        if data is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=data, content_type="application/octet-stream")

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """A request under /api/v10: routed, recorded in `calls`, and answered."""
        path = "/" + request.match_info["tail"]
        body: Any = None
        files: list[FakeAttachment] = []
        if request.content_type == "multipart/form-data":  # discord.py sends files so
            form = await request.post()
            payload = form.get("payload_json")
            body = json.loads(payload) if isinstance(payload, str) else {}
            for value in form.values():
                if isinstance(value, web.FileField):
                    files.append(FakeAttachment(value.filename, value.file.read(), value.content_type))
            body["_files"] = files
        elif request.can_read_body:
            raw = await request.read()
            if request.content_type == "application/json" and raw:
                body = json.loads(raw)
            elif raw:
                body = {"_raw": raw.decode(errors="replace")[:2000]}
        status, reply = await self._dispatch(request, path, body)
        if files:
            body.pop("_files", None)
        call = RestCall(request.method, path, dict(request.query), body, status, time.monotonic(), tuple(files))
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

    async def _dispatch(self, request: web.Request, path: str, body: Any) -> Reply:
        method = request.method
        for route in _ROUTES:
            match = route.pattern.fullmatch(path) if route.method == method else None
            if match is None:
                continue
            if route.bot_auth and request.headers.get("Authorization") != f"Bot {self._world.token}":
                return 401, {"message": "401: Unauthorized", "code": 0}
            return await route.handler(self, body, *match.groups())
        logger.warning("fake Discord: unknown route %s %s", method, path)
        self.unknown_routes.append((method, path))
        return 404, {"message": "404: Not Found", "code": 0}

    def _stored_message(self, channel_id: str, message_id: str) -> Json | None:
        """A message of that channel that still exists."""
        message = self._world.messages.get(int(message_id))
        if message is None or int(message_id) in self._world.deleted or message["channel_id"] != channel_id:
            return None
        return message

    async def _echo(self, event: str, channel: FakeChannel, message: Json) -> None:
        """The bot's own message comes back to it over the gateway, as on Discord."""
        data = dict(message)
        if channel.guild is not None:
            data["guild_id"] = str(channel.guild.id)
            if event == "MESSAGE_CREATE":
                data["member"] = channel.guild.member_payload(self._world.bot, with_user=False)
        await self._gateway.dispatch_message_event(event, channel, data)

    @_route("GET", r"/users/@me")
    async def _get_me(self, body: Any) -> Reply:
        return 200, {**self._world.bot.payload(), "verified": True, "mfa_enabled": False, "flags": 0, "email": None}

    @_route("GET", r"/oauth2/applications/@me")
    async def _get_application(self, body: Any) -> Reply:
        return 200, {
            "id": str(self._world.application_id),
            "name": self._world.bot.username,
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "flags": 0,
            "owner": self._world.owner.payload(),
            "team": None,
            "bot": self._world.bot.payload(),
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "tags": [],
        }

    @_route("GET", r"/gateway", bot_auth=False)
    async def _get_gateway(self, body: Any) -> Reply:
        return 200, {"url": self._gateway.url}

    @_route("GET", r"/gateway/bot")
    async def _get_gateway_bot(self, body: Any) -> Reply:
        return 200, {
            "url": self._gateway.url,
            "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1},
        }

    @_route("POST", r"/channels/(\d+)/messages")
    async def _create_message(self, body: Any, channel_id: str) -> Reply:
        channel = self._world.channels.get(int(channel_id))
        if channel is None:
            return 404, {"message": "Unknown Channel", "code": 10003}
        failures = self._fail_next.get(channel.id)
        if failures:
            status = failures.pop(0)
            if status == 403:
                return 403, {"message": "Missing Permissions", "code": 50013}
            return status, {"message": f"{status}: scripted failure", "code": 0}
        nonce = body.get("nonce")
        if body.get("enforce_nonce") and nonce is not None and (channel.id, str(nonce)) in self._nonces:
            return 200, self._nonces[(channel.id, str(nonce))]  # Discord: the same message again
        files: list[FakeAttachment] = body.get("_files") or []
        error = _content_error(body.get("content"), with_files=bool(files))
        if error is not None:
            return error
        reference: Json | None = None
        if "message_reference" in body:
            ref_id = int(body["message_reference"]["message_id"])
            if ref_id in self._world.deleted or ref_id not in self._world.messages:
                if body["message_reference"].get("fail_if_not_exists", True):
                    return _invalid_form("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
            else:
                reference = self._world.messages[ref_id]
        ping = bool((body.get("allowed_mentions") or {}).get("replied_user", True))
        data = self._world.message_payload(
            channel, self._world.bot, body.get("content") or "", reference=reference, ping_reply=ping, attachments=files
        )
        self._world.messages[int(data["id"])] = data
        for file in files:
            self._world.uploads.append(
                FakeUpload(channel.id, int(data["id"]), file.filename, file.data, data["content"], False)
            )
        if nonce is not None:
            self._nonces[(channel.id, str(nonce))] = data
        await self._echo("MESSAGE_CREATE", channel, data)
        late = self._fail_after.get(channel.id)
        if late:  # carried out, but the answer is an error (a proxy in trouble)
            status = late.pop(0)
            return status, {"message": f"{status}: scripted failure after the fact", "code": 0}
        return 200, data

    @_route("PATCH", r"/channels/(\d+)/messages/(\d+)")
    async def _edit_message(self, body: Any, channel_id: str, message_id: str) -> Reply:
        message = self._stored_message(channel_id, message_id)
        if message is None:
            return 404, UNKNOWN_MESSAGE
        if message["author"]["id"] != str(self._world.bot.id):
            return 403, {"message": "Cannot edit a message authored by another user", "code": 50005}
        error = _edit_content(message, body)
        if error is not None:
            return error
        message["edited_timestamp"] = iso(time.time())
        await self._echo("MESSAGE_UPDATE", self._world.channels[int(channel_id)], message)
        return 200, message

    @_route("GET", r"/channels/(\d+)/messages/(\d+)")
    async def _get_message(self, body: Any, channel_id: str, message_id: str) -> Reply:
        message = self._stored_message(channel_id, message_id)
        return (404, UNKNOWN_MESSAGE) if message is None else (200, message)

    @_route("POST", r"/channels/(\d+)/typing")
    async def _typing(self, body: Any, channel_id: str) -> Reply:
        if int(channel_id) not in self._world.channels:
            return 404, {"message": "Unknown Channel", "code": 10003}
        return 204, None

    @_route("PUT", r"/applications/(\d+)/commands")
    async def _sync_commands(self, body: Any, application_id: str) -> Reply:
        if application_id != str(self._world.application_id):
            return 403, {"message": "Missing Access", "code": 50001}
        out = []
        for command in body:
            out.append(
                {
                    "id": str(self._world.ids.next()),
                    "application_id": application_id,
                    "version": str(self._world.ids.next()),
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
            if self._world.sync_without_ids:
                del out[-1]["id"]
        self._world.synced_commands = out
        return 200, out

    def _interaction_by_token(self, token: str) -> FakeInteraction | None:
        return next((i for i in self._world.interactions.values() if i.token == token), None)

    def _interaction_message(self, interaction: FakeInteraction, content: str, flags: int) -> Json:
        data = self._world.message_payload(interaction.channel, self._world.bot, content, flags=flags)
        data["webhook_id"] = str(self._world.application_id)
        data["application_id"] = str(self._world.application_id)
        data["type"] = 20  # CHAT_INPUT_COMMAND
        data["interaction_metadata"] = {
            "id": str(interaction.id),
            "type": 2,
            "name": interaction.name,
            "user": interaction.user.payload(),
            "authorizing_integration_owners": {},
        }
        return data

    @_route("POST", r"/interactions/(\d+)/([^/]+)/callback", bot_auth=False)
    async def _interaction_callback(self, body: Any, interaction_id: str, token: str) -> Reply:
        interaction = self._world.interactions.get(int(interaction_id))
        if interaction is None or interaction.token != token:
            return 404, {"message": "Unknown interaction", "code": 10062}
        if interaction.callbacks:
            return 400, {"message": "Interaction has already been acknowledged.", "code": 40060}
        interaction.callbacks.append(body)
        kind, data = body["type"], body.get("data") or {}
        flags = int(data.get("flags", 0))
        if kind == 4:
            error = _content_error(data.get("content"))
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

    @_route("PATCH", r"/webhooks/(\d+)/([^/]+)/messages/@original", bot_auth=False)
    async def _edit_original(self, body: Any, application_id: str, token: str) -> Reply:
        interaction = self._interaction_by_token(token)
        if interaction is None or interaction.original is None:
            return 404, {"message": "Unknown Webhook", "code": 10015}
        files: list[FakeAttachment] = body.pop("_files", None) or []
        error = _edit_content(interaction.original, body, with_files=bool(files))
        if error is not None:
            return error
        self._attach(interaction, interaction.original, files)
        interaction.original["flags"] = int(interaction.original["flags"]) & ~LOADING
        return 200, interaction.original

    def _attach(self, interaction: FakeInteraction, message: Json, files: list[FakeAttachment]) -> None:
        """Files of a slash command's answer."""
        for file in files:
            message["attachments"].append(self._world._attachment_payload(interaction.channel, file))
            ephemeral = bool(int(message["flags"]) & EPHEMERAL)
            self._world.uploads.append(
                FakeUpload(
                    interaction.channel.id, int(message["id"]), file.filename, file.data, message["content"], ephemeral
                )
            )

    @_route("POST", r"/webhooks/(\d+)/([^/]+)", bot_auth=False)
    async def _followup(self, body: Any, application_id: str, token: str) -> Reply:
        interaction = self._interaction_by_token(token)
        if interaction is None or not interaction.callbacks:
            return 404, {"message": "Unknown Webhook", "code": 10015}
        files: list[FakeAttachment] = body.pop("_files", None) or []
        error = _content_error(body.get("content"), with_files=bool(files))
        if error is not None:
            return error
        message = self._interaction_message(interaction, body.get("content") or "", int(body.get("flags", 0)))
        self._attach(interaction, message, files)
        interaction.followups.append(message)
        return 200, message

    @_route("PATCH", r"/webhooks/(\d+)/([^/]+)/messages/(\d+)", bot_auth=False)
    async def _edit_followup(self, body: Any, application_id: str, token: str, message_id: str) -> Reply:
        interaction = self._interaction_by_token(token)
        message = next((m for m in interaction.followups if m["id"] == message_id), None) if interaction else None
        if message is None:
            return 404, UNKNOWN_MESSAGE
        error = _edit_content(message, body)
        if error is not None:
            return error
        return 200, message
