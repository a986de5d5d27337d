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

from abfleet.errors import AbfleetError, UserError, reason
from abfleet.fleet.ledger import InstanceRecord, Ledger
from abfleet.fleet.providers.base import STOPPED, Provider
from abfleet.fleet.rent import destroy_and_confirm, wait_ready
from abfleet.fleet.spend import instance_spend, observe, pause_note
from abfleet.ops.monitor import BACKUP_FILE, Session, Target
from abfleet.worker.selfstop import SELF_STOP_FILE

log = logging.getLogger(__name__)

Warn = Callable[[str], None]


def note_state(ledger: Ledger, target: Target, snap: dict[str, Any]) -> None:
    """Keep what a snapshot said in the ledger, for `list`: the run's state and its box's
    trouble (a self-stop failing, no guardian)."""
    if target.run is None:
        return
    fields: dict[str, Any] = {"box_note": box_trouble(snap.get("box"))}
    if snap.get("state"):
        fields["state"] = snap["state"]
    complete = (snap.get("trials") or {}).get("complete")
    if complete is not None:  # what a move off a paused box would lose is counted from it
        fields["last_complete"] = int(complete)
    ledger.update_run(target.run.name, **fields)


def box_trouble(box: dict[str, Any] | None) -> str | None:
    """One short line when the box may bill on unseen, else None."""
    if not box:
        return None
    if box.get("error"):
        since = time.strftime("%H:%M", time.localtime(box.get("failing_since") or time.time()))
        return (
            f"work over, self-{box.get('action') or 'stop'} failing since {since}: {box['error']}"
        )
    guard = box.get("guardian")
    if guard is None or (not guard.get("alive") and guard.get("phase") != "done"):
        return "no guardian running: it will not stop itself"
    return None


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
            "state": ("outbid" if live.outbid else live.state) if live else "gone",
            "detail": pause_note(rec)
            if live and live.outbid
            else (live.status_msg if live else "") or (live.raw_state if live else ""),
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
        if run.moved:  # it came here off a box outbid past --max-pause: what that cost
            from abfleet.ops.pauses import moved_line

            data["run"]["moved"] = moved_line(json.loads(run.moved))
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
                warnings=snap.get("warnings") or [],
            )
    return data


def _unreachable_hint(state: str, run: Any) -> str:
    """What to do about a run whose box cannot be asked (stopped, preempted, gone)."""
    where = f"the box is {state}, so the run cannot be asked"
    if state == "outbid":
        move = (
            f"`abfleet watch {run.instance_id}` moves it after {run.max_pause_s / 60:g} min outbid"
            if run.max_pause_s
            else "it waits (launch --max-pause moves a run after a long pause)"
        )
        where = f"the box is outbid: its run goes on when the bid wins again; {move}"
    elif state == STOPPED:
        where += (
            f"; if its work was over it stopped itself: `abfleet download {run.instance_id}` "
            "starts it, downloads the model and stops it again"
        )
    if not run.last_backup_at:
        return f"{where}; no backup of its study was taken: `abfleet start` the box if it can run again"
    taken = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.last_backup_at))
    return f"{where}; `abfleet resume {run.name}` continues it from its backup of {taken}"


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
    if live.outbid:
        raise UserError(
            f"instance {iid} is outbid (paused): it cannot run until its bid wins again. Wait, "
            f"or `abfleet resume {rec.run}` continues the run elsewhere from its backup"
        )
    rate = f"{rec.price_per_hour:.3f} $/h" if rec.price_per_hour else "its full rate"
    say(
        f"instance {iid} is stopped: starting it to download (it bills {rate} while it runs, "
        "and is stopped again afterwards)"
    )
    provider.start(iid)
    ledger.meter_mark(provider.name, iid, "running")
    try:
        inst, remote = wait_ready(provider, iid, say)
        try:
            ledger.update(rec.key, ssh_host=inst.ssh_host, ssh_port=inst.ssh_port)
            out = remote.run(["cat", f"{run_dir}/{SELF_STOP_FILE}"], timeout=60, check=False)
        finally:
            remote.close()
    except BaseException as exc:  # never came up, SSH failed, Ctrl+C: not left at full rate
        raise AbfleetError(f"{reason(exc)}; {stop_again(ledger, rec, provider)}") from exc
    if out.code == 0:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            stopped_at = float(json.loads(out.stdout)["at"])
            ledger.meter_correct(provider.name, iid, "stopped", stopped_at)
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
