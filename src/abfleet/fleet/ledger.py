"""The local record of every instance and run this machine created (SQLite in the data dir).

A create is written here *before* the provider is asked, and completed with the instance id as
soon as the provider answers, so that no billed contract can exist that abfleet does not know
about, even if the controller dies mid-call. `abfleet list` compares this record with what the
provider reports.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abfleet.paths import data_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    provider TEXT NOT NULL,
    instance_id TEXT,              -- NULL until the provider answered the create
    label TEXT NOT NULL,
    run TEXT,
    state TEXT NOT NULL,           -- creating, active, destroyed, create-failed
    offer TEXT,                    -- JSON of the offer it was created from
    gpu_name TEXT, gpu_count INTEGER, price_per_hour REAL, disk_gb REAL,
    ssh_host TEXT, ssh_port INTEGER, ssh_user TEXT,
    remote_root TEXT,
    created_at REAL NOT NULL,
    destroyed_at REAL,
    note TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS instances_live_id ON instances(provider, instance_id)
    WHERE state NOT IN ('destroyed', 'create-failed');
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    instance_id TEXT,
    remote_dir TEXT,
    local_dir TEXT NOT NULL,
    workers INTEGER DEFAULT 1,
    created_at REAL NOT NULL,
    downloaded_at REAL,
    verified INTEGER DEFAULT 0,
    last_backup_at REAL,
    state TEXT,
    instances TEXT,                -- JSON list of every instance id the run spans
    continued_by TEXT              -- the run that resumed this one elsewhere (abfleet resume)
);
CREATE TABLE IF NOT EXISTS meter (  -- what an instance bills at from `at` on
    provider TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    at REAL NOT NULL,
    state TEXT NOT NULL,           -- running, stopped
    exact INTEGER NOT NULL         -- 0: abfleet saw it at `at`; it may have changed earlier
);
"""
# Columns added after a ledger may already exist: (table, column, type).
ADDED_COLUMNS = (
    ("runs", "continued_by", "TEXT"),
    ("runs", "stop_after_s", "REAL"),  # the box stops itself this long after its work ends
    ("runs", "then_destroy", "INTEGER"),  # a downloaded box is destroyed rather than stopped
    ("runs", "budget_usd", "REAL"),
    ("instances", "storage_per_hour", "REAL"),  # what it bills while stopped
    ("runs", "box_note", "TEXT"),  # the box's trouble, as status/progress/watch last saw it
    ("runs", "exported_trials", "INTEGER"),  # trials complete when the downloaded model was made
    ("instances", "paused_since", "REAL"),  # outbid (interruptible) since, as first seen
    ("instances", "pauses", "INTEGER"),  # how many times it was seen outbid
    ("runs", "max_pause_s", "REAL"),  # outbid longer than this: the run moves to another box
    ("runs", "moved", "TEXT"),  # JSON: why and when the run moved, and the trials it lost
    ("runs", "last_complete", "INTEGER"),  # completed trials when a controller last looked
)


@dataclass
class InstanceRecord:
    key: int
    provider: str
    instance_id: str | None
    label: str
    run: str | None
    state: str
    gpu_name: str | None
    gpu_count: int | None
    price_per_hour: float | None
    disk_gb: float | None
    ssh_host: str | None
    ssh_port: int | None
    ssh_user: str | None
    remote_root: str | None
    created_at: float
    destroyed_at: float | None
    offer: dict[str, Any] | None
    note: str | None
    storage_per_hour: float | None = None
    paused_since: float | None = None
    pauses: int | None = None


@dataclass
class RunRecord:
    name: str
    job: str
    model: str
    provider: str
    instance_id: str | None
    remote_dir: str | None
    local_dir: str
    workers: int
    created_at: float
    downloaded_at: float | None
    verified: bool
    last_backup_at: float | None
    state: str | None
    instances: list[str] = field(default_factory=list)
    continued_by: str | None = None
    stop_after_s: float | None = None
    then_destroy: bool = False
    budget_usd: float | None = None
    box_note: str | None = None
    exported_trials: int | None = None
    max_pause_s: float | None = None
    moved: str | None = None
    last_complete: int | None = None


