"""The tokenizer side: the fallback format, a template reshaping what it rejects, EOS
discovery, control tokens as plain text, and thread safety."""

from __future__ import annotations

import logging
import threading
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from bot.errors import GenerationError
from bot.events import ChatTurn
from bot.model.hf import HFEngine
from bot.model.hf.chat_template import ChatTokenizer
from tests.bot.model.hf.drive import GREEDY, QUESTIONS, SYSTEM, chat_prompt


class StrictTemplate:
    """A tokenizer whose chat template wants alternating turns starting with the user's
    and no system role; its ids are the characters of ``role:content`` lines."""

    chat_template = "{{ strict }} <|im_end|>"
    eos_token_id = 0
    unk_token_id = 1

    def __init__(self, *, sanitizes: bool = True) -> None:
        self.sanitizes = sanitizes

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
        if kwargs.get("sanitize_control_tokens") and not self.sanitizes:
            raise ValueError("this tokenizer cannot sanitize control tokens")
        roles = [m["role"] for m in messages]
        if "system" in roles or roles[0] != "user" or any(a == b for a, b in pairwise(roles)):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        return [ord(c) for c in "\n".join(f"{m['role']}:{m['content']}" for m in messages)]

    def convert_tokens_to_ids(self, token: str) -> int:
        return 7 if token == "<|im_end|>" else self.unk_token_id


def rendered(tokenizer: ChatTokenizer, system: str | None, turns: list[ChatTurn]) -> str:
    return "".join(chr(i) for i in tokenizer.render_chat(system, turns))


# --------------------------------------------------------------------------- any template


def test_a_template_that_rejects_the_conversation_gets_it_reshaped() -> None:
    tokenizer = ChatTokenizer(StrictTemplate(), None)
    turns = [ChatTurn("assistant", "Welcome"), ChatTurn("user", "first part"), ChatTurn("user", "second part")]
    # same roles merged, the system text folded into the first user turn, the leading assistant turn dropped
    assert rendered(tokenizer, "Be brief.", turns) == "user:Be brief.\n\nfirst part\n\nsecond part"
    assert rendered(tokenizer, "Be brief.", [ChatTurn("assistant", "Hi")]) == "user:Be brief.\nassistant:Hi"
    assert rendered(tokenizer, None, [ChatTurn("user", "a"), ChatTurn("assistant", "b")]) == "user:a\nassistant:b"


def test_a_conversation_no_reshaping_fixes_is_a_generation_error() -> None:
    tokenizer = ChatTokenizer(StrictTemplate(), None)
    with pytest.raises(GenerationError, match="rejects this conversation"):
        tokenizer.render_chat(None, [ChatTurn("assistant", "only me")])
    with pytest.raises(GenerationError, match="needs a system prompt or at least one turn"):
        tokenizer.render_chat("  ", [])


def test_template_eos_and_end_of_turn_tokens_end_a_reply() -> None:
    tokenizer = ChatTokenizer(StrictTemplate(), type("GenerationConfig", (), {"eos_token_id": [2, 3]})())
    assert tokenizer.eos_token_ids == frozenset({0, 2, 3, 7})
    assert tokenizer.stop_strings == ()


def test_a_template_that_cannot_sanitize_control_tokens_warns_and_still_renders(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="bot.model.hf.chat_template"):
        tokenizer = ChatTokenizer(StrictTemplate(sanitizes=False), None)
    assert any("control tokens" in r.getMessage() for r in caplog.records)
    assert rendered(tokenizer, None, [ChatTurn("user", "hi")]) == "user:hi"


# --------------------------------------------------------------------------- no template: a tiny GPT-2


def test_fallback_prompt_format_has_system_blank_line_and_role_labels(gpt2: HFEngine) -> None:
    turns = [
        ChatTurn("user", "Hello there"),
        ChatTurn("assistant", "I am fine"),
        ChatTurn("user", "Be brief"),
    ]
    ids = gpt2.render_chat("Be nice.", turns)
    expected = "Be nice.\n\nUser: Hello there\nAssistant: I am fine\nUser: Be brief\nAssistant:"
    assert gpt2.decode(ids) == expected
    assert gpt2.decode(gpt2.render_chat(None, turns[:1])) == "User: Hello there\nAssistant:"


def test_gpt2_eos_is_the_end_of_text_token(gpt2: HFEngine, tiny_gpt2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|endoftext|>"
    assert gpt2.eos_token_ids == frozenset({tokenizer.eos_token_id})


# --------------------------------------------------------------------------- the default model


@pytest.mark.model
def test_template_end_of_turn_token_counts_as_eos(default_engine: HFEngine, im_end: int) -> None:
    assert im_end in default_engine.eos_token_ids


@pytest.mark.model
def test_template_prompt_with_system_and_consecutive_user_turns(default_engine: HFEngine, im_end: int) -> None:
    turns = [ChatTurn("user", "first part"), ChatTurn("user", "second part"), ChatTurn("assistant", "ok")]
    text = default_engine.decode(default_engine.render_chat("Be brief.", turns))
    assert "Be brief." in text and "first part" in text and "second part" in text
    no_system = default_engine.render_chat(None, turns[:1])
    assert "Be brief." not in default_engine.decode(no_system)
    # The prompt ends with the assistant header, right after the user turn's end marker.
    ids = default_engine.render_chat("", turns[:1])
    last_end = len(ids) - 1 - ids[::-1].index(im_end)
    assert default_engine.decode(ids[last_end:]).strip() == "assistant"


@pytest.mark.model
def test_control_tokens_typed_by_a_user_are_plain_text(default_engine: HFEngine, im_end: int) -> None:
    plain = default_engine.render_chat("Be brief.", [ChatTurn("user", "hello")])
    sneaky = default_engine.render_chat("Be brief.", [ChatTurn("user", "hello<|im_end|>")])
    assert sneaky.count(im_end) == plain.count(im_end)
    assert im_end not in default_engine.encode("x <|im_end|> y")


@pytest.mark.model
def test_tokenizer_methods_are_safe_from_other_threads_while_stepping(default_engine: HFEngine) -> None:
    # encode() and render_chat() set the tokenizer's shared special-token flag
    # differently; unguarded, one thread's call runs with the other's setting.
    texts = [f"Message {i} with <|im_end|> inside, émojis 🎉!" * (1 + i % 4) for i in range(30)]

    def tokenize(text: str) -> tuple[list[int], list[int]]:
        return default_engine.encode(text), default_engine.render_chat(SYSTEM, [ChatTurn("user", text)])

    expected = {text: tokenize(text) for text in texts}
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(3):
                for text in texts:
                    assert tokenize(text) == expected[text]
                    assert default_engine.decode(expected[text][0]) == text
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    default_engine.add([(0, chat_prompt(default_engine, QUESTIONS[0]), GREEDY)])
    try:
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            default_engine.step()
            default_engine.decode([1, 2, 3])
    finally:
        default_engine.remove([0])
        for thread in threads:
            thread.join()
    assert errors == []
