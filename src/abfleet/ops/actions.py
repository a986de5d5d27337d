"""Instance actions the user asks for from the controller, behind the guard's checks: the
status of an instance and its run, the verified download of its model, and destroy.

The CLI shows what these return and asks for confirmation; nothing here prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from abfleet.errors import AbfleetError, reason
from abfleet.fleet.ledger import InstanceRecord, Ledger
from abfleet.fleet.providers import connect_record, get_provider
from abfleet.fleet.providers.base import STOPPED, Provider
from abfleet.fleet.rent import destroy_and_confirm, wait_ready
from abfleet.fleet.spend import instance_spend, observe
from abfleet.ops.monitor import BACKUP_FILE, RunView, Session, Target
from abfleet.ops.streams import DEFAULT_STREAMS
from abfleet.ops.transfer import DownloadResult, download
from abfleet.worker.selfstop import DOWNLOADED_MARK, SELF_STOP_FILE

log = logging.getLogger(__name__)

Warn = Callable[[str], None]


def note_state(ledger: Ledger, target: Target, snap: dict[str, Any]) -> None:
    if target.run is not None and snap.get("state"):
        ledger.update_run(target.run.name, state=snap["state"])


def instance_status(ledger: Ledger, target: Target, provider: Provider) -> dict[str, Any]:
    """The instance as the provider sees it, and its run as the box reports it (when it runs)."""
    rec = target.instance
    live = provider.get(rec.instance_id or "")
    if provider.billable:
        observe(ledger, rec, live)
    spend = instance_spend(ledger, rec)
    data: dict[str, Any] = {
        "instance": {
            "id": rec.instance_id,
            "provider": rec.provider,
            "label": rec.label,
            "state": live.state if live else "gone",
            "detail": (live.status_msg if live else "") or (live.raw_state if live else ""),
            "gpu": f"{rec.gpu_count}x {rec.gpu_name}",
            "price_per_hour": rec.price_per_hour,
            "ssh": f"{live.ssh_user}@{live.ssh_host}:{live.ssh_port}"
            if live and live.ssh_host
            else None,
            "created_at": rec.created_at,
            "spent_usd": round(spend.usd, 4) if provider.billable else None,
            "rate_now": spend.rate_now if provider.billable else None,
            "billing": spend.billing if provider.billable else None,
        },
        "run": None,
    }
    if target.run is not None:
        run = target.run
        data["run"] = {
            "name": run.name,
            "job": run.job,
            "model": run.model,
            "remote_dir": run.remote_dir,
            "downloaded": bool(run.verified),
            "last_backup_at": run.last_backup_at,
            "budget_usd": run.budget_usd,
        }
        backup = Path(run.local_dir) / BACKUP_FILE
        if backup.is_file():  # what optuna-dashboard can open here, whatever the box's state
            data["run"]["local_study"] = str(backup.resolve())
        if not (live and live.ssh_ready):
            data["run"]["hint"] = _unreachable_hint(data["instance"]["state"], run)
        else:
            session = Session(target)
            try:
                snap = session.snapshot()
            finally:
                session.close()
            note_state(ledger, target, snap)
            loaded = next((w for w in snap.get("workers", []) if w.get("dtype")), {})
            data["run"].update(
                dtype=loaded.get("dtype"),
                dtype_reason=loaded.get("dtype_reason"),
                state=snap["state"],
                reason=snap.get("reason"),
                trials=snap["trials"],
                eta_s=snap.get("eta_s"),
                box=snap.get("box"),
                push=(snap.get("output") or {}).get("push"),
            )
    return data


def _unreachable_hint(state: str, run: Any) -> str:
    """What to do about a run whose box cannot be asked (stopped, preempted, gone)."""
    where = f"the box is {state}, so the run cannot be asked"
    if state == STOPPED:
        where += (
            f"; if its work was over it stopped itself: `abfleet download {run.instance_id}` "
            "starts it, downloads the model and stops it again"
        )
    if not run.last_backup_at:
        return f"{where}; no backup of its study was taken: `abfleet start` the box if it can run again"
    taken = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.last_backup_at))
    return f"{where}; `abfleet resume {run.name}` continues it from its backup of {taken}"


def fetch_model(
    ledger: Ledger,
    target: Target,
    dest: Path,
    warn: Warn,
    say: Warn,
    progress: Callable[[int, int | None], None] | None = None,
    prefer_rsync: bool = True,
    on_attempt: Callable[[int, str], None] | None = None,
    stream_count: int = DEFAULT_STREAMS,
) -> tuple[DownloadResult, bool]:
    """Download the run's model from the box that exported it, verified file by file; then
    bring the study and logs home too (a destroy needs a current backup), and tell the box.

    A box that stopped itself is started first; the second value says so, and the caller
    stops (or destroys) it again. If the download then fails, it is stopped again here."""
    run = target.run
    assert run is not None
    rec = RunView(ledger, target).primary.instance
    provider = get_provider(rec.provider)
    woke = wake_if_stopped(ledger, rec, provider, f"{rec.remote_root}/runs/{run.name}", say)
    try:
        primary = RunView(ledger, target).primary  # a started box may have a new SSH port
        run_dir = f"{primary.instance.remote_root}/runs/{run.name}"
        result = download(
            lambda: connect_record(primary.instance),
            f"{run_dir}/model",
            dest,
            progress=progress,
            prefer_rsync=prefer_rsync,
            on_attempt=on_attempt,
            stream_count=stream_count,
        )
    except BaseException as exc:
        if woke:
            note = stop_again(ledger, rec, provider)
            raise AbfleetError(f"{reason(exc)}; {note}") from exc
        raise
    ledger.update_run(run.name, downloaded_at=time.time(), verified=1)
    try:
        view = RunView(ledger, target)
        try:
            view.backup(view.snapshot())
            # The box may now destroy itself if the user chose that at launch.
            view.session(view.primary).remote.write_text(f"{run_dir}/{DOWNLOADED_MARK}", "")
        finally:
            view.close()
    except AbfleetError as exc:
        warn(f"the study backup failed ({reason(exc)}); run `abfleet backup` before destroying")
    return result, woke


def wake_if_stopped(
    ledger: Ledger, rec: InstanceRecord, provider: Provider, run_dir: str, say: Warn
) -> bool:
    """Start a stopped box (it bills its full rate again) and wait for SSH; True if it was.
    What the box recorded about stopping itself corrects the meter."""
    iid = rec.instance_id or ""
    live = provider.get(iid)
    if live is None or live.state != STOPPED:
        return False
    observe(ledger, rec, live)
    rate = f"{rec.price_per_hour:.3f} $/h" if rec.price_per_hour else "its full rate"
    say(
        f"instance {iid} is stopped: starting it to download (it bills {rate} while it runs, "
        "and is stopped again afterwards)"
    )
    provider.start(iid)
    ledger.meter_mark(provider.name, iid, "running")
    try:
        inst, remote = wait_ready(provider, iid, say)
    except BaseException as exc:  # a box that never came up, or Ctrl+C: not left at full rate
        raise AbfleetError(f"{reason(exc)}; {stop_again(ledger, rec, provider)}") from exc
    try:
        ledger.update(rec.key, ssh_host=inst.ssh_host, ssh_port=inst.ssh_port)
        out = remote.run(["cat", f"{run_dir}/{SELF_STOP_FILE}"], timeout=60, check=False)
        if out.code == 0:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                stopped_at = float(json.loads(out.stdout)["at"])
                ledger.meter_correct(provider.name, iid, "stopped", stopped_at)
    finally:
        remote.close()
    return True


def stop_again(ledger: Ledger, rec: InstanceRecord, provider: Provider) -> str:
    """Put a box started for a download back to sleep; says what was done, for the user."""
    iid = rec.instance_id or ""
    try:
        provider.stop(iid)
    except AbfleetError as exc:
        return (
            f"instance {iid} was started for the download and could NOT be stopped again "
            f"({reason(exc)}): it bills its full rate; `abfleet stop {iid}` or `abfleet destroy {iid}`"
        )
    ledger.meter_mark(provider.name, iid, "stopped")
    disk = f"{rec.storage_per_hour:.3f} $/h" if rec.storage_per_hour else "its disk"
    return f"instance {iid} is stopped again: it bills only its disk ({disk}); `abfleet destroy {iid}` ends that"


def destroy_instance(ledger: Ledger, target: Target, provider: Provider, warn: Warn) -> str:
    """Destroy a rented instance and see it gone; a machine abfleet does not own has its
    workers stopped and is forgotten. Returns what happened, for the user."""
    iid = target.instance.instance_id or ""
    if provider.billable:
        destroy_and_confirm(provider, ledger, iid)
        return f"destroyed instance {iid}"
    try:
        provider.stop(iid)  # on a machine of the user's: stops abfleet's workers there
    except AbfleetError as exc:
        warn(f"could not stop its workers ({reason(exc)})")
    ledger.mark_destroyed(provider.name, iid)
    return f"destroyed instance {iid} (forgotten: abfleet does not own this machine)"
