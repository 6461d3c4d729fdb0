"""Text attachments: which files the bot reads, and their text appended to the message."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import PurePosixPath

import discord

from bot.events import IncomingMessage

ATTACHMENT_NOTE = "I can only read text and text files."

TEXT_EXTENSIONS = frozenset(
    {
        *(".txt", ".md", ".markdown", ".rst", ".log", ".tex", ".bib", ".srt", ".vtt", ".diff", ".patch"),
        *(".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".env", ".xml"),
        *(".html", ".htm", ".css", ".scss", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".graphql", ".proto", ".sql"),
        *(".py", ".pyi", ".ipynb", ".rb", ".go", ".rs", ".java", ".kt", ".kts", ".scala", ".swift", ".m", ".php"),
        *(".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".pl", ".lua", ".r", ".jl"),
        *(".sh", ".bash", ".zsh", ".fish", ".ps1", ".bat", ".dockerfile"),
    }
)
TEXT_CONTENT_TYPES = frozenset(
    {
        "application/json",
        "application/ld+json",
        "application/xml",
        "application/javascript",
        "application/x-yaml",
        "application/yaml",
        "application/toml",
        "application/x-sh",
        "application/sql",
    }
)
_TEXT_FILE_NAMES = frozenset({"dockerfile", "makefile", "readme", "license"})


def is_text_attachment(filename: str, content_type: str | None) -> bool:
    """Whether an attachment is a text file the bot reads (by MIME type or extension)."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime.startswith("text/") or mime in TEXT_CONTENT_TYPES:
        return True
    name = PurePosixPath(filename.lower())
    return name.suffix in TEXT_EXTENSIONS or name.name in _TEXT_FILE_NAMES


async def read_text_attachments(
    event: IncomingMessage, attachments: Sequence[discord.Attachment], max_bytes: int
) -> tuple[IncomingMessage, str | None]:
    """Append the text attachments (up to `max_bytes` each) to the event's text.

    Returns the event and, when the message has nothing the bot can read, a short note
    to send instead of asking the model."""
    parts = [event.text] if event.text else []
    too_large: list[str] = []
    for attachment in attachments:
        if not is_text_attachment(attachment.filename, attachment.content_type):
            continue
        if attachment.size > max_bytes:
            too_large.append(attachment.filename)
            continue
        data = await attachment.read()
        parts.append(f"[{attachment.filename}]\n{data.decode('utf-8', errors='replace')}")
    if parts:
        return dataclasses.replace(event, text="\n\n".join(parts)), None
    if too_large:
        return event, f"{ATTACHMENT_NOTE} {', '.join(too_large)} is larger than my limit of {max_bytes} bytes."
    return event, ATTACHMENT_NOTE
