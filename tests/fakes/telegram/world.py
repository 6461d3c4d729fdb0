"""What the fake Telegram knows: chats, users, messages and pending updates, and how
tests act on it (as users, by scripting failures) and read it back."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import Any, Literal

from tests.fakes.telegram.objects import (
    JSON,
    ApiError,
    Call,
    Chat,
    StoredMessage,
    Upload,
    User,
    bad_request,
    int_param,
    text_fields,
    unnested,
)


class Pulse:
    """Wakes everyone waiting at once, then waits again for the next time."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Until the next `fire`, or `timeout` seconds."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass


@dataclass(slots=True)
class _Failure:
    method: str
    status: int
    description: str
    retry_after: float | None
    chat_id: int | None
    remaining: int


class TelegramWorld(ABC):
    """The state behind one bot's Bot API. `FakeTelegramServer` serves it over HTTP."""

    def __init__(self, *, token: str, bot_id: int, bot_username: str, bot_name: str) -> None:
        self.token = token
        self.bot = User(bot_id, bot_name, username=bot_username, is_bot=True)
        self.calls: list[Call] = []
        self.commands: dict[str, list[JSON]] = {}  # scope (as JSON text) -> commands
        self.uploads: list[Upload] = []  # files the bot sent (sendDocument), oldest first
        self.webhook: JSON | None = None
        self.update_available_at: dict[int, float] = {}  # update_id -> perf_counter()
        self.on_bot_text: Callable[[StoredMessage], None] | None = None
        """Called whenever a bot message gets its text (sent or edited), as it happens."""
        self.updates: list[JSON] = []  # not yet confirmed by a getUpdates offset
        self.confirmed = 0  # the highest getUpdates offset so far
        self.polls = 0  # getUpdates calls so far: a newer one ends an older one still waiting
        self.new_update = Pulse()
        self.changed = Pulse()  # after every API call and webhook delivery
        self.closed = False  # long polls return at once
        self.users: dict[int, User] = {bot_id: self.bot}
        self.members: dict[tuple[int, int], str] = {}  # (chat, user) -> status
        self._chats: dict[int, Chat] = {}
        self._messages: dict[int, dict[int, StoredMessage]] = {}
        self._next_message_id: dict[int, count[int]] = {}
        self._update_ids = count(100_001)
        self._file_ids = count(1)
        self._failures: list[_Failure] = []
        self._delays: list[tuple[str, float]] = []
        self._blocked: dict[int, str] = {}
        self._migrated: dict[int, int] = {}

    @abstractmethod
    def deliver_to_webhook(self, update: JSON) -> None:
        """POST `update` to the webhook that is set."""

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
        return self._user_message(chat, user, text_fields(text, entities), reply_to)

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
        body = {k: v for k, v in message.json.items() if k != "entities"}
        body.update(text_fields(new_text), edit_date=int(time.time()))
        assert body["from"]["id"] == user.id, "users can only edit their own messages"
        body["chat"] = chat.to_json()
        return self.inject("edited_message", body)

    def channel_post(self, chat: Chat, text: str) -> int:
        """A post in a channel the bot administers: a ``channel_post`` update."""
        return self.inject("channel_post", self.new_message(chat, {"sender_chat": chat.to_json(), **text_fields(text)}))

    def inject(self, kind: str, payload: JSON) -> int:
        """Make any update available (``{"update_id": ..., kind: payload}``); returns its id."""
        update_id = next(self._update_ids)
        update = {"update_id": update_id, kind: payload}
        self.updates.append(update)
        self.update_available_at[update_id] = time.perf_counter()
        self.new_update.fire()
        if self.webhook is not None:
            self.deliver_to_webhook(update)
        return update_id

    def _user_message(self, chat: Chat, user: User, payload: JSON, reply_to: int | None) -> StoredMessage:
        self.users[user.id] = user
        body = self.new_message(chat, {"from": user.to_json(), **payload})
        if reply_to is not None:
            body["reply_to_message"] = unnested(self._message(chat.id, reply_to).json)
        stored = self.store(chat.id, body, from_bot=False, reply_to=reply_to)
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
        self.members[(chat_id, user_id)] = status

    def take_failure(self, method: str, params: JSON) -> None:
        """Raise the scripted failure due for this call, if any."""
        for failure in self._failures:
            if failure.method != method or failure.remaining <= 0:
                continue
            if failure.chat_id is not None and int_param(params.get("chat_id")) != failure.chat_id:
                continue
            failure.remaining -= 1
            self._failures = [f for f in self._failures if f.remaining > 0]
            parameters = {"retry_after": failure.retry_after} if failure.status == 429 else None
            raise ApiError(failure.status, failure.description, parameters)

    def take_delay(self, method: str) -> float | None:
        """The scripted delay due for a call of `method`, if any."""
        delay = next((d for m, d in self._delays if m == method), None)
        if delay is not None:
            self._delays.remove((method, delay))
        return delay

    # ------------------------------------------------------------------ reading back

    def calls_to(self, *methods: str) -> list[Call]:
        return [c for c in self.calls if c.method in methods]

    def messages(self, chat_id: int) -> list[StoredMessage]:
        return list(self._messages.get(chat_id, {}).values())

    def bot_messages(self, chat_id: int) -> list[StoredMessage]:
        return [m for m in self.messages(chat_id) if m.from_bot]

    def bot_texts(self, chat_id: int) -> list[str]:
        """What the bot's text messages in the chat say now, oldest first (files it
        sent are in `uploads`)."""
        return [m.text or "" for m in self.bot_messages(chat_id) if "document" not in m.json]

    @property
    def pending_updates(self) -> int:
        """Updates not yet confirmed by a later ``getUpdates`` offset."""
        return sum(1 for u in self.updates if u["update_id"] >= self.confirmed)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
        """Wait until `predicate()` holds, re-checking after every API call."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                recent = ", ".join(f"{c.method}:{c.status}" for c in self.calls[-12:])
                raise AssertionError(f"timed out waiting for {what or predicate}; last calls: {recent}")
            await self.changed.wait(min(remaining, 0.25))

    # ------------------------------------------------------------------ chat state

    def new_message(self, chat: Chat, fields: JSON) -> JSON:
        """A new message in `chat` (which Telegram knows from now on), with `fields`."""
        self._chats[chat.id] = chat
        message_id = next(self._next_message_id.setdefault(chat.id, count(1)))
        return {"message_id": message_id, "date": int(time.time()), "chat": chat.to_json(), **fields}

    def store(self, chat_id: int, body: JSON, *, from_bot: bool, reply_to: int | None) -> StoredMessage:
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

    def find_message(self, chat_id: int, message_id: int | None) -> StoredMessage | None:
        return self._messages.get(chat_id, {}).get(message_id) if message_id is not None else None

    def _message(self, chat_id: int, message_id: int) -> StoredMessage:
        found = self.find_message(chat_id, message_id)
        if found is None:
            raise AssertionError(f"no message {message_id} in chat {chat_id}")
        return found

    def chat_for(self, params: JSON) -> Chat:
        """The chat a call names in ``chat_id``, or the error Telegram gives for it."""
        chat_id = int_param(params.get("chat_id"))
        chat = self._chats.get(chat_id) if chat_id is not None else None
        if chat is None:
            raise bad_request("chat not found")
        if chat.id in self._blocked:
            raise ApiError(403, self._blocked[chat.id])
        if chat.id in self._migrated:
            raise ApiError(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                {"migrate_to_chat_id": self._migrated[chat.id]},
            )
        return chat
