"""Exceptions that end a command with one clear line instead of a traceback."""

from __future__ import annotations


def reason(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none: never `()`."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class AbfleetError(Exception):
    """A failure the user can act on; the CLI prints its message and exits with exit_code."""

    exit_code = 1


class UserError(AbfleetError):
    """Bad input: a wrong path, value, flag or file. Exit code 2, nothing changed."""

    exit_code = 2


class ProviderError(AbfleetError):
    """The cloud provider refused or failed a request."""


class NoOffers(ProviderError):
    """No offer matches what was asked for (nothing was rented)."""


class CreateFailed(ProviderError):
    """A create that gave no usable instance. instance_id is the one the provider made anyway
    (it bills until destroyed), or None when the provider holds nothing of it."""

    def __init__(self, message: str, instance_id: str | None = None) -> None:
        super().__init__(message)
        self.instance_id = instance_id


class RemoteError(AbfleetError):
    """An SSH connection or a command on a box failed."""


class SshAuthError(RemoteError):
    """The box answered but refused us (key, permissions, host key): waiting will not help."""


class Declined(AbfleetError):
    """The user did not confirm a billable or destructive action; nothing was done."""

    exit_code = 3


class Terminated(KeyboardInterrupt):
    """SIGTERM (a container stop, `timeout`, a supervisor, `abfleet stop`): the run ends now,
    from whatever phase it is in. A KeyboardInterrupt, so that everything a Ctrl+C abort
    cleans up (a trial failed and re-queued, temp folders, locks) is cleaned up the same way."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a process it ended
