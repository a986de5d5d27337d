"""Exceptions that end a command with one clear line instead of a traceback."""

from __future__ import annotations


class AbfleetError(Exception):
    """A failure the user can act on; the CLI prints its message and exits with exit_code."""

    exit_code = 1


class UserError(AbfleetError):
    """Bad input: a wrong path, value, flag or file. Exit code 2, nothing changed."""

    exit_code = 2


class ProviderError(AbfleetError):
    """The cloud provider refused or failed a request."""


class RemoteError(AbfleetError):
    """An SSH connection or a command on a box failed."""


class SshAuthError(RemoteError):
    """The box answered but refused us (key, permissions, host key): waiting will not help."""


class Declined(AbfleetError):
    """The user did not confirm a billable or destructive action; nothing was done."""

    exit_code = 3
