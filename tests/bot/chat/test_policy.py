"""The gate of bot/chat/policy.py on the real repository (SQLite), with clocks the tests
drive: rate-limit and quota boundaries, blocks and allow lists, the chat-wide switch,
and the settings that configure them."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, update

from bot.chat.policy import Policy, Rate, format_wait, parse_entry, parse_rate
from bot.chat.session import SessionStore
from bot.config import load_settings
from bot.errors import ConfigError
from bot.events import IncomingMessage
from storage.models import DailyUsage
from tests.conftest import Harness, run_bot_process
from tests.fakes.events import incoming
from tests.fakes.targets import RecordingTarget


class Clocks:
    """A monotonic clock and a wall clock that only move when told to."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = datetime(2026, 12, 3, 23, 0, tzinfo=UTC)

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += timedelta(seconds=seconds)


def make_policy(harness: Harness, clocks: Clocks, **settings: Any) -> Policy:
    config = harness.settings(**settings)
    sessions = SessionStore(config.session_defaults(), harness.repo)
    return Policy(config, harness.repo, sessions, clock=lambda: clocks.mono, now=lambda: clocks.wall)


def msg(user: str = "u1", chat: str = "g1", text: str = "hello", **kwargs: Any) -> IncomingMessage:
    return incoming(text, user=user, chat=chat, private=False, **kwargs)


async def outcomes(policy: Policy, *events: IncomingMessage, command: bool = False) -> list[str | None]:
    target = RecordingTarget()
    return [await policy.refuses(event, target, command=command) for event in events]


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("raw", "rate"),
    [("10/minute", Rate(10, 60)), ("3/second", Rate(3, 1)), ("100 / hour", Rate(100, 3600)), ("5/10s", Rate(5, 10))],
)
def test_rates_parse(raw: str, rate: Rate) -> None:
    assert parse_rate(raw) == rate


@pytest.mark.parametrize("raw", ["10", "ten/minute", "10/fortnight", "0/minute", "5/0s", "-1/second", "/minute"])
def test_bad_rates_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match=r"minute|at least 1"):
        parse_rate(raw)


@pytest.mark.parametrize(
    ("raw", "entry"),
    [
        ("telegram:123", "telegram:123"),
        (" Telegram : chat : -100123 ", "telegram:chat:-100123"),
        ("discord:guild:456", "discord:guild:456"),
        ("discord:CHAT:789", "discord:chat:789"),
    ],
)
def test_entries_have_one_written_form(raw: str, entry: str) -> None:
    assert parse_entry(raw) == entry


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("RATE_LIMIT", "lots"),
        ("RATE_LIMIT", "0/minute"),
        ("CHAT_RATE_LIMIT", "10/fortnight"),
        ("DAILY_TOKEN_QUOTA", "many"),
        ("DAILY_TOKEN_QUOTA", "0"),
        ("ALLOWED_IDS", "telegram:guild:1"),
        ("ALLOWED_IDS", "123"),
        ("BLOCKED_IDS", "slack:1"),
        ("BLOCKED_IDS", "telegram:1,discord:chat:"),
    ],
)
def test_a_bad_value_of_every_new_setting_is_one_config_error_naming_it(
    setting: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(setting, value)
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=None)
    assert info.value.setting == setting
    assert "\n" not in str(info.value)


def test_the_new_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "RATE_LIMIT": "10/minute",
        "CHAT_RATE_LIMIT": "30/minute",
        "DAILY_TOKEN_QUOTA": "5000",
        "ALLOWED_IDS": "telegram:chat:-100123, discord:guild:456",
        "BLOCKED_IDS": "telegram:666",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(_env_file=None)
    assert settings.rate_limit == Rate(10, 60) and settings.chat_rate_limit == Rate(30, 60)
    assert settings.daily_token_quota == 5000
    assert settings.allowed_ids == {"telegram:chat:-100123", "discord:guild:456"}
    assert settings.blocked_ids == {"telegram:666"}
    monkeypatch.setenv("RATE_LIMIT", "")  # empty = off
    assert load_settings(_env_file=None).rate_limit is None


def test_waits_are_written_rounded_up() -> None:
    assert [format_wait(s) for s in (0.2, 40, 40.01, 89, 90, 3600, 7322)] == [
        "1 s",
        "40 s",
        "41 s",
        "89 s",
        "2 min",
        "60 min",
        "2 h 3 min",
    ]


# --------------------------------------------------------------------------- rate limits


