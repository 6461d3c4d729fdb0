"""The Bot API methods the fake Telegram server answers, as the real API does.

Each method gets the call's parameters and returns its ``result``, or raises the
`ApiError` Telegram would answer with.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tests.fakes.telegram.objects import (
    JSON,
    MAX_TEXT,
    NOT_MODIFIED,
    ApiError,
    FilePart,
    Upload,
    bad_request,
    commands_key,
    int_param,
    unnested,
)
from tests.fakes.telegram.world import TelegramWorld

TERMINATED_BY_OTHER_POLL = (
    "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"
)
_CHAT_ACTIONS = frozenset(
    {
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
    }
)
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


def _check_text(params: JSON, *, too_long: str) -> str:
    text = params.get("text")
    if not isinstance(text, str) or not text.strip():
        raise bad_request("message text is empty")
    if len(text) > MAX_TEXT:
        raise bad_request(too_long)
    return text


class BotApiMethods:
    """The methods of the Bot API on a `TelegramWorld`, by name."""

    def __init__(self, world: TelegramWorld) -> None:
        self._world = world

    def get(self, method: str) -> Callable[[JSON], Awaitable[Any]] | None:
        """The handler of `method` (Bot API method names are case-insensitive), or None."""
        handler: Callable[[JSON], Awaitable[Any]] | None = getattr(self, f"_api_{method.lower()}", None)
        return handler

    async def _api_getme(self, params: JSON) -> JSON:
        return {
            **self._world.bot.to_json(),
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    async def _api_getupdates(self, params: JSON) -> list[JSON]:
        if self._world.webhook is not None:
            raise ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            )
        offset = int_param(params.get("offset")) or 0
        limit = min(100, int_param(params.get("limit")) or 100)
        timeout = float(params.get("timeout") or 0)
        if offset:
            self._world.confirmed = max(self._world.confirmed, offset)
            self._world.updates = [u for u in self._world.updates if u["update_id"] >= offset]
        # As Telegram does, a new getUpdates ends one still waiting with 409: two
        # processes polling one token keep ending each other's polls.
        self._world.polls += 1
        poll = self._world.polls
        self._world.new_update.fire()
        deadline = time.monotonic() + timeout
        while True:
            if self._world.polls != poll:
                raise ApiError(409, TERMINATED_BY_OTHER_POLL)
            ready = [u for u in self._world.updates if u["update_id"] >= offset][:limit]
            remaining = deadline - time.monotonic()
            if ready or remaining <= 0 or self._world.closed:
                return ready
            await self._world.new_update.wait(remaining)

    async def _api_sendmessage(self, params: JSON) -> JSON:
        chat = self._world.chat_for(params)
        text = _check_text(params, too_long="message is too long")
        reply = params.get("reply_parameters")
        reply_to: int | None = None
        if isinstance(reply, dict):
            reply_to = int_param(reply.get("message_id"))
            allow_missing = bool(reply.get("allow_sending_without_reply"))
        else:
            reply_to = int_param(params.get("reply_to_message_id"))
            allow_missing = bool(params.get("allow_sending_without_reply"))
        replied = self._world.find_message(chat.id, reply_to)
        if reply_to is not None and replied is None:
            if not allow_missing:
                raise bad_request("message to be replied not found")
            reply_to = None
        body = self._world.new_message(chat, {"from": self._world.bot.to_json(), "text": text})
        thread_id = int_param(params.get("message_thread_id"))
        if thread_id is not None:
            body["message_thread_id"] = thread_id
        if replied is not None:
            body["reply_to_message"] = unnested(replied.json)
        stored = self._world.store(chat.id, body, from_bot=True, reply_to=reply_to)
        stored.parse_mode = params.get("parse_mode")
        if self._world.on_bot_text is not None:
            self._world.on_bot_text(stored)
        return body

    async def _api_senddocument(self, params: JSON) -> JSON:
        chat = self._world.chat_for(params)
        document = params.get("document")
        if not isinstance(document, FilePart):  # a file_id or URL: not needed by the bot
            raise bad_request("wrong file identifier/HTTP URL specified")
        if not document.data:
            raise bad_request("file must be non-empty")
        caption = params.get("caption")
        if isinstance(caption, str) and len(caption) > 1024:
            raise bad_request("message caption is too long")
        reply = params.get("reply_parameters")
        reply_to = int_param(reply.get("message_id")) if isinstance(reply, dict) else None
        if reply_to is not None and self._world.find_message(chat.id, reply_to) is None:
            reply_to = None  # the bot always allows sending without the reply
        body = self._world.new_message(
            chat,
            {
                "from": self._world.bot.to_json(),
                "document": {
                    "file_id": f"doc-{len(self._world.uploads) + 1}",
                    "file_unique_id": f"udoc{len(self._world.uploads) + 1}",
                    "file_name": document.filename,
                    "mime_type": document.content_type,
                    "file_size": len(document.data),
                },
            },
        )
        if isinstance(caption, str):
            body["caption"] = caption
        thread_id = int_param(params.get("message_thread_id"))
        if thread_id is not None:
            body["message_thread_id"] = thread_id
        stored = self._world.store(chat.id, body, from_bot=True, reply_to=reply_to)
        self._world.uploads.append(
            Upload(
                chat.id,
                stored.message_id,
                document.filename,
                document.data,
                caption if isinstance(caption, str) else None,
                reply_to,
                thread_id,
            )
        )
        return body

    async def _api_editmessagetext(self, params: JSON) -> JSON:
        chat = self._world.chat_for(params)
        message_id = int_param(params.get("message_id"))
        stored = self._world.find_message(chat.id, message_id)
        if stored is None or not stored.from_bot:
            raise bad_request("message to edit not found")
        text = _check_text(params, too_long="MESSAGE_TOO_LONG")
        if text == stored.text:
            raise ApiError(400, NOT_MODIFIED)
        stored.text = text
        stored.edits.append(text)
        stored.json = dict(stored.json, text=text, edit_date=int(time.time()))
        if self._world.on_bot_text is not None:
            self._world.on_bot_text(stored)
        return stored.json

    async def _api_sendchataction(self, params: JSON) -> bool:
        self._world.chat_for(params)
        if params.get("action") not in _CHAT_ACTIONS:
            raise bad_request("wrong parameter action in request")
        return True

    async def _api_getchatmember(self, params: JSON) -> JSON:
        chat = self._world.chat_for(params)
        user_id = int_param(params.get("user_id"))
        user = self._world.users.get(user_id) if user_id is not None else None
        if user is None:
            raise bad_request("PARTICIPANT_ID_INVALID")
        status = self._world.members.get((chat.id, user.id), "member")
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
            raise bad_request("commands must be a list of at most 100 BotCommand")
        for command in commands:
            name = command.get("command", "") if isinstance(command, dict) else ""
            description = command.get("description", "") if isinstance(command, dict) else ""
            if not re.fullmatch(r"[a-z0-9_]{1,32}", str(name)):
                raise bad_request("BOT_COMMAND_INVALID")
            if not 1 <= len(str(description)) <= 256:
                raise bad_request("BOT_COMMAND_DESCRIPTION_INVALID")
        self._world.commands[commands_key(params)] = commands
        return True

    async def _api_getmycommands(self, params: JSON) -> list[JSON]:
        return self._world.commands.get(commands_key(params), [])

    async def _api_deletemycommands(self, params: JSON) -> bool:
        self._world.commands.pop(commands_key(params), None)
        return True

    async def _api_deletewebhook(self, params: JSON) -> bool:
        self._world.webhook = None
        if params.get("drop_pending_updates"):
            self._world.updates.clear()
        return True

    async def _api_setwebhook(self, params: JSON) -> bool:
        url = params.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise bad_request("bad webhook: An HTTPS URL must be provided for webhook")
        self._world.webhook = params
        if params.get("drop_pending_updates"):
            self._world.updates.clear()
        for update in self._world.updates:  # what was waiting goes to the webhook now
            self._world.deliver_to_webhook(update)
        self._world.updates.clear()
        return True

    async def _api_getwebhookinfo(self, params: JSON) -> JSON:
        return {
            "url": (self._world.webhook or {}).get("url", ""),
            "has_custom_certificate": False,
            "pending_update_count": len(self._world.updates),
        }

    async def _api_close(self, params: JSON) -> bool:
        return True

    async def _api_logout(self, params: JSON) -> bool:
        return True
