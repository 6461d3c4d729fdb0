"""A ReplyTarget that keeps the chat as a list of messages, as a platform would."""

from __future__ import annotations

import asyncio

from bot.errors import DeliveryError


class RecordingTarget:
    """Records sends, edits and typing; can fail like a platform (chat gone, message deleted)."""

    def __init__(self, max_chars: int = 4096, edit_interval: float = 0.0, *, chat_admin: bool = False) -> None:
        self.max_chars = max_chars
        self.edit_interval = edit_interval
        self.chat_admin = chat_admin
        self.messages: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.typing_count = 0
        self.fail_edits = False
        self.fail_sends = False
        self.first_send = asyncio.Event()

    @property
    def text(self) -> str:
        """Everything the user sees, messages joined by newlines."""
        return "\n".join(self.messages)

    async def send(self, text: str) -> str:
        assert len(text) <= self.max_chars
        if self.fail_sends:
            raise DeliveryError("bot was blocked by the user")
        self.messages.append(text)
        self.calls.append(("send", text))
        self.first_send.set()
        return str(len(self.messages) - 1)

    async def edit(self, message_id: str, text: str) -> None:
        assert len(text) <= self.max_chars
        if self.fail_edits:
            raise DeliveryError("message to edit not found")
        self.messages[int(message_id)] = text
        self.calls.append(("edit", text))

    async def typing(self) -> None:
        self.typing_count += 1

    async def sender_is_chat_admin(self) -> bool:
        return self.chat_admin
