"""Where jobs run: `vast` (rented), `ssh` (a machine you have), `local` (this machine)."""

from __future__ import annotations

from typing import Any

from abfleet.errors import UserError
from abfleet.fleet.providers.base import Provider
from abfleet.fleet.remote import LocalRemote, Remote, open_remote

NAMES = ("vast", "ssh", "local")
RENTED = ("vast",)  # instances exist (and bill) at the provider, which lists them


def get_provider(name: str, host: str | None = None) -> Provider:
    if name == "vast":
        from abfleet.fleet.providers.vast import VastProvider
        from abfleet.settings import settings

        return VastProvider(settings().vast)
    if name == "ssh":
        from abfleet.fleet.providers.owned import SshProvider

        return SshProvider(host)
    if name == "local":
        from abfleet.fleet.providers.owned import LocalProvider

        return LocalProvider()
    raise UserError(f"unknown provider {name!r}: use one of {', '.join(NAMES)}")


def connect_record(record: Any, timeout: float | None = None) -> Remote:
    """A Remote for an instance of the ledger: this machine directly, any other over SSH."""
    if record.provider == "local":
        return LocalRemote()
    return open_remote(record, record.provider, timeout=timeout)
