"""The `Protocol`s at the seams, and the plain dataclasses that cross them.

`storage/` implements `Repository`; `bot/model/scheduler.py` implements `ModelBackend` on top of
an `Engine` (`bot/model/hf/`, or a deterministic fake in tests), and `bot/model/remote.py`
implements it with an OpenAI-compatible server; every adapter
implements `ReplyTarget` and `Adapter` and calls a `IncomingHandler`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, runtime_checkable

from bot.events import ChatTurn, ConversationKey, IncomingMessage, Platform, Role

SettingValue = str | int | float

# --------------------------------------------------------------------------- storage


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    role: Role
    content: str
    token_count: int
    created_at: datetime
    platform_message_id: str | None = None


@dataclass(frozen=True, slots=True)
class RepoStats:
    users: int
    conversations: int
    messages: int


class Repository(Protocol):
    """Conversation history and per-session settings. Every method is one unit of work;
    an implementation may commit appends that arrive together in one transaction, as
    long as each call still succeeds or fails on its own."""

    async def add_message(
        self,
        key: ConversationKey,
        role: Role,
        content: str,
        token_count: int,
        platform_message_id: str | None = None,
    ) -> StoredMessage:
        """Append a message, creating the conversation on first use."""
        ...

    async def add_and_recent(
        self,
        key: ConversationKey,
        role: Role,
        content: str,
        token_count: int,
        platform_message_id: str | None,
        limit: int,
    ) -> list[StoredMessage]:
        """Append a message and read the newest `limit` messages (it included), oldest
        first, in one unit of work."""
        ...

    async def recent_messages(self, key: ConversationKey, limit: int) -> list[StoredMessage]:
        """The newest `limit` messages, oldest first. Cost does not grow with history size."""
        ...

    async def clear_conversation(self, key: ConversationKey) -> int:
        """Delete one conversation's messages (its settings stay). Returns how many."""
        ...

    async def clear_chat(self, platform: Platform, chat_id: str) -> int:
        """Delete the messages of every conversation in a chat. Returns how many."""
        ...

    async def move_chat(self, platform: Platform, old_chat_id: str, new_chat_id: str) -> int:
        """Give a chat's conversations (history and settings) a new chat id, except those
        of users who already have one under the new id. Returns how many moved."""
        ...

    async def get_settings(self, key: ConversationKey) -> dict[str, SettingValue]:
        """The session's stored overrides (empty when none)."""
        ...

    async def set_setting(self, key: ConversationKey, name: str, value: SettingValue) -> None: ...

    async def clear_settings(self, key: ConversationKey) -> None: ...

    async def stats(self) -> RepoStats:
        """Counts over the whole database (every process sharing it)."""
        ...

    @property
    def shared(self) -> bool:
        """Whether other bot processes may use the same store (then nothing read from it
        may be cached across turns)."""
        ...

    def conversation_turn(self, key: ConversationKey) -> AbstractAsyncContextManager[None]:
        """Held for the whole of one chat turn of `key`, so that no other process sharing
        the store runs a turn of the same conversation meanwhile (a no-op where one process
        owns the store). Raises `StorageError` if it cannot be taken."""
        ...


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the next token is chosen. `temperature == 0` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """`model` names one of `ModelBackend.models()` for this request (None: the
    backend's default); `stop` strings end the reply (the stop string itself is not
    part of it)."""

    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    model: str | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """A prompt ready for `ModelBackend.generate`, as `ModelBackend.render` made it.

    It carries the chat itself (a remote backend sends the messages to its server) and
    its length in tokens as the backend counts them (the prompt builder trims the
    history until it fits); `ids` are the rendered chat template's token ids for a
    backend that runs the model itself, empty for one that does not."""

    system: str | None
    turns: tuple[ChatTurn, ...]
    length: int
    ids: tuple[int, ...] = ()


FinishReason = Literal["stop", "length"]
"""Why a reply ended: "stop" for the end-of-sequence token or a stop string, "length"
for the reply's token budget or the model's context."""


@dataclass(frozen=True, slots=True)
class ReplyChunk:
    """One item of a reply stream: new text, how many tokens the model generated for it
    (the sum over a stream is the reply's token count), and, on the last chunk only, why
    the reply ended. The last chunk's text may be empty."""

    text: str
    tokens: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class WorkerStats:
    queue_depth: int
    active: int
    tokens_generated: int
    tokens_per_s: float  # over the time generation was actually running


