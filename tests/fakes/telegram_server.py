"""A fake Telegram Bot API server: the real python-telegram-bot talks to it over HTTP.

It serves ``/bot{token}/{method}`` on 127.0.0.1 (a free port), keeps chats and their
messages as Telegram would, and answers with the same JSON, status codes and error
descriptions as the real API for the methods the adapter uses. Anything else gets
the real API's ``404 Not Found``.

Tests act as users (`user_sends`, `user_sends_media`, `user_edits`, `channel_post`),
script failures (`fail_next`, `block`), set chat members' statuses, and read back
every call (`calls`) and what each chat shows (`bot_texts`). Every injected update is
delivered whatever ``allowed_updates`` asked for, so the adapter's own filtering is
what gets tested. With a webhook set, updates are POSTed to it like Telegram does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Literal

import aiohttp
from aiohttp import web

logger = logging.getLogger(__name__)

JSON = dict[str, Any]
ChatKind = Literal["private", "group", "supergroup", "channel"]

MAX_TEXT = 4096
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)
# Fields that stay strings even when they look like JSON ("123" typed by a user is text).
_STRING_FIELDS = frozenset({"text", "secret_token", "url", "language_code", "action", "parse_mode", "caption"})
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{3,32}\b")
_COMMAND = re.compile(r"(?<![\w/])/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?\b")
_ADMIN_RIGHTS = (
    "can_be_edited",
    "is_anonymous",
    "can_manage_chat",
    "can_delete_messages",
    "can_manage_video_chats",
    "can_restrict_members",
    "can_promote_members",
    "can_change_info",
    "can_invite_users",
    "can_post_stories",
    "can_edit_stories",
    "can_delete_stories",
)


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def auto_entities(text: str) -> list[JSON]:
    """The ``mention`` and ``bot_command`` entities Telegram's servers would attach
    (offsets and lengths in UTF-16 code units)."""
    found: list[JSON] = []
    for kind, pattern in (("mention", _MENTION), ("bot_command", _COMMAND)):
        for match in pattern.finditer(text):
            found.append(
                {"type": kind, "offset": utf16_len(text[: match.start()]), "length": utf16_len(match.group(0))}
            )
    return sorted(found, key=lambda e: int(e["offset"]))


@dataclass(frozen=True, slots=True)
class User:
    id: int
    first_name: str
    username: str | None = None
    last_name: str | None = None
    is_bot: bool = False

    def to_json(self) -> JSON:
        out: JSON = {"id": self.id, "is_bot": self.is_bot, "first_name": self.first_name}
        if self.last_name:
            out["last_name"] = self.last_name
        if self.username:
            out["username"] = self.username
        return out


@dataclass(frozen=True, slots=True)
class Chat:
    id: int
    type: ChatKind
    title: str | None = None
    first_name: str | None = None
    username: str | None = None

    @classmethod
    def private(cls, user: User) -> Chat:
        """A user's private chat with the bot (its id is the user's id)."""
        return cls(user.id, "private", first_name=user.first_name, username=user.username)

    @classmethod
    def group(cls, chat_id: int, title: str = "Test group") -> Chat:
        return cls(chat_id, "group", title=title)

    @classmethod
    def supergroup(cls, chat_id: int, title: str = "Test supergroup") -> Chat:
        return cls(chat_id, "supergroup", title=title)

    @classmethod
    def channel(cls, chat_id: int, title: str = "Test channel") -> Chat:
        return cls(chat_id, "channel", title=title)

    def to_json(self) -> JSON:
        out: JSON = {"id": self.id, "type": self.type}
        for name in ("title", "first_name", "username"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(slots=True)
class Call:
    """One Bot API request as the server received it."""

    method: str
    params: JSON
    at: float  # time.perf_counter() when it arrived
    status: int = 0  # HTTP status of the answer (0 while a long poll is open)
    done_at: float = 0.0


@dataclass(slots=True)
class StoredMessage:
    """A message in a chat: the user's or the bot's, with its current text."""

    chat_id: int
    message_id: int
    from_bot: bool
    text: str | None
    json: JSON
    edits: list[str] = field(default_factory=list)  # every later text, oldest first
    reply_to: int | None = None
    thread_id: int | None = None
    parse_mode: str | None = None
    update_id: int | None = None  # of the update that delivered a user's message


@dataclass(slots=True)
class _Failure:
    method: str
    status: int
    description: str
    retry_after: float | None
    chat_id: int | None
    remaining: int


@dataclass(slots=True)
class _ApiError(Exception):
    status: int
    description: str
    parameters: JSON | None = None


def _bad_request(what: str) -> _ApiError:
    return _ApiError(400, f"Bad Request: {what}")


class FakeTelegramServer:
    """The Bot API of one bot, in process. Use as ``async with FakeTelegramServer() as server``."""

    def __init__(
        self,
        *,
        token: str = "123456789:TEST-token_for-the-fake-server",
        bot_id: int = 7_000_001,
        bot_username: str = "LlmTestBot",
        bot_name: str = "LLM Test Bot",
    ) -> None:
        self.token = token
        self.bot = User(bot_id, bot_name, username=bot_username, is_bot=True)
        self.calls: list[Call] = []
        self.unknown_methods: list[str] = []
        self.commands: dict[str, list[JSON]] = {}  # scope (as JSON text) -> commands
        self.webhook: JSON | None = None
        self.webhook_deliveries: list[tuple[int, int]] = []  # (update_id, HTTP status)
        self.update_available_at: dict[int, float] = {}  # update_id -> perf_counter()
        self.port = 0
        self.on_bot_text: Callable[[StoredMessage], None] | None = None
        """Called whenever a bot message gets its text (sent or edited), as it happens."""
        self._chats: dict[int, Chat] = {}
        self._messages: dict[int, dict[int, StoredMessage]] = {}
        self._next_message_id: dict[int, count[int]] = {}
        self._updates: list[JSON] = []
        self._update_ids = count(100_001)
        self._file_ids = count(1)
        self._confirmed = 0
        self._new_update = asyncio.Event()
        self._changed = asyncio.Event()
        self._failures: list[_Failure] = []
        self._blocked: dict[int, str] = {}
        self._migrated: dict[int, int] = {}
        self._delays: list[tuple[str, float]] = []
        self._members: dict[tuple[int, int], str] = {}
        self._users: dict[int, User] = {bot_id: self.bot}
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        app = web.Application(client_max_size=2**20)
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._closed = True
        self._pulse(self._new_update)  # release open long polls
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeTelegramServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def api_base(self) -> str:
        """What ``TELEGRAM_API_BASE`` should be set to."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ acting as users

    def user_sends(
        self,
        chat: Chat,
        user: User,
        text: str,
        *,
        reply_to: int | None = None,
        entities: list[JSON] | None = None,
    ) -> StoredMessage:
        """A user writes `text` in `chat`. Entities (mentions, commands) are detected as
        Telegram does unless given. `reply_to` is the id of a message in the chat."""
        payload: JSON = {"text": text}
        found = auto_entities(text) if entities is None else entities
        if found:
            payload["entities"] = found
        return self._user_message(chat, user, payload, reply_to)

    def user_sends_media(
        self, chat: Chat, user: User, kind: Literal["photo", "sticker", "voice", "document"], caption: str | None = None
    ) -> StoredMessage:
        file = {"file_id": f"file-{kind}-{next(self._file_ids)}", "file_unique_id": f"u{kind}"}
        media: dict[str, Any] = {
            "photo": [{**file, "width": 90, "height": 90, "file_size": 1234}],
            "sticker": {
                **file,
                "type": "regular",
                "width": 512,
                "height": 512,
                "is_animated": False,
                "is_video": False,
            },
            "voice": {**file, "duration": 2, "mime_type": "audio/ogg"},
            "document": {**file, "file_name": "notes.pdf", "mime_type": "application/pdf"},
        }
        payload: JSON = {kind: media[kind]}
        if caption is not None:
            payload["caption"] = caption
        return self._user_message(chat, user, payload, None)

    def user_edits(self, message: StoredMessage, user: User, new_text: str) -> int:
        """The user edits an earlier message: an ``edited_message`` update."""
        chat = self._chats[message.chat_id]
        message.text = new_text
        message.edits.append(new_text)
        body = dict(message.json, text=new_text, edit_date=int(time.time()))
        found = auto_entities(new_text)
        body.pop("entities", None)
        if found:
            body["entities"] = found
        assert body["from"]["id"] == user.id, "users can only edit their own messages"
        body["chat"] = chat.to_json()
        return self.inject("edited_message", body)

    def channel_post(self, chat: Chat, text: str) -> int:
        """A post in a channel the bot administers: a ``channel_post`` update."""
        self._chats[chat.id] = chat
        body: JSON = {
            "message_id": next(self._ids_for(chat.id)),
            "date": int(time.time()),
            "chat": chat.to_json(),
            "sender_chat": chat.to_json(),
            "text": text,
        }
        found = auto_entities(text)
        if found:
            body["entities"] = found
        return self.inject("channel_post", body)

    def inject(self, kind: str, payload: JSON) -> int:
        """Make any update available (``{"update_id": ..., kind: payload}``); returns its id."""
        update_id = next(self._update_ids)
        update = {"update_id": update_id, kind: payload}
        self._updates.append(update)
        self.update_available_at[update_id] = time.perf_counter()
        self._pulse(self._new_update)
        if self.webhook is not None:
            self._deliver(update)
        return update_id

    def _user_message(self, chat: Chat, user: User, payload: JSON, reply_to: int | None) -> StoredMessage:
        self._chats[chat.id] = chat
        self._users[user.id] = user
        body: JSON = {
            "message_id": next(self._ids_for(chat.id)),
            "date": int(time.time()),
            "chat": chat.to_json(),
            "from": user.to_json(),
            **payload,
        }
        if reply_to is not None:
            body["reply_to_message"] = _unnested(self._message(chat.id, reply_to).json)
        stored = self._store(chat.id, body, from_bot=False, reply_to=reply_to)
        stored.update_id = self.inject("message", body)
        return stored

    # ------------------------------------------------------------------ scripting

    def fail_next(
        self,
        method: str,
        *,
        status: int = 429,
        retry_after: float | None = None,
        description: str | None = None,
        chat_id: int | None = None,
        times: int = 1,
    ) -> None:
        """The next `times` calls of `method` (to `chat_id`, when given) fail like the real
        API: 429 with ``retry_after`` (default 1 s), 5xx, 403 Forbidden, 400 Bad Request."""
        if status == 429 and retry_after is None:
            retry_after = 1
        default = {
            429: f"Too Many Requests: retry after {retry_after:g}" if retry_after is not None else "",
            400: "Bad Request: chat not found",
            403: "Forbidden: bot was blocked by the user",
            500: "Internal Server Error",
            502: "Bad Gateway",
        }.get(status, "Internal Server Error")
        self._failures.append(_Failure(method, status, description or default, retry_after, chat_id, times))

    def delay_next(self, method: str, seconds: float, *, times: int = 1) -> None:
        """The next `times` calls of `method` are carried out, but answered `seconds` late
        (as when Telegram is slow: a client that times out may retry a call that worked)."""
        self._delays.extend([(method, seconds)] * times)

    def block(self, chat_id: int, description: str = "Forbidden: bot was blocked by the user") -> None:
        """From now on every message, edit and chat action in `chat_id` fails with 403."""
        self._blocked[chat_id] = description

    def upgrade(self, group: Chat, supergroup: Chat, by: User) -> None:
        """`by` turns `group` into `supergroup`, as Telegram does: a service message in
        each (``migrate_to_chat_id`` in the old, ``migrate_from_chat_id`` in the new), and
        from then on every call for the old id fails with 400 and ``migrate_to_chat_id``."""
        assert group.type == "group" and supergroup.type == "supergroup"
        self._migrated[group.id] = supergroup.id
        self._user_message(group, by, {"migrate_to_chat_id": supergroup.id}, None)
        self._user_message(supergroup, by, {"migrate_from_chat_id": group.id}, None)

    def set_member_status(self, chat_id: int, user_id: int, status: str) -> None:
        """``creator``, ``administrator``, ``member``, ``left`` or ``kicked``."""
        assert status in ("creator", "administrator", "member", "left", "kicked")
        self._members[(chat_id, user_id)] = status

    # ------------------------------------------------------------------ reading back

    def calls_to(self, *methods: str) -> list[Call]:
        return [c for c in self.calls if c.method in methods]

    def messages(self, chat_id: int) -> list[StoredMessage]:
        return list(self._messages.get(chat_id, {}).values())

    def bot_messages(self, chat_id: int) -> list[StoredMessage]:
        return [m for m in self.messages(chat_id) if m.from_bot]

    def bot_texts(self, chat_id: int) -> list[str]:
        """What the bot's messages in the chat say now, oldest first."""
        return [m.text or "" for m in self.bot_messages(chat_id)]

    @property
    def pending_updates(self) -> int:
        """Updates not yet confirmed by a later ``getUpdates`` offset."""
        return sum(1 for u in self._updates if u["update_id"] >= self._confirmed)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
        """Wait until `predicate()` holds, re-checking after every API call."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                recent = ", ".join(f"{c.method}:{c.status}" for c in self.calls[-12:])
                raise AssertionError(f"timed out waiting for {what or predicate}; last calls: {recent}")
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), min(remaining, 0.25))
            except TimeoutError:
                pass

    # ------------------------------------------------------------------ HTTP

    def _pulse(self, event: asyncio.Event) -> None:
        """Wake everyone waiting on `event`, and give later waiters a fresh one."""
        event.set()
        if event is self._new_update:
            self._new_update = asyncio.Event()
        else:
            self._changed = asyncio.Event()

    async def _dispatch(self, request: web.Request) -> web.Response:
        path = request.path
        if not path.startswith("/bot") or path.count("/") != 2:
            return self._error(404, "Not Found")
        token, _, method = path[len("/bot") :].partition("/")
        params = await self._read_params(request)
        call = Call(method, params, time.perf_counter())
        self.calls.append(call)
        try:
            if token != self.token:
                raise _ApiError(401, "Unauthorized")
            self._take_failure(method, params)
            handler = getattr(self, f"_api_{method.lower()}", None)
            if handler is None:
                self.unknown_methods.append(method)
                logger.warning("fake Telegram: unknown method %s", method)
                raise _ApiError(404, "Not Found")
            result = await handler(params)
            delay = next((d for m, d in self._delays if m == method), None)
            if delay is not None:
                self._delays.remove((method, delay))
                self._pulse(self._changed)
                await asyncio.sleep(delay)
            response = web.json_response({"ok": True, "result": result})
        except _ApiError as exc:
            response = self._error(exc.status, exc.description, exc.parameters)
        call.status = response.status
        call.done_at = time.perf_counter()
        self._pulse(self._changed)
        return response

    @staticmethod
    def _error(status: int, description: str, parameters: JSON | None = None) -> web.Response:
        body: JSON = {"ok": False, "error_code": status, "description": description}
        if parameters:
            body["parameters"] = parameters
        return web.json_response(body, status=status)

    @staticmethod
    async def _read_params(request: web.Request) -> JSON:
        """JSON bodies, or form fields (what PTB sends) whose values are JSON-encoded."""
        raw: dict[str, Any]
        if request.content_type == "application/json":
            body = await request.json()
            return dict(body) if isinstance(body, dict) else {}
        raw = dict(request.query)
        if request.can_read_body:
            form = await request.post()
            raw.update({k: v for k, v in form.items() if isinstance(v, str)})
        params: JSON = {}
        for key, value in raw.items():
            if key in _STRING_FIELDS:
                params[key] = value
                continue
            try:
                params[key] = json.loads(value)
            except ValueError:
                params[key] = value
        return params

    def _take_failure(self, method: str, params: JSON) -> None:
        for failure in self._failures:
            if failure.method != method or failure.remaining <= 0:
                continue
            if failure.chat_id is not None and _int(params.get("chat_id")) != failure.chat_id:
                continue
            failure.remaining -= 1
            self._failures = [f for f in self._failures if f.remaining > 0]
            parameters = {"retry_after": failure.retry_after} if failure.status == 429 else None
            raise _ApiError(failure.status, failure.description, parameters)

    # ------------------------------------------------------------------ chat state

    def _ids_for(self, chat_id: int) -> count[int]:
        return self._next_message_id.setdefault(chat_id, count(1))

    def _store(self, chat_id: int, body: JSON, *, from_bot: bool, reply_to: int | None) -> StoredMessage:
        stored = StoredMessage(
            chat_id,
            int(body["message_id"]),
            from_bot,
            body.get("text"),
            body,
            reply_to=reply_to,
            thread_id=body.get("message_thread_id"),
        )
        self._messages.setdefault(chat_id, {})[stored.message_id] = stored
        return stored

    def _message(self, chat_id: int, message_id: int) -> StoredMessage:
        try:
            return self._messages[chat_id][message_id]
        except KeyError:
            raise AssertionError(f"no message {message_id} in chat {chat_id}") from None

    def _chat(self, params: JSON) -> Chat:
        chat_id = _int(params.get("chat_id"))
        chat = self._chats.get(chat_id) if chat_id is not None else None
        if chat is None:
            raise _bad_request("chat not found")
        if chat.id in self._blocked:
            raise _ApiError(403, self._blocked[chat.id])
        if chat.id in self._migrated:
            raise _ApiError(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                {"migrate_to_chat_id": self._migrated[chat.id]},
            )
        return chat

    @staticmethod
    def _check_text(params: JSON, *, too_long: str) -> str:
        text = params.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _bad_request("message text is empty")
        if len(text) > MAX_TEXT:
            raise _bad_request(too_long)
        return text

    # ------------------------------------------------------------------ API methods

    async def _api_getme(self, params: JSON) -> JSON:
        return {
            **self.bot.to_json(),
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    async def _api_getupdates(self, params: JSON) -> list[JSON]:
        if self.webhook is not None:
            raise _ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            )
        offset = _int(params.get("offset")) or 0
        limit = min(100, _int(params.get("limit")) or 100)
        timeout = float(params.get("timeout") or 0)
        if offset:
            self._confirmed = max(self._confirmed, offset)
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        deadline = time.monotonic() + timeout
        while True:
            ready = [u for u in self._updates if u["update_id"] >= offset][:limit]
            remaining = deadline - time.monotonic()
            if ready or remaining <= 0 or self._closed:
                return ready
            waiter = self._new_update
            try:
                await asyncio.wait_for(waiter.wait(), remaining)
            except TimeoutError:
                pass

    async def _api_sendmessage(self, params: JSON) -> JSON:
        chat = self._chat(params)
        text = self._check_text(params, too_long="message is too long")
        reply = params.get("reply_parameters")
        reply_to: int | None = None
        if isinstance(reply, dict):
            reply_to = _int(reply.get("message_id"))
            allow_missing = bool(reply.get("allow_sending_without_reply"))
        else:
            reply_to = _int(params.get("reply_to_message_id"))
            allow_missing = bool(params.get("allow_sending_without_reply"))
        replied = self._messages.get(chat.id, {}).get(reply_to) if reply_to is not None else None
        if reply_to is not None and replied is None:
            if not allow_missing:
                raise _bad_request("message to be replied not found")
            reply_to = None
        body: JSON = {
            "message_id": next(self._ids_for(chat.id)),
            "date": int(time.time()),
            "chat": chat.to_json(),
            "from": self.bot.to_json(),
            "text": text,
        }
        thread_id = _int(params.get("message_thread_id"))
        if thread_id is not None:
            body["message_thread_id"] = thread_id
        if replied is not None:
            body["reply_to_message"] = _unnested(replied.json)
        stored = self._store(chat.id, body, from_bot=True, reply_to=reply_to)
        stored.parse_mode = params.get("parse_mode")
        if self.on_bot_text is not None:
            self.on_bot_text(stored)
        return body

    async def _api_editmessagetext(self, params: JSON) -> JSON:
        chat = self._chat(params)
        message_id = _int(params.get("message_id"))
        stored = self._messages.get(chat.id, {}).get(message_id) if message_id is not None else None
        if stored is None or not stored.from_bot:
            raise _bad_request("message to edit not found")
        text = self._check_text(params, too_long="MESSAGE_TOO_LONG")
        if text == stored.text:
            raise _ApiError(400, NOT_MODIFIED)
        stored.text = text
        stored.edits.append(text)
        stored.json = dict(stored.json, text=text, edit_date=int(time.time()))
        if self.on_bot_text is not None:
            self.on_bot_text(stored)
        return stored.json

    async def _api_sendchataction(self, params: JSON) -> bool:
        self._chat(params)
        if params.get("action") not in (
            "typing",
            "upload_photo",
            "record_video",
            "upload_video",
            "record_voice",
            "upload_voice",
            "upload_document",
            "choose_sticker",
            "find_location",
            "record_video_note",
            "upload_video_note",
        ):
            raise _bad_request("wrong parameter action in request")
        return True

    async def _api_getchatmember(self, params: JSON) -> JSON:
        chat = self._chat(params)
        user_id = _int(params.get("user_id"))
        user = self._users.get(user_id) if user_id is not None else None
        if user is None:
            raise _bad_request("PARTICIPANT_ID_INVALID")
        status = self._members.get((chat.id, user.id), "member")
        member: JSON = {"status": status, "user": user.to_json()}
        if status == "creator":
            member["is_anonymous"] = False
        elif status == "administrator":
            member.update({right: right != "is_anonymous" for right in _ADMIN_RIGHTS})
        elif status == "kicked":
            member["until_date"] = 0
        return member

    async def _api_setmycommands(self, params: JSON) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise _bad_request("commands must be a list of at most 100 BotCommand")
        for command in commands:
            name = command.get("command", "") if isinstance(command, dict) else ""
            description = command.get("description", "") if isinstance(command, dict) else ""
            if not re.fullmatch(r"[a-z0-9_]{1,32}", str(name)):
                raise _bad_request("BOT_COMMAND_INVALID")
            if not 1 <= len(str(description)) <= 256:
                raise _bad_request("BOT_COMMAND_DESCRIPTION_INVALID")
        self.commands[_scope_key(params)] = commands
        return True

    async def _api_getmycommands(self, params: JSON) -> list[JSON]:
        return self.commands.get(_scope_key(params), [])

    async def _api_deletemycommands(self, params: JSON) -> bool:
        self.commands.pop(_scope_key(params), None)
        return True

    async def _api_deletewebhook(self, params: JSON) -> bool:
        self.webhook = None
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    async def _api_setwebhook(self, params: JSON) -> bool:
        url = params.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise _bad_request("bad webhook: An HTTPS URL must be provided for webhook")
        self.webhook = params
        if params.get("drop_pending_updates"):
            self._updates.clear()
        for update in self._updates:  # what was waiting goes to the webhook now
            self._deliver(update)
        self._updates.clear()
        return True

    async def _api_getwebhookinfo(self, params: JSON) -> JSON:
        return {
            "url": (self.webhook or {}).get("url", ""),
            "has_custom_certificate": False,
            "pending_update_count": len(self._updates),
        }

    async def _api_close(self, params: JSON) -> bool:
        return True

    async def _api_logout(self, params: JSON) -> bool:
        return True

    # ------------------------------------------------------------------ webhook delivery

    def _deliver(self, update: JSON) -> None:
        task = asyncio.create_task(self._post_update(update), name=f"fake-telegram:deliver:{update['update_id']}")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _post_update(self, update: JSON) -> None:
        assert self.webhook is not None
        if self._client is None:
            self._client = aiohttp.ClientSession()
        headers = {}
        secret = self.webhook.get("secret_token")
        if secret:
            headers["X-Telegram-Bot-Api-Secret-Token"] = str(secret)
        for _ in range(20):  # the webhook server may still be starting
            try:
                async with self._client.post(str(self.webhook["url"]), json=update, headers=headers) as response:
                    self.webhook_deliveries.append((int(update["update_id"]), response.status))
                    self._pulse(self._changed)
                    return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        self.webhook_deliveries.append((int(update["update_id"]), 0))


def _int(value: object) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except ValueError:
        return None


def _unnested(message: JSON) -> JSON:
    """A message as quoted in ``reply_to_message``: Telegram does not nest replies further."""
    return {k: v for k, v in message.items() if k != "reply_to_message"}


def _scope_key(params: JSON) -> str:
    scope = params.get("scope") or {"type": "default"}
    language = params.get("language_code") or ""
    return json.dumps(scope, sort_keys=True) + (f"|{language}" if language else "")


def scope_key(scope: JSON) -> str:
    """The key of `FakeTelegramServer.commands` for a scope like ``{"type": "default"}``."""
    return _scope_key({"scope": scope})
