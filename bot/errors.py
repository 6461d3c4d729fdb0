"""One error tree. Every error we raise derives from `BotError` and carries a short,
user-facing explanation; the log gets the details."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-blank line of `exc`, at most `limit` characters: for one log line or
    a `ConfigError` (library messages run to many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class BotError(Exception):
    """Base of every error this project raises on purpose."""

    user_message: str = "Sorry, something went wrong. Please try again."

    def __init__(self, detail: str = "", *, user_message: str | None = None) -> None:
        super().__init__(detail or self.user_message)
        if user_message is not None:
            self.user_message = user_message


class ConfigError(BotError):
    """A setting is missing or malformed. Raised at start-up; names the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class ModelLoadError(ConfigError):
    """The configured model cannot be found or loaded."""


class CommandError(BotError):
    """A command was malformed, unknown, or had a bad value. The message is for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message, user_message=message)


class PermissionDenied(CommandError):
    """A non-admin tried an admin command."""

    def __init__(self, message: str = "Only admins can do that.") -> None:
        super().__init__(message)


class InputRejected(CommandError):
    """User input the bot will not send to the model (too long, binary, ...)."""


class BusyError(BotError):
    """The generation queue is full."""

    user_message = "I'm busy with other people's messages right now. Please try again in a minute."


class GenerationError(BotError):
    """The model failed while producing a reply."""

    user_message = "Sorry, I couldn't produce a reply this time. Please try again."


class ModelUnavailable(GenerationError):
    """The model server cannot be reached (or keeps failing) right now."""

    user_message = "The model server is unavailable, try again in a moment."


class ReplyCutOff(GenerationError):
    """The reply broke off after part of it was streamed (a model server went away
    mid-stream). The part already shown is kept, marked as cut off."""

    user_message = "The connection to the model server broke, so my reply above is cut off. Please try again."


class GenerationCancelled(BotError):
    """A generation was stopped on purpose (a /reset, or shutdown)."""

    user_message = "Stopped."


class DeliveryError(BotError):
    """The platform refused or failed to deliver a reply, after the adapter's retries.

    `permanent`: it never will (chat gone, bot blocked, no permission, message deleted).
    Otherwise the platform may take it later (server errors, a long flood wait, the
    network): the reply is kept and delivered, or the user told, later. `kind` names
    the failure for metrics ("forbidden", "not_found", "bad_request", "rate_limited",
    "server_error", "timeout", "network", "stopped")."""

    user_message = "I couldn't deliver my reply."

    def __init__(self, detail: str = "", *, permanent: bool = True, kind: str = "other") -> None:
        super().__init__(detail)
        self.permanent = permanent
        self.kind = kind


class StorageError(BotError):
    """The database failed."""

    user_message = "Sorry, I couldn't reach my memory just now. Please try again."
