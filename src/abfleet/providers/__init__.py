"""Where jobs run: `vast` (rented), `ssh` (a machine you have), `local` (this machine)."""

from __future__ import annotations

from abfleet.errors import UserError
from abfleet.providers.base import Provider

NAMES = ("vast", "ssh", "local")


def get_provider(name: str, host: str | None = None) -> Provider:
    if name == "vast":
        from abfleet.providers.vast import VastProvider
        from abfleet.settings import settings

        return VastProvider(settings().vast)
    if name == "ssh":
        from abfleet.providers.owned import SshProvider

        return SshProvider(host)
    if name == "local":
        from abfleet.providers.owned import LocalProvider

        return LocalProvider()
    raise UserError(f"unknown provider {name!r}: use one of {', '.join(NAMES)}")