class Ledger:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or (data_dir() / "ledger.sqlite")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(SCHEMA)
            for table, column, kind in ADDED_COLUMNS:
                have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        finally:
            db.close()

    # -- instances --------------------------------------------------------------------------

    def begin_create(
        self, provider: str, label: str, run: str | None, offer: dict[str, Any]
    ) -> int:
        """Record the intent before the provider is called; returns the row key."""
        with self._db() as db:
            cur = db.execute(
                "INSERT INTO instances (provider, label, run, state, offer, gpu_name, gpu_count,"
                " price_per_hour, disk_gb, created_at, storage_per_hour)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    provider,
                    label,
                    run,
                    "creating",
                    json.dumps(offer),
                    offer.get("gpu_name"),
                    offer.get("gpu_count"),
                    offer.get("price_per_hour"),
                    offer.get("disk_gb"),
                    time.time(),
                    offer.get("storage_per_hour"),
                ),
            )
            return int(cur.lastrowid)

    def finish_create(self, key: int, instance_id: str, **fields: Any) -> None:
        self.update(key, instance_id=instance_id, state="active", **fields)

    def fail_create(self, key: int, note: str) -> None:
        self.update(key, state="create-failed", note=note)

    def _set(self, table: str, key_column: str, key: Any, fields: dict[str, Any]) -> None:
        if not fields:
            return
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._db() as db:
            db.execute(f"UPDATE {table} SET {cols} WHERE {key_column} = ?", (*fields.values(), key))

    def update(self, key: int, **fields: Any) -> None:
        self._set("instances", "key", key, fields)

    def mark_destroyed(self, provider: str, instance_id: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE instances SET state = 'destroyed', destroyed_at = ? WHERE provider = ? AND instance_id = ?",
                (time.time(), provider, instance_id),
            )

    def instances(self, include_destroyed: bool = False) -> list[InstanceRecord]:
        query = "SELECT * FROM instances"
        if not include_destroyed:
            query += " WHERE state NOT IN ('destroyed', 'create-failed')"
        with self._db() as db:
            rows = db.execute(query + " ORDER BY key").fetchall()
        return [_instance(r) for r in rows]

    def instance(self, provider: str, instance_id: str) -> InstanceRecord | None:
        with self._db() as db:
            row = db.execute(
                "SELECT * FROM instances WHERE provider = ? AND instance_id = ?",
                (provider, instance_id),
            ).fetchone()
        return _instance(row) if row else None

    def find(self, instance_id: str) -> list[InstanceRecord]:
        with self._db() as db:
            rows = db.execute(
                "SELECT * FROM instances WHERE instance_id = ? ORDER BY key", (instance_id,)
            ).fetchall()
        return [_instance(r) for r in rows]

    # -- runs -------------------------------------------------------------------------------

    def add_run(self, record: RunRecord) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO runs (name, job, model, provider, instance_id, remote_dir,"
                " local_dir, workers, created_at, downloaded_at, verified, last_backup_at, state,"
                " instances, continued_by, stop_after_s, then_destroy, budget_usd, max_pause_s)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    record.name,
                    record.job,
                    record.model,
                    record.provider,
                    record.instance_id,
                    record.remote_dir,
                    record.local_dir,
                    record.workers,
                    record.created_at,
                    record.downloaded_at,
                    int(record.verified),
                    record.last_backup_at,
                    record.state,
                    json.dumps(record.instances or [record.instance_id]),
                    record.continued_by,
                    record.stop_after_s,
                    int(record.then_destroy),
                    record.budget_usd,
                    record.max_pause_s,
                ),
            )

    def update_run(self, name: str, **fields: Any) -> None:
        self._set("runs", "name", name, fields)

    def run(self, name: str) -> RunRecord | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
        return _run(row) if row else None

    def runs(self) -> list[RunRecord]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY created_at").fetchall()
        return [_run(r) for r in rows]

    def continuation(self, run: RunRecord) -> RunRecord | None:
        """The last run of the chain that resumed this one elsewhere, if any."""
        seen = {run.name}
        last = None
        while run.continued_by and run.continued_by not in seen:
            nxt = self.run(run.continued_by)
            if nxt is None:
                break
            seen.add(nxt.name)
            last = run = nxt
        return last

    # -- the meter --------------------------------------------------------------------------

    def meter_mark(
        self,
        provider: str,
        instance_id: str,
        state: str,
        at: float | None = None,
        exact: bool = True,
    ) -> None:
        """The instance bills as `state` (running or stopped) from `at` on; a repeat of the
        state it already has changes nothing."""
        events = self.meter_events(provider, instance_id)
        if (events and events[-1][1] == state) or (not events and state == "running"):
            return
        with self._db() as db:
            db.execute(
                "INSERT INTO meter (provider, instance_id, at, state, exact) VALUES (?,?,?,?,?)",
                (provider, instance_id, at or time.time(), state, int(exact)),
            )

    def meter_correct(self, provider: str, instance_id: str, state: str, at: float) -> None:
        """The exact time of a change abfleet only saw later (a box that stopped itself)."""
        with self._db() as db:
            db.execute(
                "UPDATE meter SET at = ?, exact = 1 WHERE rowid = (SELECT rowid FROM meter"
                " WHERE provider = ? AND instance_id = ? AND state = ? AND exact = 0"
                " ORDER BY at DESC LIMIT 1) AND at > ?",
                (at, provider, instance_id, state, at),
            )

    def meter_events(self, provider: str, instance_id: str) -> list[tuple[float, str, bool]]:
        with self._db() as db:
            rows = db.execute(
                "SELECT at, state, exact FROM meter WHERE provider = ? AND instance_id = ?"
                " ORDER BY at, rowid",
                (provider, instance_id),
            ).fetchall()
        return [(r["at"], r["state"], bool(r["exact"])) for r in rows]

    def runs_on(self, provider: str, instance_id: str) -> list[RunRecord]:
        """Runs on this instance, as their primary box or as one of several."""
        return [r for r in self.runs() if r.provider == provider and instance_id in r.instances]


def _instance(row: sqlite3.Row) -> InstanceRecord:
    data = dict(row)
    data["offer"] = json.loads(data["offer"]) if data["offer"] else None
    return InstanceRecord(**data)


def _run(row: sqlite3.Row) -> RunRecord:
    data = dict(row)
    data["verified"] = bool(data["verified"])
    data["then_destroy"] = bool(data.get("then_destroy"))
    data["instances"] = (
        json.loads(data["instances"]) if data.get("instances") else [data["instance_id"]]
    )
    return RunRecord(**data)
