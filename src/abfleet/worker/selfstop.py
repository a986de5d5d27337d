"""A rented box's terms and its way out: the budget a run must stay within, the grace period,
and the provider request that stops (or destroys) this one instance. The box's guardian
(`worker/guardian.py`) decides when to send it.

The controller writes the terms into the run's 0600 env file (`BoxTerms.to_env`). The key for
the request is the instance-scoped one the provider puts in the container's environment (on
Vast.ai `CONTAINER_API_KEY`); the account key never reaches a box. An SSH session does not
inherit the container's environment, so PID 1's is read too.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from abfleet.worker.rundir import RunDir

log = logging.getLogger(__name__)

ENV_KEY = "ABFLEET_BOX_TERMS"
DOWNLOADED_MARK = ".downloaded"  # written by `abfleet download` once every file is verified
SELF_STOP_FILE = "box-stop.json"  # what the box did to itself, and when
PID1_ENVIRON = Path("/proc/1/environ")


@dataclass(frozen=True)
class BoxTerms:
    """What the controller agreed with the user for this box."""

    instance_id: str = ""
    rate_per_hour: float = 0.0  # the whole run's $/h (every box of it), for the budget
    storage_per_hour: float = 0.0  # the same while stopped (disk only)
    billing_since: float = 0.0  # the run's submit (or its first box's create, for a launch)
    budget_usd: float = 0.0  # 0: none
    stop_after_s: float = 1800.0  # grace period after the work ends; 0: never stop
    then_destroy: bool = False  # once delivered (downloaded or pushed), destroy rather than stop
    requests: dict[str, Any] = field(default_factory=dict)  # provider's stop/destroy requests
    holds_results: bool = True  # False on a run's extra boxes: neither model nor study there
    peers_wait_s: float = 0.0  # the study's host waits this long for other boxes' workers
    guard: dict[str, float] = field(default_factory=dict)  # the guardian's timings (GuardTimes)

    def to_env(self) -> dict[str, str]:
        return {ENV_KEY: json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_env(cls, environ: Mapping[str, str], run: RunDir | None = None) -> BoxTerms | None:
        raw = environ.get(ENV_KEY) or (run.env_value(ENV_KEY) if run else None)
        if not raw:
            return None
        try:
            return cls(**json.loads(raw))
        except (TypeError, ValueError) as exc:
            log.error("ignoring unreadable box terms (%s)", exc)
            return None

    def spent(self, now: float | None = None) -> float:
        return self.rate_per_hour * max(0.0, (now or time.time()) - self.billing_since) / 3600

    def over_budget(self, now: float | None = None) -> bool:
        return self.budget_usd > 0 and self.spent(now) >= self.budget_usd

    @property
    def can_stop_itself(self) -> bool:
        return bool(self.requests.get("stop"))


def container_value(name: str, environ: Mapping[str, str], pid1: Path = PID1_ENVIRON) -> str | None:
    """A variable of the container's environment: this process's, else PID 1's."""
    if environ.get(name):
        return environ[name]
    try:
        raw = pid1.read_bytes()
    except OSError:
        return None
    for entry in raw.split(b"\0"):
        key, _, value = entry.partition(b"=")
        if key.decode(errors="replace") == name and value:
            return value.decode(errors="replace")
    return None


def call_provider(
    terms: BoxTerms, action: str, environ: Mapping[str, str], pid1: Path = PID1_ENVIRON
) -> None:
    """Send the provider's `action` request (stop or destroy) for this instance."""
    spec = terms.requests.get(action)
    if not spec:
        raise ProviderCallFailed(f"this provider gave the box no way to {action} itself")
    key_env = terms.requests.get("key_env", "")
    key = container_value(key_env, environ, pid1) if key_env else None
    if key_env and not key:
        raise ProviderCallFailed(f"{key_env} is not in the container's environment")
    body = json.dumps(spec["json"]).encode() if "json" in spec else None
    request = urllib.request.Request(spec["url"], data=body, method=spec["method"])
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            reply = json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise ProviderCallFailed(f"the provider answered {exc.code}", _retry_after(exc)) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ProviderCallFailed(f"could not reach the provider: {exc}") from None
    if isinstance(reply, dict) and reply.get("success") is False:
        if reply.get("error") == "no_such_instance" and action == "destroy":
            return  # already gone: what was asked
        raise ProviderCallFailed(f"the provider refused: {reply.get('msg') or reply.get('error')}")


class ProviderCallFailed(RuntimeError):
    """The stop or destroy did not go through; the guardian tries again later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    try:
        return float(exc.headers.get("Retry-After") or "")
    except (TypeError, ValueError):
        return None
