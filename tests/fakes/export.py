"""Reading an `/export` file back, to compare it with the stored history."""

from __future__ import annotations

import re
from collections.abc import Sequence

from bot.ports import StoredMessage

_SECTION = re.compile(r"^### (User|Assistant) · (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC(?: \(cut off\))?\n\n", re.M)


def read_export(markdown: str) -> list[tuple[str, str, str]]:
    """(role, time, text) of each message section of an exported file, in file order."""
    heads = list(_SECTION.finditer(markdown))
    out = []
    for head, following in zip(heads, [*heads[1:], None], strict=True):
        body = markdown[head.end() : following.start() if following else len(markdown)]
        out.append((head.group(1).lower(), head.group(2), body.removesuffix("\n\n")))
    return out


def as_exported(stored: Sequence[StoredMessage]) -> list[tuple[str, str, str]]:
    """What `read_export` gives for a file of exactly these stored messages."""
    return [(m.role, m.created_at.strftime("%Y-%m-%d %H:%M:%S"), m.content) for m in stored]
