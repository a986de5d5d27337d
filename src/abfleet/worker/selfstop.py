"""A rented box's own meter and its way out: the budget it must stay within, and the stop (or
destroy) it performs on itself once its work is over, so that a finished box never bills until
someone notices.

The controller writes the terms into the run's 0600 env file (`BoxTerms.to_env`): the rate the
run bills at, since when, the budget, the grace period, and the provider's request that stops
this one instance. The key for that request is the instance-scoped one the provider puts in
the container's environment (on Vast.ai `CONTAINER_API_KEY`); the account key never reaches a
box. An SSH session does not inherit the container's environment, so PID 1's is read too.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from abfleet.worker.rundir import RunDir, pid_alive, write_json_atomic

log = logging.getLogger(__name__)

ENV_KEY = "ABFLEET_BOX_TERMS"
DOWNLOADED_MARK = ".downloaded"  # written by `abfleet download` once every file is verified
SELF_STOP_FILE = "box-stop.json"  # what the box did to itself, and when
PID1_ENVIRON = Path("/proc/1/environ")
POLL_S = 5.0


@dataclass(frozen=True)
class BoxTerms:
    """What the controller agreed with the user for this box."""

    instance_id: str = ""
    rate_per_hour: float = 0.0  # the whole run's $/h (every box of it), for the budget
    billing_since: float = 0.0  # when the first box of the run was created
    budget_usd: float = 0.0  # 0: none
    stop_after_s: float = 1800.0  # grace period after the work ends; 0: never stop
    then_destroy: bool = False  # after a verified download, destroy rather than stop
    requests: dict[str, Any] = field(default_factory=dict)  # provider's stop/destroy requests

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
        raise RuntimeError(f"this provider gave the box no way to {action} itself")
    key_env = terms.requests.get("key_env", "")
    key = container_value(key_env, environ, pid1) if key_env else None
    if key_env and not key:
        raise RuntimeError(f"{key_env} is not in the container's environment")
    body = json.dumps(spec["json"]).encode() if "json" in spec else None
    request = urllib.request.Request(spec["url"], data=body, method=spec["method"])
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            reply = json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"the provider answered {exc.code} to the {action}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(f"could not reach the provider to {action}: {exc}") from None
    if isinstance(reply, dict) and reply.get("success") is False:
        raise RuntimeError(f"the provider refused the {action}: {reply.get('msg') or reply}")


def finish_box(
    run: RunDir,
    terms: BoxTerms,
    status: Any,
    own_index: int,
    out_of_budget: bool,
    should_stop: Callable[[], bool],
    environ: Mapping[str, str] = os.environ,
) -> str | None:
    """The work on this box is over: wait for its other workers, then for the grace period
    (none when the budget is spent), and stop the box; or destroy it, when the user chose that
    at launch and the model has been downloaded and verified (`download` usually destroys it
    first). Returns what was done, None if nothing.

    A SIGTERM (the user operating the box) ends the wait without touching the box."""
    if not terms.can_stop_itself:
        log.info("this box cannot stop itself (its provider has no such request)")
        return None
    if terms.stop_after_s <= 0 and not out_of_budget:
        log.info("stop_after is 0: the box keeps running until you stop or destroy it")
        return None
    while _others_alive(run, own_index):
        if should_stop():
            return None
        time.sleep(POLL_S)
    grace = 0.0 if out_of_budget else terms.stop_after_s
    deadline = time.time() + grace
    why = "budget reached" if out_of_budget else "work finished"
    while True:
        downloaded = (run.path / DOWNLOADED_MARK).is_file()
        action = "destroy" if downloaded and terms.then_destroy else "stop"
        status.update(box_action=action, box_acts_at=deadline, box_why=why)
        if time.time() >= deadline:
            break
        if should_stop():
            status.update(box_action=None, box_acts_at=None)
            return None
        time.sleep(min(POLL_S, max(0.1, deadline - time.time())))
    record = {"at": time.time(), "action": action, "why": why, "spent_usd": terms.spent()}
    write_json_atomic(run.path / SELF_STOP_FILE, record)
    log.info("%s: the box %ss itself (%.2f $ spent)", why, action, record["spent_usd"])
    try:
        call_provider(terms, action, environ)
    except RuntimeError as exc:
        log.error("the box could not %s itself: %s", action, exc)
        status.update(box_action=None, box_error=f"could not {action} itself: {exc}")
        (run.path / SELF_STOP_FILE).unlink(missing_ok=True)
        return None
    return action


def _others_alive(run: RunDir, own_index: int) -> bool:
    for index in run.workers():
        if index == own_index:
            continue
        try:
            pid = int(run.pid_file(index).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid_alive(pid):
            return True
    return False
