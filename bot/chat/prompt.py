"""Prompt building: the model's chat template filled with the system prompt and as
many of the newest turns as fit the token budget."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from bot.errors import InputRejected
from bot.events import ChatTurn
from bot.ports import ModelBackend, RenderedPrompt, StoredMessage

logger = logging.getLogger(__name__)

# Template tokens around each turn (role markers, separators); an estimate that the
# final render corrects.
_TURN_OVERHEAD = 6


@dataclass(frozen=True, slots=True)
class Prompt:
    rendered: RenderedPrompt
    max_new_tokens: int

    @property
    def ids(self) -> list[int]:
        """The token ids, for a backend that works on them (empty for a remote one)."""
        return list(self.rendered.ids)


def reply_budget(context_length: int, max_new_tokens: int) -> int:
    """New tokens allowed for a reply: never more than half the context, so a prompt
    always has room."""
    return max(1, min(max_new_tokens, context_length // 2))


async def build_prompt(
    model: ModelBackend,
    system_prompt: str | None,
    history: Sequence[StoredMessage],
    max_new_tokens: int,
) -> Prompt:
    """Fit `system_prompt` and the newest turns of `history` (oldest first, the last one
    being the user's new message) into the context minus the reply's tokens.

    Raises `InputRejected` when not even the newest message fits."""
    if not history:
        raise ValueError("history must hold the new message")
    new_tokens = reply_budget(model.context_length, max_new_tokens)
    budget = model.context_length - new_tokens
    system = system_prompt or None
    used = (await model.count_tokens(system) + _TURN_OVERHEAD) if system else 0

    start = len(history)
    for message in reversed(history):
        cost = message.token_count + _TURN_OVERHEAD
        if used + cost > budget and start < len(history):
            break
        used += cost
        start -= 1

    # The estimate can be off by the template's exact framing: render, and drop the
    # oldest turn until it fits.
    while True:
        turns = [ChatTurn(m.role, m.content) for m in history[start:]]
        rendered = await model.render(system, turns)
        if rendered.length <= budget:
            logger.debug("prompt: %d tokens, %d turns", rendered.length, len(turns))
            return Prompt(rendered, new_tokens)
        if start < len(history) - 1:
            start += 1
        elif system is not None:
            logger.warning("system prompt dropped: it does not fit with the message")
            system = None
        else:
            raise InputRejected("Your message is too long for my context window. Please send a shorter one.")
