"""The run's state as one JSON document, taken on the box (`abfleet worker report --json`).

The controller gets everything it shows (progress, dashboard, guard rails) from this single
round trip: no grepping of logs or process lists on the box, no shell pipelines to quote.
Reading needs neither torch nor the model: it is cheap enough for a refresh every few seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any

from abfleet.core.search import HEARTBEAT_ATTR
from abfleet.worker.publish import read_outcome
from abfleet.worker.rundir import FINAL_STATES, RunDir, pid_alive

PARETO_ROWS = 10


def take_snapshot(run: RunDir, log_lines: int = 20) -> dict[str, Any]:
    snap: dict[str, Any] = {"taken_at": time.time(), "run_dir": str(run.path)}
    job = job_info(run)
    snap.update(job)
    workers = [_worker(run, i) for i in run.workers()]
    snap["workers"] = workers
    snap.update(_study(run, job))
    snap["state"], snap["reason"], snap["detail"] = _overall_state(workers)
    snap["warnings"] = next((w["warnings"] for w in workers if w["exported"]), [])
    snap["eta_s"] = _eta(snap)
    snap["gpus"] = gpu_stats()
    snap["disk"] = _disk(run.path)
    snap["output"] = _output(run)
    snap["log_tail"] = _log_tail(run, workers, log_lines)
    snap["box"] = _box(run)
    return snap


def _box(run: RunDir) -> dict[str, Any] | None:
    """The box's terms (budget, grace period), and what its guardian sees and plans."""
    from abfleet.worker.guardian import GUARD_FILE, budget_reached, metered_spend, read_json
    from abfleet.worker.selfstop import BoxTerms

    terms = BoxTerms.from_env(os.environ, run)
    if terms is None:
        return None
    box: dict[str, Any] = {
        "instance_id": terms.instance_id,
        "budget_usd": terms.budget_usd or None,
        "spent_usd": round(metered_spend(run, terms), 4),
        "budget_reached": budget_reached(run),
        "stop_after_s": terms.stop_after_s,
        "then_destroy": terms.then_destroy,
        "can_stop_itself": terms.can_stop_itself,
    }
    guard = read_json(run.path.parent.parent / GUARD_FILE)
    if guard is None:
        box["guardian"] = None
        return box
    alive = pid_alive(guard.get("pid"))
    box["guardian"] = {
        "alive": alive,
        "phase": guard.get("phase"),
        "detail": guard.get("detail"),
        "events": guard.get("events", [])[-5:],
        "updated_at": guard.get("updated_at"),
    }
    if guard.get("phase") in ("grace", "lease", "failing", "done"):
        box.update(action=guard.get("action"), acts_at=guard.get("acts_at"), why=guard.get("why"))
    if guard.get("phase") == "failing":
        box.update(
            failing_since=guard.get("failing_since"),
            attempts=guard.get("attempts"),
            error=guard.get("last_error"),
            next_try_at=guard.get("next_try_at"),
        )
    return box


def job_info(run: RunDir) -> dict[str, Any]:
    from abfleet.job.spec import load_job

    try:
        job = load_job(str(run.job_file))
    except Exception as exc:  # noqa: BLE001 - a report must describe even a broken run
        return {"job": None, "job_error": str(exc)}
    return {
        "job": job.name,
        "model": job.spec.model,
        "study": job.study_name,
        "n_trials": job.spec.search.n_trials,
        "kl_limit": job.spec.result.kl_limit,
        "storage_setting": job.spec.search.storage,
    }


