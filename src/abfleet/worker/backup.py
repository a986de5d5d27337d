"""A consistent copy of a run's study, taken on the box while workers keep writing to it.

SQLite: the online backup API (a copy of one consistent state, not a torn file). Postgres:
the study copied into a new SQLite file with Optuna's copy_study. Either way the controller
receives a SQLite study it can resume from on any box, or here.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any


def backup_study(run_dir: Path, out: Path) -> dict[str, Any]:
    from abfleet.worker.rundir import RunDir
    from abfleet.worker.snapshot import job_info

    run = RunDir(run_dir)
    job = job_info(run)
    url = run.study_url(job.get("storage_setting"))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    if url is None:
        raise FileNotFoundError(f"no study storage known for {run_dir}")
    if url.startswith("sqlite"):
        source = sqlite3.connect(url.split("///", 1)[1], timeout=30)
        target = sqlite3.connect(tmp)
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()
    else:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        from abfleet.job.storage import normalize_url

        optuna.copy_study(
            from_study_name=job["study"],
            from_storage=normalize_url(url),
            to_storage=f"sqlite:///{tmp}",
        )
    tmp.replace(out)
    complete = _count_complete(out, job["study"])
    return {
        "path": str(out),
        "size": out.stat().st_size,
        "complete": complete,
        "study": job["study"],
    }


def _count_complete(db: Path, study: str) -> int:
    import optuna

    from abfleet.core.search import count_states

    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    try:
        return count_states(storage, study)[optuna.trial.TrialState.COMPLETE]
    finally:
        storage.engine.dispose()
