"""The slash commands: one app command per core command, each standing for the text
command the core parses (`/config set temperature 0.5`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import discord
from discord import app_commands

from bot.chat.session import CHAT_SETTINGS, SESSION_SETTINGS
from bot.ports import CommandInfo

SlashDispatch = Callable[[discord.Interaction[Any], str], Awaitable[None]]
"""Called with the interaction and the text command it stands for."""

_Builder = Callable[[CommandInfo, SlashDispatch], app_commands.Command[Any, Any, None] | app_commands.Group]


def _named(user: discord.abc.User | None) -> list[str]:
    """The text command's argument for a `user` option: the id, or nothing."""
    return [str(user.id)] if user is not None else []


def _description(info: CommandInfo) -> str:
    # Discord refuses descriptions over 100 characters.
    text = info.description.strip() or info.name
    return text if len(text) <= 100 else text[:99] + "…"


def build_command_tree(
    tree: app_commands.CommandTree[Any], commands: Sequence[CommandInfo], dispatch: SlashDispatch
) -> None:
    """Add a slash command for each of the core's commands; each one calls `dispatch`
    with the text command it stands for.

    Commands that take arguments (`/reset`, `/config`, `/usage`, `/export`, `/block`,
    `/unblock`) get options; any other command is a plain `/name`. The options only
    spell the text command: the core checks it (and who may run it) as it checks a
    typed one."""
    builders: dict[str, _Builder] = {
        "reset": _reset_command,
        "config": _config_group,
        "usage": _usage_command,
        "export": _export_command,
        "block": _block_command,
        "unblock": _block_command,
    }
    for info in commands:
        tree.add_command(builders.get(info.name, _plain_command)(info, dispatch))


def _plain_command(info: CommandInfo, dispatch: SlashDispatch) -> app_commands.Command[Any, Any, None]:
    text = f"/{info.name}"

    async def callback(interaction: discord.Interaction[Any]) -> None:
        await dispatch(interaction, text)

    return app_commands.Command(name=info.name, description=_description(info), callback=callback)


def _reset_command(info: CommandInfo, dispatch: SlashDispatch) -> app_commands.Command[Any, Any, None]:
    @app_commands.describe(
        user="Admins: reset this user's conversation in this channel",
        whole_channel="Admins: reset every conversation in this channel",
    )
    async def callback(
        interaction: discord.Interaction[Any], user: discord.User | None = None, whole_channel: bool = False
    ) -> None:
        args = _named(user) + (["chat"] if whole_channel else [])
        await dispatch(interaction, " ".join(["/reset", *args]))

    return app_commands.Command(name="reset", description=_description(info), callback=callback)


def _usage_command(info: CommandInfo, dispatch: SlashDispatch) -> app_commands.Command[Any, Any, None]:
    @app_commands.describe(user="Admins: this user's use today", reset="Admins: start this user's daily quota again")
    async def callback(
        interaction: discord.Interaction[Any], user: discord.User | None = None, reset: bool = False
    ) -> None:
        args = (["reset"] if reset else []) + _named(user)
        await dispatch(interaction, " ".join(["/usage", *args]))

    return app_commands.Command(name="usage", description=_description(info), callback=callback)


def _export_command(info: CommandInfo, dispatch: SlashDispatch) -> app_commands.Command[Any, Any, None]:
    @app_commands.describe(user="Admins: export this user's conversation in this channel")
    async def callback(interaction: discord.Interaction[Any], user: discord.User | None = None) -> None:
        await dispatch(interaction, " ".join(["/export", *_named(user)]))

    return app_commands.Command(name="export", description=_description(info), callback=callback)


def _block_command(info: CommandInfo, dispatch: SlashDispatch) -> app_commands.Command[Any, Any, None]:
    """`/block` or `/unblock`: a user, this channel or this server (one of them; other
    channels and servers by id with the text command)."""
    verb = info.name

    @app_commands.describe(
        user=f"{verb.capitalize()} this user",
        this_channel=f"{verb.capitalize()} this channel",
        this_server=f"{verb.capitalize()} this server",
    )
    async def callback(
        interaction: discord.Interaction[Any],
        user: discord.User | None = None,
        this_channel: bool = False,
        this_server: bool = False,
    ) -> None:
        args = _named(user)
        if this_channel:
            args.append(f"chat:{interaction.channel_id}")
        if this_server and interaction.guild_id is not None:
            args.append(f"guild:{interaction.guild_id}")
        await dispatch(interaction, " ".join([f"/{verb}", *args]))

    return app_commands.Command(name=verb, description=_description(info), callback=callback)


def _config_group(info: CommandInfo, dispatch: SlashDispatch) -> app_commands.Group:
    """`/config show|set|reset` for this session, and `/config chat show|set|reset` for
    everybody in the channel (`enabled` among its keys)."""
    group = _settings_group("config", _description(info), "/config", SESSION_SETTINGS, "this session", dispatch)
    group.add_command(
        _settings_group(
            "chat", "Settings of everybody in this channel", "/config chat", CHAT_SETTINGS, "this channel", dispatch
        )
    )
    return group


def _settings_group(
    name: str,
    description: str,
    text: str,
    keys: Mapping[str, object],
    whose: str,
    dispatch: SlashDispatch,
) -> app_commands.Group:
    group = app_commands.Group(name=name, description=description)

    async def show(interaction: discord.Interaction[Any]) -> None:
        await dispatch(interaction, text)

    @app_commands.describe(key="The setting to change", value="Its new value")
    @app_commands.choices(key=[app_commands.Choice(name=key, value=key) for key in keys])
    async def set_(interaction: discord.Interaction[Any], key: str, value: str) -> None:
        await dispatch(interaction, f"{text} set {key} {value}")

    async def reset(interaction: discord.Interaction[Any]) -> None:
        await dispatch(interaction, f"{text} reset")

    group.add_command(app_commands.Command(name="show", description=f"Show the settings of {whose}", callback=show))
    group.add_command(
        app_commands.Command(name="set", description=f"Admins: change a setting of {whose}", callback=set_)
    )
    group.add_command(
        app_commands.Command(
            name="reset", description=f"Admins: put the settings of {whose} back to the defaults", callback=reset
        )
    )
    return group
