"""The controller's view of a run: one connection to its box for the snapshot, the study backup
and the logs. Used by status, progress, logs, watch, backup, download and the guard rails."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abfleet.errors import AbfleetError, RemoteError, UserError
from abfleet.ledger import InstanceRecord, Ledger, RunRecord
from abfleet.remote import LocalRemote, Remote, SshRemote

BACKUP_FILE = "study.db"
BACKUP_META = "backup.json"


@dataclass
class Target:
    instance: InstanceRecord
    run: RunRecord | None


def pick_run(
    ledger: Ledger, instance: InstanceRecord, run_name: str | None = None
) -> RunRecord | None:
    runs = ledger.runs_on(instance.provider, instance.instance_id or "")
    if run_name:
        match = [r for r in runs if r.name == run_name]
        if not match:
            raise UserError(
                f"instance {instance.instance_id} has no run {run_name!r} (runs: {', '.join(r.name for r in runs) or 'none'})"
            )
        return match[0]
    return runs[-1] if runs else None


def require_run(target: Target) -> RunRecord:
    if target.run is None:
        raise UserError(
            f"instance {target.instance.instance_id} has no run yet: `abfleet submit {target.instance.instance_id} JOB`"
        )
    return target.run


class Session:
    """One connection to a run's box."""

    def __init__(self, target: Target, timeout: float | None = None) -> None:
        from abfleet.launcher import connect_record

        self.target = target
        self.remote: Remote = connect_record(target.instance, timeout=timeout)

    @property
    def abfleet(self) -> str:
        root = self.target.instance.remote_root
        if not root:
            raise UserError(
                f"instance {self.target.instance.instance_id} is not set up: `abfleet setup {self.target.instance.instance_id}`"
            )
        return f"{root}/venv/bin/abfleet"

    def snapshot(self) -> dict[str, Any]:
        run = require_run(self.target)
        out = self.remote.run(
            [self.abfleet, "worker", "report", "--json", "--run-dir", run.remote_dir or ""],
            timeout=60,
        )
        try:
            return json.loads(out.stdout)
        except json.JSONDecodeError as exc:
            raise RemoteError(
                f"the box answered the report with something that is not JSON: {out.stdout[:120]!r}"
            ) from exc

    def backup(
        self, ledger: Ledger, snap: dict[str, Any] | None = None, force: bool = False
    ) -> dict[str, Any]:
        """Copy a consistent snapshot of the study and the logs into the local run folder.

        Skipped (returns the last backup) when the study has not changed since.
        """
        run = require_run(self.target)
        local = Path(run.local_dir)
        local.mkdir(parents=True, exist_ok=True)
        last = read_backup_meta(local)
        if snap is not None and last and not force and _unchanged(snap, last):
            return {**last, "skipped": True}
        remote_copy = f"{run.remote_dir}/.backup-{BACKUP_FILE}"
        out = self.remote.run(
            [
                self.abfleet,
                "worker",
                "backup",
                "--run-dir",
                run.remote_dir or "",
                "--out",
                remote_copy,
            ],
            timeout=600,
        )
        info = json.loads(out.stdout.strip().splitlines()[-1])
        tmp = local / f".{BACKUP_FILE}.tmp"
        self.remote.get(remote_copy, tmp)
        tmp.replace(local / BACKUP_FILE)
        logs = local / "logs"
        logs.mkdir(exist_ok=True)
        workers = [w["index"] for w in (snap or {}).get("workers", [])] or [0]
        for index in workers:
            for name in (f"worker-{index}.log", f"worker-{index}.out"):
                with contextlib.suppress(OSError, RemoteError):
                    self.remote.get(f"{run.remote_dir}/{name}", logs / f".{name}.tmp")
                    (logs / f".{name}.tmp").replace(logs / name)
        meta = {
            "at": time.time(),
            "complete": info.get("complete", 0),
            "size": info.get("size"),
            "source": (snap or {}).get("study_db"),
            "bytes": (local / BACKUP_FILE).stat().st_size,
        }
        tmp_meta = local / f".{BACKUP_META}.tmp"
        tmp_meta.write_text(json.dumps(meta))
        tmp_meta.replace(local / BACKUP_META)
        ledger.update_run(run.name, last_backup_at=meta["at"])
        return meta

    def read_from(self, path: str, offset: int, limit: int = 1 << 20) -> bytes:
        if isinstance(self.remote, SshRemote):
            with self.remote.sftp.open(path, "rb") as handle:
                handle.seek(offset)
                return handle.read(limit)
        if isinstance(self.remote, LocalRemote):
            with open(path, "rb") as handle:
                handle.seek(offset)
                return handle.read(limit)
        raise AbfleetError("this connection cannot read files")

    def close(self) -> None:
        self.remote.close()


def read_backup_meta(local: Path) -> dict[str, Any] | None:
    try:
        return json.loads((local / BACKUP_META).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _unchanged(snap: dict[str, Any], last: dict[str, Any]) -> bool:
    source = snap.get("study_db")
    complete = snap.get("trials", {}).get("complete")
    if source is None:
        return complete == last.get("complete") and not snap.get("trials", {}).get("running")
    return source == last.get("source")


def backup_is_fresh(local: Path, snap: dict[str, Any] | None) -> tuple[bool | None, str]:
    """(fresh, why): the backup holds every completed trial the box reports; None if unknown."""
    meta = read_backup_meta(local)
    if meta is None:
        return False, "the study was never backed up"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(meta["at"]))
    if snap is None:
        return (
            None,
            f"last backup {when} ({meta['complete']} trials); the box cannot be reached to compare",
        )
    now = snap.get("trials", {}).get("complete", 0)
    if meta["complete"] >= now:
        return True, f"last backup {when} holds all {now} completed trials"
    return False, f"last backup {when} holds {meta['complete']} of {now} completed trials"
