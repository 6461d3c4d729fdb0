"""Who may talk to the bot, and how much: the gate every incoming message passes before
anything is stored.

In order: bot admins (`ADMIN_IDS`) pass everything; a blocked user, chat or guild
(`BLOCKED_IDS`, `/block`) or one not in a non-empty `ALLOWED_IDS` is ignored; a chat
switched off (`/config chat set enabled false`) ignores everything but its admins'
commands; `RATE_LIMIT` (per user, over every chat) and `CHAT_RATE_LIMIT` (per chat) are
token buckets; `DAILY_TOKEN_QUOTA` caps the tokens generated for a user per UTC day.

A refusal says what to report (`MessageOutcome`) and, at most once per wait, a short
notice for the user; nothing of a refused message is stored.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Final, Literal

from bot.errors import DeliveryError
from bot.events import IncomingMessage, Platform
from bot.ports import ReplyTarget, Repository, Usage

if TYPE_CHECKING:  # bot.config imports this module's parsers
    from bot.chat.session import SessionStore
    from bot.config import Settings

logger = logging.getLogger(__name__)

ENTRY_PLATFORMS: Final = ("telegram", "discord", "console")

# A user's usage is read from the database at most this often (seconds); in between the
# tokens of turns finished here are added to it (`Policy.charge`). Shorter when other
# processes share the store, since their turns count too.
USAGE_TTL_S: Final = 60.0
USAGE_TTL_SHARED_S: Final = 5.0
# Blocks added by another process sharing the store are seen within this many seconds.
BLOCKS_TTL_SHARED_S: Final = 10.0
# A user over the quota is told so at most this often (seconds).
QUOTA_NOTICE_EVERY_S: Final = 60.0
# Full buckets are dropped once this many exist (a full bucket is a new bucket).
_PRUNE_AT: Final = 4096

_UNITS: Final = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` messages per `period` seconds ("10/minute" → 10 per 60 s)."""

    count: int
    period: float

    @property
    def per_second(self) -> float:
        return self.count / self.period


def parse_rate(raw: str) -> Rate:
    """`"10/minute"`, `"3/second"`, `"100/hour"`, `"5/10s"` → `Rate`. Raises `ValueError`."""
    match = _RATE.match(raw.lower())
    unit = _UNITS.get(match.group(3)) if match else None
    if match is None or unit is None:
        raise ValueError(f"{raw!r} is not like 10/minute, 3/second, 100/hour or 5/10s")
    count, multiple = int(match.group(1)), int(match.group(2) or 1)
    if count < 1 or multiple < 1:
        raise ValueError(f"{raw!r}: the count and the period must be at least 1")
    return Rate(count, multiple * unit)


def parse_entry(raw: str) -> str:
    """An `ALLOWED_IDS` / `BLOCKED_IDS` / `/block` entry in its one written form:
    `telegram:123` (a user), `telegram:chat:-100…` (a chat), `discord:guild:456` (a
    server), `discord:chat:789` (a channel). Raises `ValueError`."""
    parts = [part.strip() for part in raw.strip().split(":")]
    platform = parts[0].lower()
    if platform not in ENTRY_PLATFORMS or len(parts) not in (2, 3):
        raise ValueError(f"entry {raw.strip()!r} is not like telegram:123, telegram:chat:-100123 or discord:guild:456")
    kind = parts[1].lower() if len(parts) == 3 else None
    ident = parts[-1]
    if kind not in (None, "chat", "guild") or (kind == "guild" and platform != "discord"):
        raise ValueError(f"entry {raw.strip()!r}: the middle part is chat (or guild, on discord only)")
    if not ident or any(c.isspace() for c in ident) or ident.lower() in ("chat", "guild"):
        raise ValueError(f"entry {raw.strip()!r} has no id")
    return f"{platform}:{kind}:{ident}" if kind else f"{platform}:{ident}"


def parse_entries(raw: object) -> frozenset[str]:
    """A comma-separated list (or an iterable) of entries, each checked by `parse_entry`."""
    if raw is None or raw == "":
        return frozenset()
    items: Iterable[object] = raw.split(",") if isinstance(raw, str) else raw  # type: ignore[assignment]
    return frozenset(parse_entry(str(item)) for item in items if str(item).strip())


def entries_of(event: IncomingMessage) -> tuple[str, ...]:
    """The entries that name the sender, the chat (and, in a Telegram forum, the group
    its topic belongs to) and the Discord server of a message."""
    found = [f"{event.platform}:{event.user_id}", f"{event.platform}:chat:{event.chat_id}"]
    group, slash, _topic = event.chat_id.partition("/")
    if slash:
        found.append(f"{event.platform}:chat:{group}")
    if event.guild_id:
        found.append(f"{event.platform}:guild:{event.guild_id}")
    return tuple(found)


# --------------------------------------------------------------------------- the bucket


