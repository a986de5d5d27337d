"""Scaling of the shared study: N worker processes, one Postgres study, a synthetic objective.

Each trial sleeps a fixed time (default 1 s) instead of evaluating a model, so what is measured
is abfleet's trial loop on a real Postgres: the budget lock, the stale-trial check, the counts,
Optuna's ask/tell with multivariate TPE and the constant liar, and the heartbeat thread.

    python benchmarks/scaling.py [--workers 1 2 4 8] [--trials-per-worker 20] [--sleep 1.0]
                                 [--server head|test | --url URL]

The server is started with infra/postgres-head.sh, as `--storage head` does on a box (TLS,
SCRAM, durable), on loopback. Prints trials per minute, efficiency against the ideal (N workers
x 1 trial per `sleep`) over the whole run and in steady state (each worker's pace between its
first and last trial), and the store's overhead per trial: the time a worker spends per trial
outside the objective (budget lock, counts, Optuna's ask/tell and TPE, heartbeats).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))


def worker(
    url: str, study_name: str, index: int, n_trials: int, sleep: float, queue: mp.Queue
) -> None:
    from abfleet.core import search

    settings = search.SearchSettings(
        n_trials=n_trials,
        seed=1,
        n_startup_trials=max(1, n_trials // 3),
        heartbeat_interval=5,
        grace_period=15,
    )
    storage = search.open_storage(url, settings)
    study = search.create_or_load_study(
        storage, study_name, "bench", search.make_sampler(settings, index), create=False
    )
    rng = random.Random(index)
    overheads = []
    last = [time.perf_counter()]

    def evaluate(params):
        time.sleep(sleep)
        return {
            "refusals": rng.randint(0, 60),
            "n_bad": 60,
            "kl": rng.random(),
            "degenerate": 0,
            "seconds": sleep,
        }

    finished: list[float] = []

    def on_trial(outcome):
        now = time.perf_counter()
        overheads.append(now - last[0] - sleep)
        last[0] = now
        finished.append(time.time())

    def on_start(trial):
        pass

    done = search.run_trials(
        study, storage, n_trials, 32, evaluate, lambda: False, on_trial, on_start, poll_seconds=0.2
    )
    queue.put((index, done, overheads, finished))


def run(url: str, workers: int, per_worker: int, sleep: float) -> dict:
    from abfleet.core import search

    n_trials = workers * per_worker
    name = f"scaling-{workers}-{time.time_ns()}"
    settings = search.SearchSettings(n_trials=n_trials, seed=1, n_startup_trials=1)
    storage = search.open_storage(url, settings)
    search.create_or_load_study(
        storage, name, "bench", search.make_sampler(settings)
    )  # the controller's job
    storage.engine.dispose()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(url, name, i, n_trials, sleep, queue))
        for i in range(workers)
    ]
    # Workers start at once; the clock starts when the first one has its study open.
    started = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - started
    from abfleet.job.storage import normalize_url

    study = __import__("optuna").load_study(study_name=name, storage=normalize_url(url))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    overheads = [o for r in results for o in r[2][1:]]  # the first includes process start
    # Steady state: each worker's pace between its first and last trial (process start-up and
    # the wait for the last trials of others do not count), averaged over workers.
    paces = [(len(e) - 1) * sleep / (e[-1] - e[0]) for e in (r[3] for r in results) if len(e) > 1]
    steady = statistics.mean(paces) if paces else float("nan")
    return {
        "workers": workers,
        "trials": len(complete),
        "wall_s": wall,
        "trials_per_min": len(complete) / wall * 60,
        "efficiency": (len(complete) * sleep / workers) / wall,
        "steady_efficiency": steady,
        "overhead_ms": statistics.median(overheads) * 1000 if overheads else None,
        "duplicates": len(complete) - len({tuple(sorted(t.params.items())) for t in complete}),
        "failed": sum(t.state.name == "FAIL" for t in study.trials),
    }


def start_head() -> tuple[str, Callable[[], None]]:
    """Postgres exactly as `--storage head` starts it on a box, here on loopback."""
    import glob
    import json
    import secrets
    import shutil
    import subprocess
    import tempfile

    from abfleet.fleet.headdb import HeadDb
    from sshbox import free_port

    root = Path(tempfile.mkdtemp(prefix="abfleet-bench-"))
    root.chmod(0o755)  # the server runs as `postgres` and keeps its data under root/postgres
    port = free_port()
    password = secrets.token_urlsafe(24)
    init = root / "postgres-init-password"
    init.write_text(password + "\n")
    init.chmod(0o600)
    out = subprocess.run(
        ["bash", str(ROOT / "infra" / "postgres-head.sh"), str(root), str(port)],
        check=True,
        capture_output=True,
        text=True,
    )
    cert = Path(json.loads(out.stdout.strip().splitlines()[-1])["cert"])
    url = HeadDb(password, port, "127.0.0.1", port, cert).url_for_controller()

    def stop() -> None:
        pg_ctl = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))[-1]
        data = cert.parent
        cmd = [pg_ctl, "-D", str(data), "-m", "fast", "stop"]
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(data.parent, ignore_errors=True)

    return url, stop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--trials-per-worker", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument(
        "--server",
        choices=["head", "test"],
        default="head",
        help="head: started by infra/postgres-head.sh as `--storage head` does (TLS, durable); "
        "test: the test suite's server (no TLS, fsync off)",
    )
    parser.add_argument("--url", help="an existing Postgres instead")
    args = parser.parse_args()
    stop = None
    url = args.url
    if not url and args.server == "test":
        from pgserver import PgServer

        server = PgServer().start()
        url, stop = server.url(), server.stop
    elif not url:
        url, stop = start_head()
    try:
        rows = [run(url, w, args.trials_per_worker, args.sleep) for w in args.workers]
    finally:
        if stop:
            stop()
    where = (args.url and "given URL") or args.server
    print(
        f"\nsynthetic objective: {args.sleep:.1f} s per trial, {args.trials_per_worker} trials per worker, "
        f"Postgres ({where}), {os.cpu_count()} CPU cores"
    )
    print(
        f"{'workers':>8}{'trials':>8}{'wall s':>9}{'trials/min':>12}{'efficiency':>12}{'steady':>9}{'store ms/trial':>16}{'dup':>5}{'failed':>8}"
    )
    for r in rows:
        print(
            f"{r['workers']:>8}{r['trials']:>8}{r['wall_s']:>9.1f}{r['trials_per_min']:>12.1f}{r['efficiency']:>11.0%}"
            f"{r['steady_efficiency']:>9.0%}{r['overhead_ms']:>16.0f}{r['duplicates']:>5}{r['failed']:>8}"
        )


if __name__ == "__main__":
    main()