async def test_user_rate_limit_boundaries_and_one_notice_per_wait(harness: Harness) -> None:
    clocks = Clocks()
    policy = make_policy(harness, clocks, rate_limit="3/minute")  # one message back every 20 s
    target = RecordingTarget()

    async def send() -> str | None:
        return await policy.refuses(msg(), target, command=False)

    assert [await send() for _ in range(3)] == [None, None, None]  # the burst
    assert await send() == "refused_rate"
    assert target.messages == ["You're sending messages too fast: slow down, try again in 20 s."]
    clocks.advance(10)
    assert await send() == "refused_rate"  # the same wait: no second notice
    clocks.advance(9.9)
    assert await send() == "refused_rate"
    assert len(target.messages) == 1
    clocks.advance(0.1)  # 20 s after the refusal: one message is allowed again
    assert await send() is None
    assert await send() == "refused_rate"  # a new wait: a new notice
    assert target.messages[1] == "You're sending messages too fast: slow down, try again in 20 s."
    clocks.advance(60)  # the bucket fills up to the burst again, no more
    assert [await send() for _ in range(4)] == [None, None, None, "refused_rate"]


async def test_the_user_limit_counts_over_every_chat_and_the_chat_limit_over_every_user(harness: Harness) -> None:
    clocks = Clocks()
    users_only = make_policy(harness, clocks, rate_limit="2/minute")
    assert await outcomes(users_only, msg(chat="a"), msg(chat="b"), msg(chat="c"), msg(user="u2", chat="a")) == [
        None,
        None,
        "refused_rate",
        None,
    ]
    chats_only = make_policy(harness, clocks, chat_rate_limit="2/minute")
    assert await outcomes(chats_only, msg(user="a"), msg(user="b"), msg(user="c"), msg(user="a", chat="g2")) == [
        None,
        None,
        "refused_rate",
        None,
    ]


async def test_a_chat_refusal_does_not_use_up_the_users_own_allowance(harness: Harness) -> None:
    clocks = Clocks()
    policy = make_policy(harness, clocks, rate_limit="2/minute", chat_rate_limit="1/minute")
    target = RecordingTarget()
    assert await policy.refuses(msg(user="u2"), target, command=False) is None  # the chat's one message
    assert await policy.refuses(msg(), target, command=False) == "refused_rate"
    assert target.messages == ["This chat is sending messages too fast: slow down, try again in 60 s."]
    # u1's own bucket was not touched: two messages elsewhere still pass.
    assert await outcomes(policy, msg(chat="other"), msg(chat="other2")) == [None, None]


async def test_bot_admins_are_exempt_from_every_control(harness: Harness) -> None:
    clocks = Clocks()
    policy = make_policy(
        harness,
        clocks,
        rate_limit="1/minute",
        chat_rate_limit="1/minute",
        daily_token_quota=1,
        allowed_ids="telegram:someone_else",
        blocked_ids="telegram:chat:g1",
    )
    await harness.repo.set_chat_setting("telegram", "g1", "enabled", 0)
    assert await outcomes(policy, *(msg(user="admin") for _ in range(5))) == [None] * 5


# --------------------------------------------------------------------------- quota


async def set_usage(harness: Harness, user: str, day: date, generated: int) -> None:
    async with harness.db.begin() as connection:
        updated = await connection.execute(
            update(DailyUsage)
            .where(DailyUsage.platform == "telegram", DailyUsage.user_id == user, DailyUsage.day == day)
            .values(generated_tokens=generated)
        )
        if updated.rowcount == 0:
            await connection.execute(
                insert(DailyUsage).values(
                    platform="telegram", user_id=user, day=day, prompt_tokens=0, generated_tokens=generated, messages=1
                )
            )


async def test_quota_boundary_charges_commands_and_the_next_utc_day(harness: Harness) -> None:
    clocks = Clocks()  # 23:00 UTC
    policy = make_policy(harness, clocks, daily_token_quota=100)
    today = clocks.wall.date()
    await set_usage(harness, "u1", today, 99)
    target = RecordingTarget()
    assert await policy.refuses(msg(), target, command=False) is None  # 99 < 100
    policy.charge("telegram", "u1", 1)  # the turn's reply was stored with 1 token
    assert await policy.refuses(msg(), target, command=False) == "refused_quota"
    assert target.messages == [
        "You've used your 100 tokens for today. The quota starts again at 00:00 UTC (in 60 min)."
    ]
    assert await policy.refuses(msg(), target, command=False) == "refused_quota"
    assert len(target.messages) == 1  # told once, not once per message
    assert await policy.refuses(msg(text="/usage"), target, command=True) is None  # commands still work
    assert await policy.refuses(msg(user="u2"), target, command=False) is None  # others are not affected
    clocks.advance(3600)  # 00:00 UTC: a new day, a new quota
    assert await policy.refuses(msg(), target, command=False) is None


