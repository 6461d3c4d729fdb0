"""The users and chats of the Telegram tests."""

from tests.fakes.telegram import Chat, User

ALICE = User(1001, "Alice", "alice", last_name="Liddell")
BOB = User(1002, "Bob", "bob")
CAROL = User(1003, "Carol", "carol")
GROUP = Chat.group(-4_000_001, "Tea party")
SUPERGROUP = Chat.supergroup(-1_000_000_000_001, "Wonderland")
PRIVATE_ALICE = Chat.private(ALICE)
PRIVATE_BOB = Chat.private(BOB)
