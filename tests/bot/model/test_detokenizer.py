"""Incremental detokenization with stop strings, over deterministic tokenizers."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from bot.model.detokenizer import CONTEXT_TOKENS, Detokenizer, Piece
from tests.fakes.fake_engine import FakeEngine

CHARS = FakeEngine()  # one token per code point
BYTES = FakeEngine(byte_tokens=True)  # one token per UTF-8 byte


def feed(detokenizer: Detokenizer, tokens: Sequence[int]) -> list[Piece]:
    return [detokenizer.push(token) for token in tokens]


def texts(pieces: Sequence[Piece]) -> list[str]:
    return [piece.text for piece in pieces]


def sentencepiece_decode(ids: Sequence[int]) -> str:
    """Like a SentencePiece decoder: "▁" is a space, and the text's leading space is dropped."""
    return "".join(WORDS[i] for i in ids).replace("▁", " ").removeprefix(" ")


WORDS = {1: "▁Say", 2: "▁hello", 3: "▁world", 4: "!"}


def test_each_token_releases_its_own_text() -> None:
    detokenizer = Detokenizer(CHARS.decode, CHARS.encode("prompt"), ())
    assert texts(feed(detokenizer, CHARS.encode("Hello"))) == list("Hello")
    assert detokenizer.flush() == Piece("")


def test_the_first_word_keeps_its_leading_space_thanks_to_the_prompt_context() -> None:
    with_context = Detokenizer(sentencepiece_decode, [1], ())
    assert texts(feed(with_context, [2, 3, 4])) == [" hello", " world", "!"]
    # decoded alone, the first piece loses its space: the context is what keeps it
    alone = Detokenizer(sentencepiece_decode, [], ())
    assert texts(feed(alone, [2, 3, 4])) == ["hello", " world", "!"]


def test_the_prompt_text_is_never_released() -> None:
    prompt = CHARS.encode("a long prompt that is much longer than the context")
    assert len(prompt) > CONTEXT_TOKENS
    detokenizer = Detokenizer(CHARS.decode, prompt, ())
    assert "".join(texts(feed(detokenizer, CHARS.encode("reply")))) == "reply"


def test_a_character_split_over_byte_tokens_is_released_whole() -> None:
    detokenizer = Detokenizer(BYTES.decode, BYTES.encode("x"), ())
    pieces = texts(feed(detokenizer, BYTES.encode("é🎉a")))
    assert pieces == ["", "é", "", "", "", "🎉", "a"]


def test_an_incomplete_character_at_the_end_is_dropped_by_flush() -> None:
    detokenizer = Detokenizer(BYTES.decode, BYTES.encode("x"), ())
    assert texts(feed(detokenizer, BYTES.encode("ok🎉")[:-1])) == ["o", "k", "", "", ""]
    assert detokenizer.flush() == Piece("")


def drop_invalid_but_mark_an_incomplete_end(ids: Sequence[int]) -> str:
    """A decoder that skips bad bytes inside the text and shows an unfinished last
    character as U+FFFD: the count of U+FFFD changes as text follows it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    text = decoder.decode(bytes(ids))
    return text + "\ufffd" if decoder.getstate()[0] else text


def test_a_prompt_tail_ending_mid_character_is_left_out_of_the_context() -> None:
    prompt = list("ab🎉".encode())[:-2]
    decode = drop_invalid_but_mark_an_incomplete_end
    assert decode(prompt).endswith("\ufffd")
    detokenizer = Detokenizer(decode, prompt, ())
    assert texts(feed(detokenizer, list(b"ok"))) == ["o", "k"]


def test_a_reply_after_a_prompt_tail_ending_mid_character_is_exact() -> None:
    detokenizer = Detokenizer(BYTES.decode, list("é".encode())[:1], ())
    assert "".join(texts(feed(detokenizer, BYTES.encode("ok é")))) == "ok é"


# --------------------------------------------------------------------------- stop strings


def test_a_stop_string_split_across_tokens_is_cut_and_never_released() -> None:
    detokenizer = Detokenizer(CHARS.decode, [], ("\nUser:",))
    pieces = feed(detokenizer, CHARS.encode("Sure.\nUser:"))
    assert "".join(texts(pieces)) == "Sure."
    assert not any("\n" in piece.text for piece in pieces)
    assert [piece.stopped for piece in pieces] == [False] * 10 + [True]


def test_the_text_before_a_stop_string_comes_with_the_stop() -> None:
    detokenizer = Detokenizer(sentencepiece_decode, [], ("!",))
    assert feed(detokenizer, [2, 4]) == [Piece("hello"), Piece("", stopped=True)]
    detokenizer = Detokenizer(sentencepiece_decode, [], ("d!",))
    assert feed(detokenizer, [2, 3, 4]) == [Piece("hello"), Piece(" worl"), Piece("", stopped=True)]


def test_a_stop_string_made_of_byte_tokens_is_cut() -> None:
    detokenizer = Detokenizer(BYTES.decode, [], ("🛑",))
    pieces = feed(detokenizer, BYTES.encode("stop é here🛑"))
    assert "".join(texts(pieces)) == "stop é here"
    assert pieces[-1].stopped


def test_text_that_may_start_a_stop_string_is_held_until_decided() -> None:
    detokenizer = Detokenizer(CHARS.decode, [], ("\nUser:",))
    assert texts(feed(detokenizer, CHARS.encode("a\nUse it"))) == ["a", "", "", "", "", "\nUse ", "i", "t"]
    assert texts(feed(detokenizer, CHARS.encode("\nUs"))) == ["", "", ""]
    assert detokenizer.flush() == Piece("\nUs")  # the reply ended: it was no stop string


def test_the_longest_possible_stop_start_is_held() -> None:
    detokenizer = Detokenizer(CHARS.decode, [], ("abc", "bx"))
    assert texts(feed(detokenizer, CHARS.encode("zab"))) == ["z", "", ""]
    assert detokenizer.push(CHARS.encode("x")[0]) == Piece("a", stopped=True)


def test_flush_cuts_a_stop_string_in_the_text_not_yet_released() -> None:
    vocab = {1: b"Hi", 2: b"\nUser:\xc3"}  # the second token ends mid-character

    def decode(ids: Sequence[int]) -> str:
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    stopping = Detokenizer(decode, [], ("\nUser:",))
    assert feed(stopping, [1, 2]) == [Piece("Hi"), Piece("")]
    assert stopping.flush() == Piece("", stopped=True)
    plain = Detokenizer(decode, [], ("\nBot:",))
    assert feed(plain, [1, 2]) == [Piece("Hi"), Piece("")]
    assert plain.flush() == Piece("\nUser:")


def test_empty_stop_strings_are_ignored() -> None:
    detokenizer = Detokenizer(CHARS.decode, [], ("", "STOP"))
    assert texts(feed(detokenizer, CHARS.encode("abc"))) == ["a", "b", "c"]
    assert detokenizer.flush() == Piece("")