async def test_usage_written_elsewhere_is_read_again_after_the_ttl(harness: Harness) -> None:
    clocks = Clocks()
    policy = make_policy(harness, clocks, daily_token_quota=50)
    today = clocks.wall.date()
    assert await outcomes(policy, msg()) == [None]
    await set_usage(harness, "u1", today, 50)  # e.g. turns answered before a restart
    assert await outcomes(policy, msg()) == [None]  # the cached reading
    clocks.advance(60)
    assert await outcomes(policy, msg()) == ["refused_quota"]
    await policy.reset_usage("telegram", "u1")
    assert (await policy.usage("telegram", "u1")).generated_tokens == 0
    assert await outcomes(policy, msg()) == [None]


# --------------------------------------------------------------------------- blocks and allow lists


async def test_blocked_ids_name_users_chats_forum_groups_and_guilds(harness: Harness) -> None:
    policy = make_policy(
        harness, Clocks(), blocked_ids="telegram:bad,telegram:chat:-100,discord:guild:77,discord:chat:55"
    )
    guild_member = dataclasses.replace(msg(user="x", chat="1"), platform="discord", guild_id="77")
    assert await outcomes(
        policy,
        msg(user="bad"),
        msg(user="bad", chat="elsewhere"),
        msg(chat="-100"),
        msg(chat="-100/42"),  # a topic of the blocked forum
        guild_member,
        dataclasses.replace(guild_member, guild_id="78"),
        dataclasses.replace(msg(user="y", chat="55"), platform="discord"),
        msg(user="good"),
        msg(user="bad", platform="discord"),  # the same id on another platform is someone else
    ) == ["blocked", "blocked", "blocked", "blocked", "blocked", None, "blocked", None, None]


async def test_a_stored_block_is_effective_at_once_and_unblock_lifts_it(harness: Harness) -> None:
    clocks = Clocks()
    policy = make_policy(harness, clocks)
    target = RecordingTarget()
    assert await outcomes(policy, msg(user="troll")) == [None]
    assert await policy.block("telegram:troll", "telegram:admin") is True
    assert await policy.block("telegram:troll", "telegram:admin") is False
    assert await policy.refuses(msg(user="troll"), target, command=True) == "blocked"
    assert target.messages == []  # a blocked user gets no answer at all
    assert await harness.repo.blocks() == {"telegram:troll"}
    # A new gate (a restart) reads the stored blocks.
    assert await outcomes(make_policy(harness, clocks), msg(user="troll")) == ["blocked"]
    assert await policy.unblock("telegram:troll") is True
    assert await outcomes(policy, msg(user="troll")) == [None]


async def test_a_non_empty_allow_list_admits_only_the_users_chats_and_guilds_it_names(harness: Harness) -> None:
    policy = make_policy(harness, Clocks(), allowed_ids="telegram:friend,telegram:chat:-100,discord:guild:77")
    in_guild = dataclasses.replace(msg(user="x", chat="5"), platform="discord", guild_id="77")
    assert await outcomes(
        policy,
        msg(user="friend", chat="anywhere"),
        msg(user="stranger", chat="-100"),
        msg(user="stranger", chat="-100/9"),
        in_guild,
        msg(user="stranger"),
        dataclasses.replace(in_guild, guild_id=None, chat_id="dm"),
    ) == [None, None, None, None, "blocked", "blocked"]


# --------------------------------------------------------------------------- the chat-wide switch


async def test_a_switched_off_chat_ignores_all_but_its_admins_commands(harness: Harness) -> None:
    policy = make_policy(harness, Clocks())
    await harness.repo.set_chat_setting("telegram", "g1", "enabled", 0)
    member, chat_admin = RecordingTarget(), RecordingTarget(chat_admin=True)
    assert await policy.refuses(msg(), member, command=False) == "blocked"
    assert await policy.refuses(msg(text="/help"), member, command=True) == "blocked"
    assert await policy.refuses(msg(), chat_admin, command=False) == "blocked"  # chatting stays off for them too
    assert await policy.refuses(msg(text="/config chat set enabled true"), chat_admin, command=True) is None
    assert await policy.refuses(msg(chat="g2"), member, command=False) is None  # other chats answer
    assert member.messages == [] and chat_admin.messages == []


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("RATE_LIMIT", "lots"),
        ("CHAT_RATE_LIMIT", "1/fortnight"),
        ("DAILY_TOKEN_QUOTA", "-5"),
        ("ALLOWED_IDS", "telegram:guild:1"),
        ("BLOCKED_IDS", "nobody"),
    ],
)
def test_the_bot_process_stops_at_start_up_with_one_line_naming_the_setting(
    tmp_path: Path, setting: str, value: str
) -> None:
    proc = run_bot_process(
        tmp_path, "", {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", setting: value}, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and setting in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
