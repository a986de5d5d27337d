"""The run folder a worker writes: job, study, per-worker log/pid/status, and the exported model.

<run>/job.toml           the job as it runs (paths relative to it)
<run>/study.db           the SQLite study (one box), unless the job names another storage
<run>/worker-N.log       log of worker N;  worker-N.pid: its process id
<run>/status-N.json      what worker N is doing, rewritten atomically at every change
<run>/model/             the exported model, with MANIFEST.sha256 and abfleet-run.json
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = (
    "starting",
    "loading",
    "directions",
    "searching",
    "rescoring",
    "exporting",
    "judging",
    "benchmarking",
    "done",
    "failed",
    "stopped",
)
FINAL_STATES = ("done", "failed", "stopped")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def job_file(self) -> Path:
        return self.path / "job.toml"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def study_db(self) -> Path:
        return self.path / "study.db"

    def log_file(self, worker: int) -> Path:
        return self.path / f"worker-{worker}.log"

    def pid_file(self, worker: int) -> Path:
        return self.path / f"worker-{worker}.pid"

    def status_file(self, worker: int) -> Path:
        return self.path / f"status-{worker}.json"

    def workers(self) -> list[int]:
        found = set()
        for pattern in ("status-*.json", "worker-*.pid", "worker-*.log"):
            for p in self.path.glob(pattern):
                stem = p.stem.split("-", 1)[1]
                if stem.isdigit():
                    found.add(int(stem))
        return sorted(found)

    def study_url(self, setting: str | None) -> str | None:
        """Where the run's study lives, from the job's storage setting: the folder's SQLite
        file when none is set; for `head` and `env` the URL the controller put in
        ABFLEET_STORAGE_URL (the environment, or the run's 0600 env file); None if missing."""
        if setting in ("head", "env"):
            return os.environ.get("ABFLEET_STORAGE_URL") or self.env_value("ABFLEET_STORAGE_URL")
        return setting or f"sqlite:///{self.study_db.resolve()}"

    def env_value(self, key: str) -> str | None:
        """One value of the run's 0600 env file (read by the same user that runs the workers)."""
        return self.env().get(key)

    def env(self) -> dict[str, str]:
        """The run's 0600 env file, as `set -a; . .env` reads it (KEY='value' lines)."""
        try:
            text = (self.path / ".env").read_text()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            name, sep, value = line.partition("=")
            if sep and name.isidentifier():
                try:
                    out[name] = "".join(shlex.split(value))
                except ValueError:
                    continue
        return out

    def worker_pid(self, worker: int) -> int | None:
        """The pid in worker-N.pid (written at its start, or by whoever started it again)."""
        try:
            return int(self.pid_file(worker).read_text().strip())
        except (OSError, ValueError):
            return None

    def worker_alive(self, worker: int) -> tuple[int | None, bool]:
        """(pid, alive): the one reading of a worker's liveness (snapshot, guardian, orphans)."""
        pid = self.worker_pid(worker)
        return pid, pid_alive(pid)

    def read_status(self, worker: int) -> dict[str, Any]:
        try:
            return json.loads(self.status_file(worker).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}


class StatusWriter:
    """Keeps one worker's status file current; every update is a complete, atomic rewrite."""

    def __init__(self, run: RunDir, worker: int, **fixed: Any) -> None:
        self.run = run
        self.worker = worker
        self.data: dict[str, Any] = {
            "worker": worker,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": time.time(),
            "state": "starting",
            **fixed,
        }
        self.flush()

    @classmethod
    def reopen(cls, run: RunDir, worker: int) -> StatusWriter:
        """Keep writing a status file another writer started (what it holds stays)."""
        writer = cls.__new__(cls)
        writer.run, writer.worker = run, worker
        writer.data = {**run.read_status(worker), "pid": os.getpid()}
        return writer

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.flush()

    def flush(self) -> None:
        self.data["updated_at"] = time.time()
        write_json_atomic(self.run.status_file(self.worker), self.data)


def pid_alive(pid: int | None) -> bool:
    """Whether pid is a live abfleet process (a recycled pid running something else is not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return b"abfleet" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # no /proc (macOS): the signal check is all there is
        return True
