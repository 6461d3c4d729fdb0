"""Delivery of stream items to the event loop, and their merging into `ReplyChunk`s."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bot.errors import GenerationError
from bot.model.streams import Channel, End, Text, send, send_from_loop
from bot.ports import ReplyChunk


async def channel() -> Channel:
    return Channel(asyncio.get_running_loop())


async def test_text_that_piled_up_comes_as_one_chunk_counting_new_tokens_only() -> None:
    ch = await channel()
    for item in (Text("He", 2), Text("llo", 3)):
        ch.put(item)
    assert await ch.receive() == ReplyChunk("Hello", 3)
    ch.put(Text(" you", 5))
    assert await ch.receive() == ReplyChunk(" you", 2)


async def test_the_end_comes_with_the_last_text_and_the_reason() -> None:
    ch = await channel()
    for item in (Text("a", 1), Text("b", 2), End(finish_reason="length", tokens=3)):
        ch.put(item)
    # the end counts the token that made no text (e.g. EOS)
    assert await ch.receive() == ReplyChunk("ab", 3, "length")


async def test_an_end_alone_is_an_empty_last_chunk() -> None:
    ch = await channel()
    ch.put(Text("a", 1))
    assert await ch.receive() == ReplyChunk("a", 1)
    ch.put(End(tokens=2))
    assert await ch.receive() == ReplyChunk("", 1, "stop")


async def test_an_end_with_an_error_raises_it() -> None:
    ch = await channel()
    error = GenerationError("the model failed")
    ch.put(Text("partial", 1))
    ch.put(End(error))
    with pytest.raises(GenerationError) as caught:
        await ch.receive()
    assert caught.value is error


async def test_nothing_goes_in_after_the_end_or_after_close() -> None:
    ended = await channel()
    ended.put(End(tokens=1))
    ended.put(Text("late", 2))
    assert await ended.receive() == ReplyChunk("", 1, "stop")
    closed = await channel()
    closed.close()
    closed.put(Text("late", 1))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(closed.receive(), timeout=0.05)


async def test_send_from_another_thread_reaches_every_channel() -> None:
    first, second = await channel(), await channel()
    items = [(first, Text("one", 1)), (second, Text("two", 1)), (first, End(tokens=1))]
    thread = threading.Thread(target=send, args=(items,), name="sender")
    thread.start()
    thread.join()
    assert await first.receive() == ReplyChunk("one", 1, "stop")
    assert await second.receive() == ReplyChunk("two", 1)


def test_send_to_a_closed_loop_drops_the_items() -> None:
    loop = asyncio.new_event_loop()
    ch = Channel(loop)
    loop.close()
    send([(ch, Text("lost", 1))])  # no error: nobody is waiting


async def test_send_from_loop_puts_at_once_on_its_own_loop() -> None:
    ch = await channel()
    send_from_loop(asyncio.get_running_loop(), ch, End(tokens=0))
    ch.put(Text("after the end", 1))  # dropped: the end is already in
    assert await ch.receive() == ReplyChunk("", 0, "stop")


async def test_send_from_loop_reaches_a_channel_of_another_loop() -> None:
    other = asyncio.new_event_loop()
    try:
        ch = Channel(other)
        send_from_loop(asyncio.get_running_loop(), ch, End(tokens=1))
        got = await asyncio.to_thread(other.run_until_complete, ch.receive())
        assert got == ReplyChunk("", 1, "stop")
    finally:
        other.close()
