"""Scaling of the shared study: N worker processes, one Postgres study, a synthetic objective.

Each trial sleeps a fixed time (default 1 s) instead of evaluating a model, so what is measured
is abfleet's trial loop on a real Postgres: the budget lock, the stale-trial check, the counts,
Optuna's ask/tell with multivariate TPE and the constant liar, and the heartbeat thread.

    python benchmarks/scaling.py [--workers 1 2 4 8] [--trials-per-worker 12] [--sleep 1.0]

Prints trials per minute, efficiency against the ideal (N workers x 1 trial/s), and the store's
overhead per trial (the time a worker spends per trial outside the objective).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import sys
import time
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

    def on_trial(outcome):
        now = time.perf_counter()
        overheads.append(now - last[0] - sleep)
        last[0] = now

    def on_start(trial):
        pass

    done = search.run_trials(
        study, storage, n_trials, 32, evaluate, lambda: False, on_trial, on_start, poll_seconds=0.2
    )
    queue.put((index, done, overheads))


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
    from abfleet.storage_url import normalize_url

    study = __import__("optuna").load_study(study_name=name, storage=normalize_url(url))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    overheads = [o for _, _, os_ in results for o in os_[1:]]  # the first includes process start
    startup = min(t.datetime_start for t in study.trials).timestamp()
    return {
        "workers": workers,
        "trials": len(complete),
        "wall_s": wall,
        "trials_per_min": len(complete) / wall * 60,
        "efficiency": (len(complete) * sleep / workers) / wall,
        "steady_efficiency": (len(complete) * sleep / workers)
        / (max(t.datetime_complete.timestamp() for t in complete) - startup),
        "overhead_ms": statistics.median(overheads) * 1000 if overheads else None,
        "duplicates": len(complete) - len({tuple(sorted(t.params.items())) for t in complete}),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--trials-per-worker", type=int, default=12)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--url", help="an existing Postgres (default: start one here)")
    args = parser.parse_args()
    server = None
    url = args.url
    if not url:
        from pgserver import PgServer

        server = PgServer().start()
        url = server.url()
    try:
        rows = [run(url, w, args.trials_per_worker, args.sleep) for w in args.workers]
    finally:
        if server:
            server.stop()
    print(
        f"\nsynthetic objective: {args.sleep:.1f} s per trial, {args.trials_per_worker} trials per worker, Postgres"
    )
    print(
        f"{'workers':>8}{'trials':>8}{'wall s':>9}{'trials/min':>12}{'efficiency':>12}{'steady':>9}{'store ms/trial':>16}{'dup':>5}"
    )
    for r in rows:
        print(
            f"{r['workers']:>8}{r['trials']:>8}{r['wall_s']:>9.1f}{r['trials_per_min']:>12.1f}{r['efficiency']:>11.0%}"
            f"{r['steady_efficiency']:>9.0%}{r['overhead_ms']:>16.0f}{r['duplicates']:>5}"
        )


if __name__ == "__main__":
    main()
