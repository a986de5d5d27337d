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
from abfleet.fleet.ledger import InstanceRecord, Ledger, RunRecord
from abfleet.fleet.remote import LocalRemote, Remote, SshRemote

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
        from abfleet.fleet.providers import connect_record

        self.target = target
        self.remote: Remote = connect_record(target.instance, timeout=timeout)

    @property
    def run_dir(self) -> str:
        """The run's folder on this box (each box of a run has its own root)."""
        run = require_run(self.target)
        root = self.target.instance.remote_root
        return f"{root}/runs/{run.name}" if root else (run.remote_dir or "")

    @property
    def abfleet(self) -> str:
        root = self.target.instance.remote_root
        if not root:
            raise UserError(
                f"instance {self.target.instance.instance_id} is not set up: `abfleet setup {self.target.instance.instance_id}`"
            )
        return f"{root}/venv/bin/abfleet"

    def snapshot(self) -> dict[str, Any]:
        require_run(self.target)
        out = self.remote.run(
            [self.abfleet, "worker", "report", "--json", "--run-dir", self.run_dir],
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
        remote_copy = f"{self.run_dir}/.backup-{BACKUP_FILE}"
        out = self.remote.run(
            [
                self.abfleet,
                "worker",
                "backup",
                "--run-dir",
                self.run_dir,
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
                    self.remote.get(f"{self.run_dir}/{name}", logs / f".{name}.tmp")
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


def backup_is_fresh(
    local: Path, snap: dict[str, Any] | None, exported: int | None = None
) -> tuple[bool | None, str]:
    """(fresh, why): the backup holds every completed trial the box reports; None if unknown.
    With the box out of reach, a backup holding every trial the downloaded model was chosen
    from (`exported`) is fresh: the run ended with that export."""
    meta = read_backup_meta(local)
    if meta is None:
        return False, "the study was never backed up"
    if snap is not None and snap.get("study_error"):
        snap = None  # the box answered, its study did not: its count of 0 means nothing
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(meta["at"]))
    if snap is None and exported is not None and meta["complete"] >= exported:
        return True, (
            f"last backup {when} holds all {exported} trials the downloaded model was chosen "
            "from (the box cannot be reached)"
        )
    if snap is None:
        return (
            None,
            f"last backup {when} ({meta['complete']} trials); the box cannot be reached to compare",
        )
    now = snap.get("trials", {}).get("complete", 0)
    if meta["complete"] >= now:
        return True, f"last backup {when} holds all {now} completed trials"
    return False, f"last backup {when} holds {meta['complete']} of {now} completed trials"


class RunView:
    """Every box of a run: one session each, snapshots merged into one view of the run.

    The study is shared, so trials and the Pareto front come from the primary box (the one
    that exports); the workers, GPUs and disks of all boxes are listed side by side.
    """

    def __init__(self, ledger: Ledger, target: Target, timeout: float | None = None) -> None:
        run = require_run(target)
        self.ledger = ledger
        records = [ledger.instance(run.provider, iid) for iid in run.instances]
        self.targets = [Target(r, run) for r in records if r is not None and r.state == "active"]
        if not self.targets:
            raise UserError(f"run {run.name} has no live instance left")
        self.timeout = timeout
        self.sessions: dict[str, Session] = {}
        self.errors: dict[str, str] = {}

    @property
    def primary(self) -> Target:
        return self.targets[0]

    def session(self, target: Target) -> Session:
        iid = target.instance.instance_id or ""
        if iid not in self.sessions:
            self.sessions[iid] = Session(target, timeout=self.timeout)
        return self.sessions[iid]

    def snapshot(self) -> dict[str, Any]:
        """Merged snapshot; fails only if the primary box cannot answer."""
        snaps = []
        self.errors = {}
        for target in self.targets:
            iid = target.instance.instance_id or ""
            try:
                snap = self.session(target).snapshot()
            except AbfleetError as exc:
                self.drop(iid)
                if target is self.primary:
                    raise
                self.errors[iid] = str(exc).splitlines()[0]
                continue
            snaps.append((iid, snap))
        return merge_snapshots(snaps, self.errors)

    def backup(self, snap: dict[str, Any] | None, force: bool = False) -> dict[str, Any]:
        return self.session(self.primary).backup(self.ledger, snap, force)

    def drop(self, iid: str) -> None:
        session = self.sessions.pop(iid, None)
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()

    def close(self) -> None:
        for iid in list(self.sessions):
            self.drop(iid)


def merge_snapshots(
    snaps: list[tuple[str, dict[str, Any]]], errors: dict[str, str] | None = None
) -> dict[str, Any]:
    _, base = snaps[0]
    merged = dict(base)
    workers, gpus, disks = [], [], []
    for iid, snap in snaps:
        for w in snap.get("workers", []):
            workers.append({**w, "box": iid})
        for g in snap.get("gpus", []):
            gpus.append({**g, "box": iid})
        if snap.get("disk"):
            disks.append({**snap["disk"], "box": iid})
    merged["workers"] = sorted(workers, key=lambda w: w["index"])
    merged["gpus"] = gpus
    merged["disks"] = disks
    merged["boxes"] = [iid for iid, _ in snaps]
    merged["unreachable"] = errors or {}
    median, total = merged.get("median_trial_s"), merged.get("trials", {}).get("total")
    alive = sum(1 for w in workers if w["alive"])
    if median and total:
        remaining = max(0, total - merged["trials"].get("complete", 0))
        merged["eta_s"] = round(remaining * median / max(1, alive), 1)
    return merged