class TokenBucket:
    """`rate.count` messages at once, refilled at `rate.per_second`.

    Our own rather than `aiolimiter`'s: the gate must never wait (a refused message is
    answered at once, with how long to wait), and tests drive the clock; aiolimiter's
    limiter waits in `acquire()` and reads the event loop's clock."""

    __slots__ = ("_capacity", "_rate", "_stamp", "_tokens", "notified_until")

    def __init__(self, rate: Rate, now: float) -> None:
        self._capacity = float(rate.count)
        self._rate = rate.per_second
        self._tokens = self._capacity
        self._stamp = now
        self.notified_until = float("-inf")  # the user was told to wait until then

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now

    def wait(self, now: float) -> float:
        """Seconds until one message is allowed (0 when it is now)."""
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self._rate

    def take(self) -> None:
        """Use one message; only after `wait` returned 0."""
        self._tokens -= 1.0

    def full(self, now: float) -> bool:
        self._refill(now)
        return self._tokens >= self._capacity


class _Buckets:
    """One bucket per key, made on first use; full ones are pruned now and then."""

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._buckets: dict[str, TokenBucket] = {}

    def get(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
            bucket = self._buckets[key] = TokenBucket(self.rate, now)
        return bucket


def format_wait(seconds: float) -> str:
    """`40 s`, `3 min`, `2 h 5 min` (rounded up: never too early)."""
    whole = max(1, int(-(-seconds // 1)))
    if whole < 90:
        return f"{whole} s"
    minutes = -(-whole // 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


# --------------------------------------------------------------------------- the gate

RefusalOutcome = Literal["refused_rate", "refused_quota", "blocked"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message turned away: the outcome to report and what to tell the user (None:
    nothing, e.g. a blocked user, or a notice already given for this wait)."""

    outcome: RefusalOutcome
    notice: str | None = None


@dataclass(slots=True)
class _Spent:
    day: date
    tokens: int
    read_at: float


class Policy:
    """The gate (see the module docstring). One per manager; `clock` is monotonic
    seconds (the buckets), `now` the wall clock (the UTC day of the quota)."""

    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        sessions: SessionStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._repo = repository
        self._sessions = sessions
        self._clock = clock
        self._now = now
        self._users = _Buckets(settings.rate_limit) if settings.rate_limit else None
        self._chats = _Buckets(settings.chat_rate_limit) if settings.chat_rate_limit else None
        self._stored_blocks: frozenset[str] | None = None
        self._blocks_read_at = 0.0
        self._spent: dict[tuple[Platform, str], _Spent] = {}
        self._quota_noticed: dict[tuple[Platform, str], float] = {}
        self._usage_ttl = USAGE_TTL_SHARED_S if repository.shared else USAGE_TTL_S

    @property
    def quota(self) -> int | None:
        """`DAILY_TOKEN_QUOTA`: generated tokens per user per UTC day (None: no quota)."""
        return self._settings.daily_token_quota

    def today(self) -> date:
        return self._now().astimezone(UTC).date()

    def until_tomorrow(self) -> float:
        """Seconds until the next UTC day (when quotas start again)."""
        now = self._now().astimezone(UTC)
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        return (midnight - now).total_seconds()

    # ------------------------------------------------------------------ the check

    async def refuses(self, event: IncomingMessage, target: ReplyTarget, *, command: bool) -> RefusalOutcome | None:
        """The manager's gate: None when the message may go on; otherwise the outcome to
        report, once the user got the refusal's notice (if it has one). Raises
        `StorageError` when the database cannot say (usage, blocks, chat settings)."""
        refusal = await self.check(event, target, command=command)
        if refusal is None:
            return None
        if refusal.notice is not None:
            try:
                await target.send(refusal.notice)
            except DeliveryError as exc:
                logger.warning("could not deliver a notice to %s: %s", event.sender, exc)
        return refusal.outcome

    async def check(self, event: IncomingMessage, target: ReplyTarget, *, command: bool) -> Refusal | None:
        """None when the message may go on; otherwise why not. `command`: the message is
        a command (commands are not held to the quota, and a chat's admins may still
        run them where the bot is switched off)."""
        if self._settings.is_admin(event.sender):
            return None
        entries = entries_of(event)
        blocked = await self._blocked()
        if any(e in self._settings.blocked_ids or e in blocked for e in entries):
            logger.debug("ignored a message from blocked %s", event.sender)
            return Refusal("blocked")
        allowed = self._settings.allowed_ids
        if allowed and not any(e in allowed for e in entries):
            logger.debug("ignored a message from %s (not in ALLOWED_IDS)", event.sender)
            return Refusal("blocked")
        if not await self._sessions.chat_enabled(event.platform, event.chat_id) and not (
            command and not event.is_private and await target.sender_is_chat_admin()
        ):
            return Refusal("blocked")
        refused = self._take(event)
        if refused is None and not command:
            refused = await self._check_quota(event)
        return refused

    def _take(self, event: IncomingMessage) -> Refusal | None:
        """One message from the sender's and the chat's buckets, or why not."""
        if self._users is None and self._chats is None:
            return None
        now = self._clock()
        user = self._users.get(event.sender, now) if self._users is not None else None
        chat = self._chats.get(f"{event.platform}:{event.chat_id}", now) if self._chats is not None else None
        for bucket, whose in ((user, "you"), (chat, "this chat")):
            if bucket is None:
                continue
            wait = bucket.wait(now)
            if wait > 0:
                # One notice per wait: the messages sent meanwhile get none.
                if now < bucket.notified_until:
                    return Refusal("refused_rate")
                bucket.notified_until = now + wait
                logger.info(
                    "rate limit: %s in %s:%s must wait %.1f s", event.sender, event.platform, event.chat_id, wait
                )
                too_many = "You're sending" if whose == "you" else "This chat is sending"
                return Refusal(
                    "refused_rate", f"{too_many} messages too fast: slow down, try again in {format_wait(wait)}."
                )
        for bucket in (user, chat):
            if bucket is not None:
                bucket.take()
        return None

    # ------------------------------------------------------------------ quota

    async def _check_quota(self, event: IncomingMessage) -> Refusal | None:
        quota = self.quota
        if quota is None:
            return None
        spent = await self.spent_today(event.platform, event.user_id)
        if spent < quota:
            return None
        who = (event.platform, event.user_id)
        now = self._clock()
        if now < self._quota_noticed.get(who, float("-inf")):
            return Refusal("refused_quota")
        if len(self._quota_noticed) >= _PRUNE_AT:
            self._quota_noticed = {k: until for k, until in self._quota_noticed.items() if until > now}
        self._quota_noticed[who] = now + QUOTA_NOTICE_EVERY_S
        logger.info("daily quota: %s has used %d of %d tokens", event.sender, spent, quota)
        return Refusal(
            "refused_quota",
            f"You've used your {quota} tokens for today. The quota starts again at 00:00 UTC "
            f"(in {format_wait(self.until_tomorrow())}).",
        )

    async def spent_today(self, platform: Platform, user_id: str) -> int:
        """Tokens generated for the user today (UTC): read from the database at most every
        `USAGE_TTL_S`, plus what turns finished here since (`charge`)."""
        who, today, now = (platform, user_id), self.today(), self._clock()
        spent = self._spent.get(who)
        if spent is None or spent.day != today or now - spent.read_at >= self._usage_ttl:
            usage = await self._repo.usage(platform, user_id, today)
            spent = self._spent[who] = _Spent(today, usage.generated_tokens, now)
            if len(self._spent) > _PRUNE_AT:
                self._spent = {k: v for k, v in self._spent.items() if now - v.read_at < self._usage_ttl}
        return spent.tokens

    def charge(self, platform: Platform, user_id: str, generated_tokens: int) -> None:
        """A turn of the user finished here with `generated_tokens` (already stored by the
        repository's `finish_turn`): count them until the usage is read again."""
        spent = self._spent.get((platform, user_id))
        if spent is not None and spent.day == self.today():
            spent.tokens += generated_tokens

    async def usage(self, platform: Platform, user_id: str) -> Usage:
        """The user's use today (UTC), from the database."""
        return await self._repo.usage(platform, user_id, self.today())

    async def reset_usage(self, platform: Platform, user_id: str) -> None:
        """Forget the user's use today: the quota starts again at once."""
        await self._repo.reset_usage(platform, user_id, self.today())
        self._spent.pop((platform, user_id), None)
        self._quota_noticed.pop((platform, user_id), None)

    # ------------------------------------------------------------------ blocks

    async def _blocked(self) -> frozenset[str]:
        """The entries blocked with `/block`, read once (and, when other processes share
        the store, again every `BLOCKS_TTL_SHARED_S`)."""
        now = self._clock()
        if self._stored_blocks is None or (self._repo.shared and now - self._blocks_read_at >= BLOCKS_TTL_SHARED_S):
            self._stored_blocks = await self._repo.blocks()
            self._blocks_read_at = now
        return self._stored_blocks

    async def block(self, entry: str, by: str) -> bool:
        """Block `entry` (as `parse_entry` writes it) from now on; False if it already was."""
        added = await self._repo.add_block(entry, by)
        self._stored_blocks = (await self._blocked()) | {entry}
        return added

    async def unblock(self, entry: str) -> bool:
        """Unblock `entry`; False if `/block` had not blocked it."""
        removed = await self._repo.remove_block(entry)
        self._stored_blocks = (await self._blocked()) - {entry}
        return removed

    def configured_block(self, entry: str) -> bool:
        """Whether `BLOCKED_IDS` names `entry` (`/unblock` cannot lift that)."""
        return entry in self._settings.blocked_ids
