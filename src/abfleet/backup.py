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
    from abfleet.rundir import RunDir
    from abfleet.snapshot import _job_info, _storage_url

    run = RunDir(run_dir)
    job = _job_info(run)
    url = _storage_url(run, job)
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
        from abfleet.storage_url import normalize_url

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
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id"
            " WHERE s.study_name = ? AND t.state = 'COMPLETE'",
            (study,),
        ).fetchone()
    return int(row[0]) if row else 0
