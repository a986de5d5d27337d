"""`abfleet download` from start to end: wake a box that stopped itself, hold it up with a lease
while the model comes home (verified file by file), back up the study, tell the box, and then
destroy every box of the run (when chosen) or put the woken box back to sleep.

Every step after the box is started runs inside one try/finally: whatever fails (SSH, the
backup, a refused or mistyped destroy, Ctrl+C), the box that this command started is stopped
again, and the user is told so. If the controller itself dies, the lease runs out and the box's
guardian stops it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abfleet.errors import AbfleetError, reason
from abfleet.fleet.ledger import InstanceRecord, Ledger
from abfleet.fleet.providers import connect_record, get_provider
from abfleet.fleet.providers.base import Provider
from abfleet.fleet.rent import destroy_and_confirm
from abfleet.ops.actions import stop_again, wake_if_stopped
from abfleet.ops.monitor import RunView, Target
from abfleet.ops.streams import DEFAULT_STREAMS
from abfleet.ops.transfer import DownloadResult, download
from abfleet.settings import settings
from abfleet.worker.guardian import LEASE_FILE
from abfleet.worker.selfstop import DOWNLOADED_MARK

log = logging.getLogger(__name__)

Say = Callable[[str], None]
# Shown the destroy's assessment; raises to refuse (a guard, a declined confirmation).
ConfirmDestroy = Callable[[Target], None]


@dataclass
class Delivery:
    result: DownloadResult
    woke: bool
    backed_up: bool
    destroyed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what happened to the boxes, for the user


class Lease:
    """Holds a box this command started up while it works (ROOT/lease.json, renewed from a
    thread over its own connection). Removed at the end; if this process dies, it runs out and
    the box's guardian stops the box."""

    def __init__(self, rec: InstanceRecord, seconds: float) -> None:
        self.rec = rec
        self.seconds = seconds
        self.path = f"{rec.remote_root}/{LEASE_FILE}"
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _write(self, remote: Any) -> None:
        body = {"until": time.time() + self.seconds, "at": time.time(), "by": "abfleet download"}
        remote.write_text(self.path, json.dumps(body) + "\n")

    def __enter__(self) -> Lease:
        remote = connect_record(self.rec)
        try:
            self._write(remote)
        finally:
            remote.close()
        self.thread = threading.Thread(target=self._renew, name="lease", daemon=True)
        self.thread.start()
        return self

    def _renew(self) -> None:
        while not self.stop.wait(self.seconds / 3):
            try:
                remote = connect_record(self.rec)
                try:
                    self._write(remote)
                finally:
                    remote.close()
            except Exception as exc:  # noqa: BLE001 - a missed renewal: the next one may work
                log.warning("could not renew the download's lease: %s", reason(exc))

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        with contextlib.suppress(Exception):
            remote = connect_record(self.rec)
            try:
                remote.run(["rm", "-f", self.path], timeout=30, check=False)
            finally:
                remote.close()


def deliver(
    ledger: Ledger,
    target: Target,
    dest: Path,
    then_destroy: bool,
    confirm_destroy: ConfirmDestroy,
    warn: Say,
    say: Say,
    progress: Callable[[int, int | None], None] | None = None,
    prefer_rsync: bool = True,
    on_attempt: Callable[[int, str], None] | None = None,
    stream_count: int = DEFAULT_STREAMS,
) -> Delivery:
    """Download the run's model, verified, then destroy the run's boxes or stop what was woken."""
    run = target.run
    assert run is not None
    rec = RunView(ledger, target).primary.instance
    provider = get_provider(rec.provider)
    run_dir = f"{rec.remote_root}/runs/{run.name}"
    woke = wake_if_stopped(ledger, rec, provider, run_dir, say)
    destroyed: list[str] = []
    notes: list[str] = []
    try:
        rec = ledger.instance(rec.provider, rec.instance_id or "") or rec  # its new SSH port
        with Lease(rec, settings().guardian.lease_s) if woke else contextlib.nullcontext():
            result = download(
                lambda: connect_record(rec),
                f"{run_dir}/model",
                dest,
                progress=progress,
                prefer_rsync=prefer_rsync,
                on_attempt=on_attempt,
                stream_count=stream_count,
            )
            ledger.update_run(
                run.name,
                downloaded_at=time.time(),
                verified=1,
                exported_trials=_exported_trials(dest),
            )
            backed_up = _backup_and_mark(ledger, target, run_dir, warn)
            if then_destroy:
                destroyed = _destroy_run(ledger, target, provider, confirm_destroy)
    finally:
        if woke and rec.instance_id not in destroyed:
            notes.append(stop_again(ledger, rec, provider))
            if not destroyed:
                say(notes[-1])
    return Delivery(result, woke, backed_up, destroyed, notes)


def _exported_trials(dest: Path) -> int | None:
    """How many trials the study held when the model was exported (its abfleet-run.json)."""
    try:
        return int(json.loads((dest / "abfleet-run.json").read_text())["study"]["complete"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _backup_and_mark(ledger: Ledger, target: Target, run_dir: str, warn: Say) -> bool:
    """The study and logs home too (a destroy needs a current backup), and the box told."""
    try:
        view = RunView(ledger, target)
        try:
            view.backup(view.snapshot())
            # The box may now destroy itself, if the user chose that.
            view.session(view.primary).remote.write_text(f"{run_dir}/{DOWNLOADED_MARK}", "")
        finally:
            view.close()
    except Exception as exc:  # noqa: BLE001 - SSH, paramiko, JSON: the model is home regardless
        warn(f"the study backup failed ({reason(exc)}); run `abfleet backup` before destroying")
        return False
    return True


def _destroy_run(
    ledger: Ledger, target: Target, provider: Provider, confirm: ConfirmDestroy
) -> list[str]:
    """Every box of the run, each after the guard and the confirmation; the primary last (with
    `--storage head` it serves the study the others' checks read)."""
    assert target.run is not None
    run = ledger.run(target.run.name) or target.run  # as the download left it: verified
    records = [ledger.instance(run.provider, iid) for iid in run.instances]
    records = [r for r in records if r is not None and r.state == "active"][::-1]
    done: list[str] = []
    for rec in records:
        if provider.get(rec.instance_id or "") is None:
            # Gone already: a box holding no results destroys itself once the run is over.
            ledger.mark_destroyed(provider.name, rec.instance_id or "")
            done.append(rec.instance_id or "")
            continue
        confirm(Target(rec, run))
        try:
            destroy_and_confirm(provider, ledger, rec.instance_id or "")
        except AbfleetError as exc:
            raise AbfleetError(
                f"destroying instance {rec.instance_id} failed ({reason(exc)}); "
                f"`abfleet destroy {rec.instance_id}` tries again"
            ) from exc
        done.append(rec.instance_id or "")
    return done
