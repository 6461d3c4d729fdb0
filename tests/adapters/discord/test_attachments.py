"""Text attachments: which files are read, their text appended to the message, and the
note for messages with nothing the bot can read."""

from __future__ import annotations

import pytest

from adapters.discord.attachments import ATTACHMENT_NOTE, is_text_attachment
from tests.adapters.discord.conftest import EchoHandler, RunAdapter, World, assert_pings_no_one
from tests.fakes.discord.server import FakeDiscordServer
from tests.fakes.discord.world import FakeAttachment


@pytest.mark.parametrize(
    ("filename", "content_type", "expected"),
    [
        ("notes.txt", "text/plain; charset=utf-8", True),
        ("README.md", None, True),
        ("script.py", "text/x-python", True),
        ("data.json", "application/json", True),
        ("table.csv", None, True),
        ("mystery", "text/plain", True),
        ("Dockerfile", None, True),
        ("photo.png", "image/png", False),
        ("archive.zip", "application/zip", False),
        ("clip.mp4", None, False),
    ],
)
def test_text_attachments_are_recognised_by_type_or_extension(
    filename: str, content_type: str | None, expected: bool
) -> None:
    assert is_text_attachment(filename, content_type) is expected


async def test_text_attachments_are_read_into_the_message(
    server: FakeDiscordServer, world: World, echo: EchoHandler
) -> None:
    files = [
        FakeAttachment("notes.md", "# Notes\nbuy milk ✓".encode()),
        FakeAttachment("log", b"bad byte \xff here", content_type="text/plain; charset=utf-8"),
        FakeAttachment("cat.png", b"\x89PNG\r\n", content_type="image/png"),
    ]
    dm = server.dm_channel(world.alice)
    await server.user_sends(dm, world.alice, "summarise these", attachments=files)
    await server.wait_for(lambda: len(echo.finished) == 1)
    assert echo.events[0].text == "summarise these\n\n[notes.md]\n# Notes\nbuy milk ✓\n\n[log]\nbad byte \ufffd here"


async def test_attachments_without_text_get_a_short_note(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler, discord_attachment_max_bytes=10):
        dm = server.dm_channel(world.alice)
        await server.user_sends(dm, world.alice, "", attachments=[FakeAttachment("cat.png", b"\x89PNG", "image/png")])
        await server.wait_for(lambda: len(server.bot_texts(dm)) == 1)
        await server.user_sends(dm, world.alice, "", attachments=[FakeAttachment("big.txt", b"x" * 11)])
        await server.wait_for(lambda: len(server.bot_texts(dm)) == 2)
    assert handler.events == []  # the core was never asked
    first, second = server.bot_texts(dm)
    assert first == ATTACHMENT_NOTE
    assert second.startswith(ATTACHMENT_NOTE) and "big.txt" in second and "10 bytes" in second
    assert not any(c.path.startswith("/attachments/") for c in server.calls)  # nothing downloaded
    assert_pings_no_one(server)
