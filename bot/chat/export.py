"""`/export`: one conversation as a Markdown file.

The file shows the history exactly as it is stored: one section per message, a heading
with who wrote it and when, then the message's text unchanged (model output and the
user's own Markdown stay as they were written)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from bot.events import ConversationKey
from bot.ports import StoredMessage

# Discord takes attachments up to 10 MB from any bot (Telegram 50 MB): a longer
# history is cut to its newest messages.
EXPORT_MAX_BYTES: Final = 8 * 2**20

_ROLES: Final = {"user": "User", "assistant": "Assistant", "system": "System"}


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def message_section(message: StoredMessage) -> str:
    """One message: `### User · 2026-12-03 09:30:01 UTC`, a blank line, its text."""
    mark = " (cut off)" if message.status == "cut_off" else ""
    return f"### {_ROLES[message.role]} · {_when(message.created_at)}{mark}\n\n{message.content}\n\n"


def export_markdown(
    key: ConversationKey,
    messages: Sequence[StoredMessage],
    *,
    exported_at: datetime,
    max_bytes: int = EXPORT_MAX_BYTES,
) -> tuple[str, int]:
    """The Markdown file of `messages` (oldest first) and how many of them it holds: the
    newest that fit `max_bytes`."""
    sections: list[str] = []
    size = 0
    for message in reversed(messages):
        section = message_section(message)
        size += len(section.encode("utf-8"))
        if size > max_bytes and sections:
            break
        sections.append(section)
    sections.reverse()
    omitted = len(messages) - len(sections)
    header = [
        "# Conversation",
        "",
        f"- Platform: {key.platform}",
        f"- Chat: {key.chat_id}",
        f"- User: {key.user_id}",
        f"- Messages: {len(sections)}"
        + (f" (the {omitted} oldest are left out: the file is limited)" if omitted else ""),
        f"- Exported: {_when(exported_at)}",
        "",
        "---",
        "",
        "",
    ]
    return "\n".join(header) + "".join(sections), len(sections)