def _worker(run: RunDir, index: int) -> dict[str, Any]:
    status = run.read_status(index)
    pid, alive = run.worker_alive(index)
    if pid is None:  # no pid file: the status says which process wrote it
        pid = status.get("pid")
        alive = pid_alive(pid)
    state = status.get("state", "starting")
    if not alive and state not in FINAL_STATES:
        # The process is gone without saying why (killed, OOM, box rebooted).
        state, status["reason"] = "failed", "worker process is gone (killed?); see its log"
    return {
        "index": index,
        "pid": pid,
        "alive": alive,
        "state": state,
        "reason": status.get("reason"),
        "detail": status.get("detail"),
        "host": status.get("host"),
        "label": status.get("label"),
        "gpu": status.get("gpu"),
        "device": status.get("device"),
        "dtype": status.get("dtype"),
        "dtype_reason": status.get("dtype_reason"),
        "batch_size": status.get("batch_size"),
        "current_trial": status.get("current_trial"),
        "current_trial_started": status.get("current_trial_started"),
        "trials_here": status.get("trials_here", 0),
        "exported": status.get("exported"),
        "warnings": status.get("warnings") or [],
        "updated_at": status.get("updated_at"),
        "started_at": status.get("started_at"),
    }


def _overall_state(workers: list[dict[str, Any]]) -> tuple[str, str | None, str | None]:
    if not workers:
        return "starting", None, "no worker has reported yet"
    primary = next((w for w in workers if w["index"] == 0), workers[0])
    alive = [w for w in workers if w["alive"]]
    exporter = next((w for w in workers if w["exported"] and w["state"] == "done"), None)
    if exporter is not None and not alive:  # the primary's, or the worker that took it over
        return "done", exporter["reason"], exporter["detail"]
    if primary["state"] == "failed" and not alive:
        return "failed", primary["reason"], primary["detail"]
    if primary["state"] in FINAL_STATES and not alive:
        return primary["state"], primary["reason"], primary["detail"]
    for state in ("exporting", "benchmarking", "judging", "rescoring"):
        if any(w["state"] == state for w in workers):
            return state, None, next(w["detail"] for w in workers if w["state"] == state)
    order = ("searching", "directions", "loading", "starting")
    for state in order:
        if any(w["state"] == state for w in alive):
            return state, None, next(w["detail"] for w in alive if w["state"] == state)
    return primary["state"], primary["reason"], primary["detail"]


def _study(run: RunDir, job: dict[str, Any]) -> dict[str, Any]:
    """Trial counts, Pareto front, timings and heartbeats from the study storage."""
    url = run.study_url(job.get("storage_setting"))
    out: dict[str, Any] = {
        "trials": {
            "complete": 0,
            "running": 0,
            "failed": 0,
            "waiting": 0,
            "total": job.get("n_trials"),
        },
        "pareto": [],
        "baseline": None,
        "median_trial_s": None,
        "heartbeats": {},
        "study_db": None,
    }
    if run.study_db.is_file():
        st = run.study_db.stat()
        out["study_db"] = {"path": str(run.study_db), "size": st.st_size, "mtime": st.st_mtime}
    if url is None or (url.startswith("sqlite") and not run.study_db.is_file()):
        return out
    try:
        import optuna

        from abfleet.core.result import pareto_front

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        from abfleet.job.storage import normalize_url

        url = normalize_url(url)
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=_engine_kwargs(url), skip_compatibility_check=True
        )
        study = optuna.load_study(study_name=job["study"], storage=storage)
        trials = study.get_trials(deepcopy=False)
    except Exception as exc:  # noqa: BLE001 - not created yet, DB locked, Postgres down
        out["study_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return out
    counts = {"complete": 0, "running": 0, "failed": 0, "waiting": 0, "pruned": 0}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    out["trials"] = {**counts, "total": job.get("n_trials")}
    done = [t for t in trials if t.state.name == "COMPLETE" and t.values]
    rescore = study.user_attrs.get("rescore")
    out["pareto"] = [_point(t, rescore) for t in pareto_front(done)[:PARETO_ROWS]]
    durations = [t.user_attrs.get("seconds") for t in done if t.user_attrs.get("seconds")]
    out["median_trial_s"] = round(statistics.median(durations), 2) if durations else None
    out["last_complete_at"] = max(
        (t.datetime_complete.timestamp() for t in done if t.datetime_complete), default=None
    )
    out["baseline"] = _baseline(study.user_attrs.get("baseline"))
    out["running_trials"] = [
        {
            "trial": t.number,
            "worker": t.user_attrs.get("worker"),
            "started": t.datetime_start.timestamp() if t.datetime_start else None,
        }
        for t in trials
        if t.state.name == "RUNNING"
    ]
    out["heartbeats"] = {
        str(t.number): t.user_attrs[HEARTBEAT_ATTR]
        for t in trials
        if t.state.name == "RUNNING" and HEARTBEAT_ATTR in t.user_attrs
    }
    return out


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 10}}
    return {"connect_args": {"connect_timeout": 10}}


