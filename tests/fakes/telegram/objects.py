"""The Bot API objects the fake Telegram server keeps, and how they look on the wire."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

JSON = dict[str, Any]
ChatKind = Literal["private", "group", "supergroup", "channel"]

MAX_TEXT = 4096
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{3,32}\b")
_COMMAND = re.compile(r"(?<![\w/])/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?\b")


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


def text_fields(text: str, entities: list[JSON] | None = None) -> JSON:
    """A message's ``text`` and its ``entities``: those given, else those Telegram detects."""
    found = auto_entities(text) if entities is None else entities
    return {"text": text, "entities": found} if found else {"text": text}


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


@dataclass(frozen=True, slots=True)
class FilePart:
    """A file uploaded in a multipart request (``sendDocument``'s ``document``)."""

    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Upload:
    """A file the bot sent into a chat."""

    chat_id: int
    message_id: int
    filename: str
    data: bytes
    caption: str | None
    reply_to: int | None
    thread_id: int | None

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")


@dataclass(slots=True)
class ApiError(Exception):
    """A Bot API error answer: its HTTP status, description and ``parameters``."""

    status: int
    description: str
    parameters: JSON | None = None


def bad_request(what: str) -> ApiError:
    return ApiError(400, f"Bad Request: {what}")


def int_param(value: object) -> int | None:
    """A parameter that should be an integer, or None when it is missing or is not one."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except ValueError:
        return None


def unnested(message: JSON) -> JSON:
    """A message as quoted in ``reply_to_message``: Telegram does not nest replies further."""
    return {k: v for k, v in message.items() if k != "reply_to_message"}


def commands_key(params: JSON) -> str:
    """Where a ``setMyCommands``/``getMyCommands`` call's menu is kept: its scope and language."""
    scope = params.get("scope") or {"type": "default"}
    language = params.get("language_code") or ""
    return json.dumps(scope, sort_keys=True) + (f"|{language}" if language else "")


def scope_key(scope: JSON) -> str:
    """The key of `FakeTelegramServer.commands` for a scope like ``{"type": "default"}``."""
    return commands_key({"scope": scope})
