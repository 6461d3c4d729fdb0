"""The `Protocol`s at the seams, and the plain dataclasses that cross them.

`storage/` implements `Repository`; `bot/model/scheduler.py` implements `ModelBackend` on top of
an `Engine` (`bot/model/hf/`, or a deterministic fake in tests), and `bot/model/remote.py`
implements it with an OpenAI-compatible server; every adapter
implements `ReplyTarget` and `Adapter` and calls a `IncomingHandler`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Literal, Protocol, runtime_checkable

from bot.events import ChatTurn, ConversationKey, IncomingMessage, Platform, Role

SettingValue = str | int | float

# --------------------------------------------------------------------------- storage

MessageStatus = Literal["cut_off", "hidden"]
"""A stored message's mark: "cut_off", a reply stored as the user saw it when it broke
off (shutdown, a model server gone); "hidden", kept but skipped by prompts (the user's
message of a missed turn, a reply that was never delivered)."""

TurnKind = Literal["message", "command"]

TurnState = Literal["pending", "answered", "failed", "missed", "undelivered"]
"""Where an accepted turn stands. "pending": accepted, not answered yet (answered after
a restart); "answered": the reply (or the command's answer) reached the chat, perhaps
cut off; "failed": the user was told it failed; "missed": too old when the bot came
back, and the user was told so; "undelivered": the reply is stored but the platform
did not take it (delivered or told about later)."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    role: Role
    content: str
    token_count: int
    created_at: datetime
    platform_message_id: str | None = None
    status: MessageStatus | None = None


@dataclass(frozen=True, slots=True)
class OpenTurn:
    """An accepted chat turn that still needs work: "pending" (never answered) or
    "undelivered" (its reply, `reply`, never reached the chat). `event` is the message
    as it was accepted; `reply_message_ids` are the reply's messages already shown
    (a restart edits them instead of sending new ones)."""

    id: int
    event: IncomingMessage
    state: TurnState
    accepted_at: datetime
    reply_message_ids: tuple[str, ...] = ()
    reply: str | None = None


@dataclass(frozen=True, slots=True)
class FinishedReply:
    """The reply of a turn, as it is stored when the turn ends."""

    text: str
    token_count: int
    platform_message_ids: tuple[str, ...] = ()
    cut_off: bool = False  # stored as the user saw it, marked "cut_off"
    prompt_tokens: int = 0  # counted into the user's daily usage with `token_count`


@dataclass(frozen=True, slots=True)
class Usage:
    """One user's use on one UTC day, over every chat."""

    day: date
    prompt_tokens: int
    generated_tokens: int
    messages: int


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

    async def ping(self) -> None:
        """Check the database answers (and, for SQLite, that its file is still there).
        Raises `StorageError` when it does not."""
        ...

    # ------------------------------------------------------------------ durable turns

    async def accept_turn(self, event: IncomingMessage, kind: TurnKind, token_count: int) -> int | None:
        """Accept an incoming message, keyed by (platform, chat_id, message_id): store
        the turn ("pending") and, for kind "message", the user's message, in one unit of
        work. Returns the turn id, or None when that key was accepted before (a
        redelivered update: it must not be answered again)."""
        ...

    async def turn_history(self, turn_id: int, limit: int) -> list[StoredMessage]:
        """The newest `limit` messages of the turn's conversation up to and including its
        user message, oldest first, without "hidden" ones: the history its prompt sees."""
        ...

    async def reply_started(self, turn_id: int, platform_message_ids: Sequence[str]) -> None:
        """Record the messages of a reply shown so far, so a restart can edit them."""
        ...

    async def finish_turn(self, turn_id: int, state: TurnState, reply: FinishedReply | None = None) -> None:
        """End (or park) a turn in one unit of work: store `reply` if given (state
        "undelivered": marked "hidden"; `reply.cut_off`: marked "cut_off"), count its
        tokens into the user's daily usage, and set the state. With state "missed" the
        user's message is marked "hidden". A turn whose reply was stored before (an
        undelivered one now delivered) gets no second copy: its reply is un-hidden."""
        ...

    async def open_turns(self, platform: Platform) -> list[OpenTurn]:
        """The platform's turns in state "pending" or "undelivered", oldest first."""
        ...

    # ------------------------------------------------------------------ operator controls

    async def usage(self, platform: Platform, user_id: str, day: date) -> Usage: ...

    async def reset_usage(self, platform: Platform, user_id: str, day: date) -> None: ...

    async def add_block(self, entry: str, created_by: str) -> bool:
        """Block `entry` ("telegram:123", "discord:guild:456", ...). False if it already was."""
        ...

    async def remove_block(self, entry: str) -> bool:
        """Unblock `entry`. False if it was not blocked."""
        ...

    async def blocks(self) -> frozenset[str]:
        """Every entry blocked with `add_block`."""
        ...

    async def get_chat_settings(self, platform: Platform, chat_id: str) -> dict[str, SettingValue]: ...

    async def set_chat_setting(self, platform: Platform, chat_id: str, name: str, value: SettingValue) -> None: ...

    async def clear_chat_settings(self, platform: Platform, chat_id: str) -> None: ...

    async def conversation_messages(self, key: ConversationKey) -> list[StoredMessage]:
        """Every stored message of the conversation, oldest first (for `/export`)."""
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
        """Drop finished or cancelled sequences and free their cache. If this raises,
        every sequence is gone (the batch could not be shrunk)."""
        ...


# --------------------------------------------------------------------------- observing

MessageOutcome = Literal[
    "answered",  # a chat turn's reply reached the chat (perhaps cut off)
    "command",  # a command was answered
    "refused_busy",  # turned away: the bot's queues are full (nothing stored)
    "refused_rate",  # turned away: RATE_LIMIT / CHAT_RATE_LIMIT
    "refused_quota",  # turned away: DAILY_TOKEN_QUOTA used up
    "refused_input",  # turned away: empty, too long or binary
    "blocked",  # ignored: a blocked or not-allowed user or chat, or a chat switched off
    "duplicate",  # a redelivered message, already accepted once
    "failed",  # the model or the database failed; the user was told
    "undelivered",  # the platform did not take the reply (retried or told later)
    "missed",  # accepted before a restart, too old when the bot came back; the user was told
]


class Observer(Protocol):
    """What the bot reports about its work (Prometheus metrics in `bot.metrics`; a
    no-op when metrics are off). Every method is cheap and never raises."""

    def message(self, platform: Platform, outcome: MessageOutcome) -> None:
        """One incoming message ended with `outcome`."""
        ...

    def platform_error(self, platform: Platform, kind: str) -> None:
        """A platform call failed (`kind`: e.g. "timeout", "rate_limited", "server_error",
        "forbidden", "not_found", "network")."""
        ...


class NullObserver:
    """An `Observer` that records nothing."""

    def message(self, platform: Platform, outcome: MessageOutcome) -> None:
        pass

    def platform_error(self, platform: Platform, kind: str) -> None:
        pass


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

    async def send_file(self, filename: str, data: bytes, caption: str) -> str:
        """Send a file attachment (with a short caption); returns the message's id."""
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

    async def submit(self, event: IncomingMessage, target: ReplyTarget) -> Awaitable[None]:
        """Accept one message and return once it is accepted (stored) or turned away
        (refused, a redelivery, a notice sent): an adapter that confirms updates to the
        platform (Telegram's polling offset) confirms only then. The awaitable it
        returns completes with the reply. `handle` is `await (await submit(...))`.
        Never raises `BotError`."""
        ...

    async def recover(self, platform: Platform, make_target: Callable[[IncomingMessage], ReplyTarget]) -> None:
        """Answer the platform's turns accepted before a restart but never answered (or
        not delivered), each through `make_target(event)`; those older than
        `RECOVER_MAX_AGE` are told they were missed. Called by the adapter once it is
        connected (again); returns when they are queued. Never raises `BotError`."""
        ...

    async def move_chat(self, platform: Platform, old_chat_id: str, new_chat_id: str) -> None:
        """The platform gave a chat a new id (a Telegram group upgraded to a supergroup):
        its conversations go on under the new one. Never raises `BotError`."""
        ...


class Adapter(Protocol):
    """A platform connection. `run` serves until cancelled (or, for the terminal, until
    its input ends) and cleans up after itself either way. It raises `ConfigError` for
    what a restart cannot fix (a rejected token); any other error is restarted by the
    composition root with backoff."""

    name: str

    @property
    def connected(self) -> bool:
        """Whether it is receiving messages right now (for `/readyz`)."""
        ...

    async def run(self, handler: IncomingHandler) -> None: ...


@dataclass(frozen=True, slots=True)
class CommandInfo:
    """A command for platform menus (Telegram `setMyCommands`, Discord slash commands)."""

    name: str
    description: str
    admin_only: bool
