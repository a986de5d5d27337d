"""Instance actions the user asks for from the controller, behind the guard's checks: the
status of an instance and its run, the verified download of its model, and destroy.

The CLI shows what these return and asks for confirmation; nothing here prints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from abfleet.errors import AbfleetError, reason
from abfleet.fleet.ledger import Ledger
from abfleet.fleet.providers import connect_record
from abfleet.fleet.providers.base import Provider
from abfleet.fleet.rent import destroy_and_confirm
from abfleet.ops.monitor import RunView, Session, Target
from abfleet.ops.transfer import DownloadResult, download

log = logging.getLogger(__name__)

Warn = Callable[[str], None]


def note_state(ledger: Ledger, target: Target, snap: dict[str, Any]) -> None:
    if target.run is not None and snap.get("state"):
        ledger.update_run(target.run.name, state=snap["state"])


def instance_status(ledger: Ledger, target: Target, provider: Provider) -> dict[str, Any]:
    """The instance as the provider sees it, and its run as the box reports it (when it runs)."""
    rec = target.instance
    live = provider.get(rec.instance_id or "")
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
        }
        if not (live and live.ssh_ready):
            data["run"]["hint"] = _unreachable_hint(data["instance"]["state"], run)
        else:
            session = Session(target)
            try:
                snap = session.snapshot()
            finally:
                session.close()
            note_state(ledger, target, snap)
            data["run"].update(
                state=snap["state"],
                reason=snap.get("reason"),
                trials=snap["trials"],
                eta_s=snap.get("eta_s"),
            )
    return data


def _unreachable_hint(state: str, run: Any) -> str:
    """What to do about a run whose box cannot be asked (stopped, preempted, gone)."""
    where = f"the box is {state}, so the run cannot be asked"
    if not run.last_backup_at:
        return f"{where}; no backup of its study was taken: `abfleet start` the box if it can run again"
    taken = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.last_backup_at))
    return f"{where}; `abfleet resume {run.name}` continues it from its backup of {taken}"


def fetch_model(
    ledger: Ledger,
    target: Target,
    dest: Path,
    warn: Warn,
    progress: Callable[[int, int | None], None] | None = None,
    prefer_rsync: bool = True,
    on_attempt: Callable[[int, str], None] | None = None,
) -> DownloadResult:
    """Download the run's model from the box that exported it, verified file by file; then
    bring the study and logs home too (a destroy needs a current backup)."""
    run = target.run
    assert run is not None
    primary = RunView(ledger, target).primary
    result = download(
        lambda: connect_record(primary.instance),
        f"{primary.instance.remote_root}/runs/{run.name}/model",
        dest,
        progress=progress,
        prefer_rsync=prefer_rsync,
        on_attempt=on_attempt,
    )
    ledger.update_run(run.name, downloaded_at=time.time(), verified=1)
    try:
        view = RunView(ledger, target)
        try:
            view.backup(view.snapshot())
        finally:
            view.close()
    except AbfleetError as exc:
        warn(f"the study backup failed ({reason(exc)}); run `abfleet backup` before destroying")
    return result


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
