"""The tokenizer side of the model: text to token ids and back, and a conversation
rendered by the model's chat template (or a plain fallback format for models without
one), with the tokens and text that end a reply."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from bot.errors import GenerationError, first_line
from bot.events import ChatTurn

logger = logging.getLogger(__name__)

FALLBACK_STOP = "\nUser:"
"""Ends a reply in the fallback format: the model went on to write the user's next turn."""

# End-of-turn markers of common chat templates; counted as EOS when the template uses them.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class ChatTokenizer:
    """A Hugging Face tokenizer made thread-safe, with its chat template.

    Text that looks like a control token (``<|im_end|>``) is always encoded as plain text.
    """

    def __init__(self, tokenizer: Any, generation_config: Any) -> None:
        """`generation_config` is the model's (its ``eos_token_id`` also ends a reply)."""
        self._tokenizer = tokenizer
        # The tokenizer backend has shared mutable state (the split-special-tokens flag,
        # truncation settings) and raises "Already borrowed" when used concurrently.
        self._lock = threading.Lock()
        self._has_template = bool(getattr(tokenizer, "chat_template", None))
        self._sanitize = self._has_template and self._template_can_sanitize()
        self._eos_ids = self._find_eos_ids(getattr(generation_config, "eos_token_id", None))

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokenizer's and the model's EOS, and the template's end-of-turn token."""
        return self._eos_ids

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends a reply besides EOS: only the fallback format needs one."""
        return () if self._has_template else (FALLBACK_STOP,)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        with self._lock:
            ids = self._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens left out."""
        with self._lock:
            text = self._tokenizer.decode(list(ids), skip_special_tokens=True)
        return str(text)

    def render_chat(self, system: str | None, turns: Sequence[ChatTurn]) -> list[int]:
        """Prompt token ids ending where the assistant's reply begins."""
        system = system.strip() if system else ""
        if not self._has_template:
            return self._render_fallback(system, turns)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": t.role, "content": t.content} for t in turns
        ]
        if not messages:
            raise GenerationError("render_chat needs a system prompt or at least one turn")
        # Templates differ in what they accept (alternating roles, a system role, a
        # user turn first); retry with the conversation reshaped instead of failing.
        attempts = [messages, _merge_same_role(messages)]
        folded = _fold_system(attempts[-1])
        attempts += [folded, _drop_leading_assistant(folded)]
        error: Exception | None = None
        for attempt in attempts:
            if not attempt:
                continue
            try:
                with self._lock:
                    ids = self._apply_template(attempt, sanitize=self._sanitize)
                return [int(i) for i in ids]
            except Exception as exc:  # jinja2 TemplateError from the template's raise_exception
                error = exc
        raise GenerationError(f"the chat template rejects this conversation: {error}")

    def _apply_template(self, messages: list[dict[str, str]], *, sanitize: bool) -> Any:
        return self._tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=sanitize,
        )

    def _template_can_sanitize(self) -> bool:
        try:
            self._apply_template([{"role": "user", "content": "hi"}], sanitize=True)
            return True
        except Exception as exc:
            logger.warning(
                "This tokenizer cannot encode user text containing control tokens as plain "
                "text (%s); such text will reach the model as control tokens",
                first_line(exc),
            )
            return False

    def _render_fallback(self, system: str, turns: Sequence[ChatTurn]) -> list[int]:
        parts = [system + "\n\n"] if system else []
        for turn in turns:
            if turn.role == "user":
                parts.append(f"User: {turn.content}\n")
            elif turn.role == "assistant":
                parts.append(f"Assistant: {turn.content}\n")
            else:
                parts.append(f"{turn.content}\n\n")
        parts.append("Assistant:")
        with self._lock:
            ids = self._tokenizer("".join(parts), add_special_tokens=True, split_special_tokens=True)["input_ids"]
        return [int(i) for i in ids]

    def _find_eos_ids(self, model_eos: object) -> frozenset[int]:
        ids: set[int] = set()
        tok_eos = getattr(self._tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int):
            ids.add(tok_eos)
        if isinstance(model_eos, int):
            ids.add(model_eos)
        elif isinstance(model_eos, (list, tuple)):
            ids.update(int(i) for i in model_eos)
        template = str(getattr(self._tokenizer, "chat_template", None) or "")
        unk = getattr(self._tokenizer, "unk_token_id", None)
        for token in _END_OF_TURN_TOKENS:
            if token in template:
                token_id = self._tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id != unk:
                    ids.add(token_id)
        return frozenset(ids)


def _merge_same_role(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    merged: list[dict[str, str]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append(dict(message))
    return merged


def _fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """System text moved into the first user turn, for templates without a system role."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for message in rest:
        if message["role"] == "user":
            message["content"] = system + "\n\n" + message["content"]
            return rest
    return [{"role": "user", "content": system}, *rest]


def _drop_leading_assistant(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    start = 0
    while start < len(messages) and messages[start]["role"] == "assistant":
        start += 1
    return messages[start:]
