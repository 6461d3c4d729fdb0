"""The fake Discord's world: users, guilds, roles, channels and messages, as Discord
stores them and sends them in its payloads. No network here: the gateway and REST
modules serve it, and a test can build payloads from it without starting anything."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

Json = dict[str, Any]

DISCORD_EPOCH_MS = 1420070400000

# Permission bits (https://discord.com/developers/docs/topics/permissions)
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
READ_MESSAGE_HISTORY = 1 << 16
SEND_MESSAGES_IN_THREADS = 1 << 38
MANAGE_GUILD = 1 << 5
ADMINISTRATOR = 1 << 3
EVERYONE_PERMISSIONS = VIEW_CHANNEL | SEND_MESSAGES | READ_MESSAGE_HISTORY | SEND_MESSAGES_IN_THREADS

CHANNEL_TEXT = 0
CHANNEL_DM = 1
CHANNEL_PUBLIC_THREAD = 11

MESSAGE_DEFAULT = 0
MESSAGE_REPLY = 19

_MENTION = re.compile(r"<@!?(\d+)>")


def iso(ts: float) -> str:
    """A Unix time as Discord writes timestamps."""
    return datetime.fromtimestamp(ts, UTC).isoformat()


class Snowflakes:
    """Real-looking snowflakes (time in the high bits), so `created_at` works."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def next(self) -> int:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (next(self._counter) & 0x3FFFFF)


@dataclass(eq=False)
class FakeUser:
    id: int
    username: str
    bot: bool = False

    def payload(self) -> Json:
        return {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": self.username.title(),
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"


@dataclass(eq=False)
class FakeRole:
    id: int
    name: str
    permissions: int
    position: int

    def payload(self) -> Json:
        return {
            "id": str(self.id),
            "name": self.name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }


@dataclass(eq=False)
class FakeChannel:
    id: int
    type: int
    name: str
    guild: FakeGuild | None = None
    parent: FakeChannel | None = None
    recipient: FakeUser | None = None

    def payload(self) -> Json:
        data: Json = {"id": str(self.id), "type": self.type, "name": self.name, "flags": 0}
        if self.type == CHANNEL_DM:
            assert self.recipient is not None
            data.update(recipients=[self.recipient.payload()], last_message_id=None)
            del data["name"]
            return data
        assert self.guild is not None
        data.update(
            guild_id=str(self.guild.id),
            position=0,
            permission_overwrites=[],
            nsfw=False,
            topic=None,
            rate_limit_per_user=0,
            last_message_id=None,
        )
        if self.type == CHANNEL_PUBLIC_THREAD:
            assert self.parent is not None
            data.update(
                parent_id=str(self.parent.id),
                owner_id=str(self.guild.owner.id),
                message_count=0,
                member_count=1,
                thread_metadata={
                    "archived": False,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": iso(time.time()),
                    "locked": False,
                },
            )
            del data["permission_overwrites"]
        return data


@dataclass(eq=False)
class FakeGuild:
    id: int
    name: str
    owner: FakeUser
    roles: list[FakeRole] = field(default_factory=list)
    channels: list[FakeChannel] = field(default_factory=list)
    threads: list[FakeChannel] = field(default_factory=list)
    members: dict[int, tuple[FakeUser, list[FakeRole]]] = field(default_factory=dict)

    def member_payload(self, user: FakeUser, *, with_user: bool = True) -> Json:
        roles = self.members[user.id][1] if user.id in self.members else []
        data: Json = {
            "roles": [str(r.id) for r in roles],
            "nick": None,
            "avatar": None,
            "joined_at": iso(time.time() - 86400),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
        }
        if with_user:
            data["user"] = user.payload()
        return data

    def permissions_of(self, user: FakeUser) -> int:
        if user.id == self.owner.id:
            return (1 << 53) - 1
        value = 0
        for role in [self.roles[0], *self.members.get(user.id, (user, []))[1]]:
            value |= role.permissions
        return (1 << 53) - 1 if value & ADMINISTRATOR else value

    def payload(self) -> Json:
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": str(self.owner.id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": [r.payload() for r in self.roles],
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "vanity_url_code": None,
            "description": None,
            "banner": None,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "joined_at": iso(time.time() - 86400),
            "large": False,
            "unavailable": False,
            "member_count": len(self.members),
            "voice_states": [],
            "members": [self.member_payload(u) for u, _ in self.members.values()],
            "channels": [c.payload() for c in self.channels],
            "threads": [t.payload() for t in self.threads],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }


@dataclass(eq=False)
class FakeInteraction:
    """A slash command a user ran, and what the bot answered."""

    id: int
    token: str
    user: FakeUser
    channel: FakeChannel
    name: str
    callbacks: list[Json] = field(default_factory=list)
    original: Json | None = None
    followups: list[Json] = field(default_factory=list)

    @property
    def responses(self) -> list[Json]:
        """The messages the user sees: the original response, then followups."""
        return ([self.original] if self.original is not None else []) + self.followups


@dataclass(eq=False)
class FakeAttachment:
    filename: str
    data: bytes
    content_type: str | None = None


@dataclass(frozen=True)
class FakeUpload:
    """A file the bot sent: in a channel message, or in a slash command's answer."""

    channel_id: int
    message_id: int
    filename: str
    data: bytes
    content: str
    ephemeral: bool

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")


