"""Incoming messages as an adapter would hand them to the core."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from bot.events import IncomingMessage, Platform

_ids = itertools.count(1)


def incoming(
    text: str,
    *,
    user: str = "u1",
    chat: str = "c1",
    private: bool = True,
    platform: Platform = "telegram",
) -> IncomingMessage:
    """A message addressed to the bot, with a fresh message id."""
    return IncomingMessage(
        platform=platform,
        chat_id=chat,
        user_id=user,
        display_name=f"User {user}",
        message_id=str(next(_ids)),
        text=text,
        is_private=private,
        timestamp=datetime.now(UTC),
    )