class ModelBackend(Protocol):
    """What the conversation manager sees of the model. Implemented by
    `bot.model.scheduler.Worker` (in-process) and `bot.model.remote.OpenAIBackend`
    (an OpenAI-compatible server)."""

    @property
    def context_length(self) -> int: ...

    @property
    def model_name(self) -> str:
        """The model replies come from when a request names none."""
        ...

    async def count_tokens(self, text: str) -> int: ...

    async def render(self, system: str | None, turns: Sequence[ChatTurn]) -> RenderedPrompt:
        """The chat as the model will see it (chat template or the fallback format,
        ending where the assistant's reply begins), with its length in tokens."""
        ...

    async def models(self) -> tuple[str, ...] | None:
        """The ids a request may name in `GenerationParams.model`, or None when the
        backend serves one model only. Raises `GenerationError` when they cannot be
        listed right now (a model server that is down)."""
        ...

    def generate(self, prompt: RenderedPrompt, params: GenerationParams) -> AsyncGenerator[ReplyChunk, None]:
        """Stream the reply. Raises `BusyError` when the queue is full,
        `GenerationError` when the model fails (`ReplyCutOff` once part of the reply
        was streamed). Closing the generator (`aclose()`, or cancelling the task that
        iterates it) stops the generation early."""
        ...

    def stats(self) -> WorkerStats: ...


class Engine(Protocol):
    """The model as the worker's scheduler thread drives it.

    Everything but the tokenizer methods is called from that one thread only. The
    tokenizer methods (`encode`, `decode`, `render_chat`) are thread-safe.
    A sequence lives from `add` until `remove`; the engine keeps its KV cache.
    """

    @property
    def context_length(self) -> int: ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends a reply besides EOS (e.g. ``"\\nUser:"`` for the fallback format)."""
        ...

    def on_thread_start(self) -> None:
        """Called once from the scheduler thread before its first `add` (thread set-up)."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, system: str | None, turns: Sequence[ChatTurn]) -> list[int]: ...

    def add(self, requests: Sequence[tuple[int, Sequence[int], SamplingParams]]) -> dict[int, int]:
        """Prefill new sequences `(seq_id, prompt_ids, sampling)` and join them to the
        running batch. Returns each one's first sampled token."""
        ...

    def step(self) -> dict[int, int]:
        """One batched decode step for every active sequence: `seq_id -> next token`."""
        ...

    def remove(self, seq_ids: Sequence[int]) -> None:
        """Drop finished or cancelled sequences and free their cache."""
        ...


# --------------------------------------------------------------------------- platforms


class ReplyTarget(Protocol):
    """Where the answer to one incoming message goes. Built by the adapter per message.

    `send`/`edit` raise `bot.errors.DeliveryError` when the platform will not take the
    message (chat gone, bot blocked, no permission, message deleted); transient errors
    are retried inside the adapter.
    """

    @property
    def max_chars(self) -> int:
        """The platform's length limit for one message."""
        ...

    @property
    def edit_interval(self) -> float:
        """Minimum seconds between two edits of one message."""
        ...

    async def send(self, text: str) -> str:
        """Send a new message; returns its platform id."""
        ...

    async def edit(self, message_id: str, text: str) -> None: ...

    async def typing(self) -> None:
        """Show the typing indicator once (the caller renews it)."""
        ...

    async def sender_is_chat_admin(self) -> bool:
        """Whether the sender administers this chat (Telegram chat admin, Discord
        Manage Server). False in private chats."""
        ...


@runtime_checkable
class IncomingHandler(Protocol):
    async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
        """Handle one message; returns when its reply is complete. Never raises
        `BotError` (users get an explanation instead)."""
        ...

    async def move_chat(self, platform: Platform, old_chat_id: str, new_chat_id: str) -> None:
        """The platform gave a chat a new id (a Telegram group upgraded to a supergroup):
        its conversations go on under the new one. Never raises `BotError`."""
        ...


class Adapter(Protocol):
    """A platform connection. `run` serves until cancelled (or, for the terminal, until
    its input ends) and cleans up after itself either way."""

    name: str

    async def run(self, handler: IncomingHandler) -> None: ...


@dataclass(frozen=True, slots=True)
class CommandInfo:
    """A command for platform menus (Telegram `setMyCommands`, Discord slash commands)."""

    name: str
    description: str
    admin_only: bool
