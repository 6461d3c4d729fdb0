"""A fake Telegram Bot API server for the real python-telegram-bot: `objects` (users,
chats, messages as the API shows them), `world` (what Telegram knows, and how tests
act on it), `methods` (the Bot API methods), `server` (HTTP and webhooks)."""

from tests.fakes.telegram.objects import Call, Chat, StoredMessage, Upload, User, auto_entities, scope_key
from tests.fakes.telegram.server import FakeTelegramServer

__all__ = ["Call", "Chat", "FakeTelegramServer", "StoredMessage", "Upload", "User", "auto_entities", "scope_key"]