class FakeWorld:
    """Everything the fake Discord knows. `FakeDiscordServer` is one, served over HTTP."""

    def __init__(self) -> None:
        self.token = "fake-bot-token.abc.def"
        self.message_content_enabled = True
        """False: IDENTIFY with the Message Content intent is closed with 4014, as when
        the intent is not enabled in the developer portal."""
        self.ids = Snowflakes()
        self.bot = FakeUser(self.ids.next(), "llmbot", bot=True)
        self.application_id = self.ids.next()
        self.owner = FakeUser(self.ids.next(), "appowner")
        self.users: dict[int, FakeUser] = {self.bot.id: self.bot}
        self.guilds: list[FakeGuild] = []
        self.channels: dict[int, FakeChannel] = {}
        self.messages: dict[int, Json] = {}
        self.deleted: set[int] = set()
        self.attachments: dict[int, bytes] = {}
        self.interactions: dict[int, FakeInteraction] = {}
        self.synced_commands: list[Json] | None = None
        self.sync_without_ids = False
        """True: the command sync answers without the commands' ids (a Discord-compatible
        server that does not quite follow Discord)."""
        self.uploads: list[FakeUpload] = []
        self.cdn_base = "http://127.0.0.1:0"
        """Where attachments are downloaded from (the server sets it when it starts)."""

    def add_user(self, name: str, *, bot: bool = False) -> FakeUser:
        user = FakeUser(self.ids.next(), name, bot=bot)
        self.users[user.id] = user
        return user

    def add_guild(self, name: str = "Test Server", owner: FakeUser | None = None) -> FakeGuild:
        owner = owner or self.add_user("guildowner")
        guild = FakeGuild(self.ids.next(), name, owner)
        guild.roles.append(FakeRole(guild.id, "@everyone", EVERYONE_PERMISSIONS, 0))
        self.guilds.append(guild)
        self.add_member(guild, owner)
        self.add_member(guild, self.bot)
        return guild

    def add_role(self, guild: FakeGuild, name: str, permissions: int) -> FakeRole:
        role = FakeRole(self.ids.next(), name, permissions, len(guild.roles))
        guild.roles.append(role)
        return role

    def add_member(self, guild: FakeGuild, user: FakeUser, roles: Sequence[FakeRole] = ()) -> None:
        guild.members[user.id] = (user, list(roles))

    def add_text_channel(self, guild: FakeGuild, name: str) -> FakeChannel:
        channel = FakeChannel(self.ids.next(), CHANNEL_TEXT, name, guild=guild)
        guild.channels.append(channel)
        self.channels[channel.id] = channel
        return channel

    def add_thread(self, parent: FakeChannel, name: str) -> FakeChannel:
        assert parent.guild is not None
        thread = FakeChannel(self.ids.next(), CHANNEL_PUBLIC_THREAD, name, guild=parent.guild, parent=parent)
        parent.guild.threads.append(thread)
        self.channels[thread.id] = thread
        return thread

    def dm_channel(self, user: FakeUser) -> FakeChannel:
        for channel in self.channels.values():
            if channel.type == CHANNEL_DM and channel.recipient is user:
                return channel
        channel = FakeChannel(self.ids.next(), CHANNEL_DM, "", recipient=user)
        self.channels[channel.id] = channel
        return channel

    def message_payload(
        self,
        channel: FakeChannel,
        author: FakeUser,
        content: str,
        *,
        reference: Json | None = None,
        ping_reply: bool = True,
        attachments: Sequence[FakeAttachment] = (),
        flags: int = 0,
        gateway: bool = False,
    ) -> Json:
        """A message object as Discord sends it (`gateway=True` adds guild_id and member)."""
        message_id = self.ids.next()
        mentioned = [self.users[int(m)] for m in _MENTION.findall(content) if int(m) in self.users]
        replied_author: FakeUser | None = None
        if reference is not None and ping_reply:
            replied_author = self.users.get(int(reference["author"]["id"]))
            if replied_author is not None and replied_author not in mentioned:
                mentioned.append(replied_author)
        guild = channel.guild
        data: Json = {
            "id": str(message_id),
            "channel_id": str(channel.id),
            "author": author.payload(),
            "content": content,
            "timestamp": iso(time.time()),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [
                {**u.payload(), **({"member": guild.member_payload(u, with_user=False)} if guild and gateway else {})}
                for u in mentioned
            ],
            "mention_roles": [],
            "attachments": [self._attachment_payload(channel, a) for a in attachments],
            "embeds": [],
            "pinned": False,
            "type": MESSAGE_REPLY if reference is not None else MESSAGE_DEFAULT,
            "flags": flags,
            "components": [],
        }
        if reference is not None:
            data["message_reference"] = {
                "type": 0,
                "message_id": reference["id"],
                "channel_id": reference["channel_id"],
                **({"guild_id": str(guild.id)} if guild else {}),
            }
            data["referenced_message"] = None if int(reference["id"]) in self.deleted else reference
        if guild is not None and gateway:
            data["guild_id"] = str(guild.id)
            data["member"] = guild.member_payload(author, with_user=False)
        return data

    def _attachment_payload(self, channel: FakeChannel, attachment: FakeAttachment) -> Json:
        attachment_id = self.ids.next()
        self.attachments[attachment_id] = attachment.data
        url = f"{self.cdn_base}/attachments/{channel.id}/{attachment_id}/{attachment.filename}"
        data: Json = {
            "id": str(attachment_id),
            "filename": attachment.filename,
            "size": len(attachment.data),
            "url": url,
            "proxy_url": url,
        }
        if attachment.content_type is not None:
            data["content_type"] = attachment.content_type
        return data

    def bot_messages(self, channel: FakeChannel) -> list[Json]:
        """The bot's messages in `channel` that still exist, oldest first, as edited."""
        return [
            m
            for mid, m in self.messages.items()
            if m["channel_id"] == str(channel.id) and m["author"]["id"] == str(self.bot.id) and mid not in self.deleted
        ]

    def bot_texts(self, channel: FakeChannel) -> list[str]:
        return [m["content"] for m in self.bot_messages(channel)]