def _point(t: Any, rescore: Any = None) -> dict[str, Any]:
    from abfleet.core.result import trial_row

    row = trial_row(t, rescore if isinstance(rescore, dict) else None)
    long = ("long_tokens", "long_refusals", "long_degenerate", "judge")
    return {
        **{k: row[k] for k in ("trial", "refusals", "n_bad", "degenerate")},
        **{k: row[k] for k in long if k in row},
        "kl": round(row["kl"], 4),
        "worker": t.user_attrs.get("worker"),
    }


def _baseline(data: Any) -> dict[str, Any] | None:
    if not isinstance(data, dict):
        return None
    return {k: data.get(k) for k in ("refusals", "n_bad", "degenerate")}


def _eta(snap: dict[str, Any]) -> float | None:
    trials, median = snap.get("trials", {}), snap.get("median_trial_s")
    total = trials.get("total")
    if not median or not total:
        return None
    remaining = max(0, total - trials.get("complete", 0))
    alive = max(1, sum(1 for w in snap.get("workers", []) if w["alive"]))
    return round(remaining * median / alive, 1)


def gpu_stats() -> list[dict[str, Any]]:
    if shutil.which("nvidia-smi") is None:
        return []
    query = "index,name,utilization.gpu,memory.used,memory.total,temperature.gpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 6:
            continue
        gpus.append(
            {
                "index": int(parts[0]),
                "name": parts[1],
                "util": _num(parts[2]),
                "mem_used_mb": _num(parts[3]),
                "mem_total_mb": _num(parts[4]),
                "temp_c": _num(parts[5]),
            }
        )
    return gpus


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _disk(path: Path) -> dict[str, Any]:
    usage = shutil.disk_usage(path)
    return {
        "path": str(path),
        "free_gb": round(usage.free / 1e9, 2),
        "total_gb": round(usage.total / 1e9, 2),
    }


def _output(run: RunDir) -> dict[str, Any]:
    model = run.model_dir
    if not model.is_dir():
        return {"exported": False, "files": [], "total_bytes": 0, "manifest": False}
    files = [
        {"path": p.relative_to(model).as_posix(), "size": p.stat().st_size}
        for p in sorted(model.rglob("*"))
        if p.is_file()
    ]
    record = None
    with contextlib.suppress(OSError, json.JSONDecodeError):
        data = json.loads((model / "abfleet-run.json").read_text())
        record = {
            "chosen": data.get("chosen", {}).get("trial"),
            "before": data.get("before"),
            "after": data.get("after"),
        }
    return {
        "exported": (model / "MANIFEST.sha256").is_file(),
        "manifest": (model / "MANIFEST.sha256").is_file(),
        "files": files,
        "total_bytes": sum(f["size"] for f in files),
        "result": record,
        "push": read_outcome(run.path),
    }


def _log_tail(run: RunDir, workers: list[dict[str, Any]], n: int) -> list[str]:
    lines: list[str] = []
    for w in workers or [{"index": 0}]:
        for path in (run.log_file(w["index"]), run.path / f"worker-{w['index']}.out"):
            if path.is_file():
                with open(path, encoding="utf-8", errors="replace") as handle:
                    tail = deque(handle, maxlen=n)
                prefix = f"[{w['index']}] " if len(workers) > 1 else ""
                lines += [prefix + line.rstrip("\n") for line in tail if line.strip()]
    return lines[-n:]
