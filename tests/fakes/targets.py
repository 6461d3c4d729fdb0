"""A ReplyTarget that keeps the chat as a list of messages, as a platform would."""

from __future__ import annotations

import asyncio

from bot.errors import DeliveryError


class RecordingTarget:
    """Records sends, edits, files and typing; can fail like a platform: for good (chat
    gone, message deleted: `fail_sends`, `fail_edits`) or for a while (server errors, a
    long flood wait: `unavailable`, which refuses sends and edits with a transient
    `DeliveryError` until it is set back to False)."""

    def __init__(
        self,
        max_chars: int = 4096,
        edit_interval: float = 0.0,
        *,
        chat_admin: bool = False,
        messages: list[str] | None = None,
    ) -> None:
        self.max_chars = max_chars
        self.edit_interval = edit_interval
        self.chat_admin = chat_admin
        # `messages`: the chat as a previous run of the bot left it (ids are positions).
        self.messages: list[str] = list(messages or [])
        self.calls: list[tuple[str, str]] = []
        self.files: list[tuple[str, bytes, str]] = []
        self.typing_count = 0
        self.fail_edits = False
        self.fail_sends = False
        self.unavailable = False
        self.refused = 0  # calls refused while unavailable
        self.first_send = asyncio.Event()

    @property
    def text(self) -> str:
        """Everything the user sees, messages joined by newlines."""
        return "\n".join(self.messages)

    def _check_available(self) -> None:
        if self.unavailable:
            self.refused += 1
            raise DeliveryError("server error 500, after retries", permanent=False, kind="server_error")

    async def send(self, text: str) -> str:
        assert len(text) <= self.max_chars
        self._check_available()
        if self.fail_sends:
            raise DeliveryError("bot was blocked by the user", kind="forbidden")
        self.messages.append(text)
        self.calls.append(("send", text))
        self.first_send.set()
        return str(len(self.messages) - 1)

    async def edit(self, message_id: str, text: str) -> None:
        assert len(text) <= self.max_chars
        self._check_available()
        if self.fail_edits:
            raise DeliveryError("message to edit not found", kind="not_found")
        self.messages[int(message_id)] = text
        self.calls.append(("edit", text))

    async def typing(self) -> None:
        self.typing_count += 1

    async def send_file(self, filename: str, data: bytes, caption: str) -> str:
        self._check_available()
        self.files.append((filename, data, caption))
        self.messages.append(caption)
        self.calls.append(("file", filename))
        return str(len(self.messages) - 1)

    async def sender_is_chat_admin(self) -> bool:
        return self.chat_admin
