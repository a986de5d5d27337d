"""Seconds per trial and peak memory of abfleet and of the reference tool (heretic), side by side.

Same model (the refusal-tuned SmolLM2 demo model), same prompts (jobs/prompts/refusal: 150 + 143
for the directions, 60 + 60 held out), same markers, system prompt, trial count, seed, batch size
and generation cap. Each tool runs in its own process; peak memory is that process's max RSS.
Seconds per trial come from each study's own trial timestamps (start to complete).

    python benchmarks/trial_speed.py                    # abfleet and heretic, 30 trials
    python benchmarks/trial_speed.py --skip-reference   # abfleet only

The reference runs from its own venv (created with `--setup-reference`, which installs
heretic-llm==1.4.0 and torch==2.13.0 into benchmarks/out/heretic-venv). After its trials it
opens menus that need a terminal; it is run without one, so it stops there and its Pareto front
is read from its Optuna journal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
PROMPTS = ROOT / "jobs" / "prompts" / "refusal"
KL_LIMIT = 0.5

RSS_WRAPPER = textwrap.dedent(
    """
    import json, resource, subprocess, sys, time
    started = time.time()
    proc = subprocess.run(sys.argv[2:], cwd=sys.argv[1], stdin=subprocess.DEVNULL,
                          stdout=open(sys.argv[1] + "/stdout.log", "w"), stderr=subprocess.STDOUT)
    rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"rc": proc.returncode, "started": started, "ended": time.time(), "peak_rss_mib": rss_kib / 1024}))
    """
)

DUMP_JOURNAL = textwrap.dedent(
    """
    import json, sys, optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
    path = sys.argv[1]
    storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    rows = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for t in study.get_trials(deepcopy=False):
            rows.append({"number": t.number, "state": t.state.name, "user_attrs": t.user_attrs,
                         "start": t.datetime_start.timestamp() if t.datetime_start else None,
                         "complete": t.datetime_complete.timestamp() if t.datetime_complete else None})
    print(json.dumps(rows))
    """
)


def measured(cwd: Path, argv: list[str], env: dict[str, str] | None = None) -> dict:
    cwd.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [sys.executable, "-c", RSS_WRAPPER, str(cwd), *argv],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(tool: str, res: dict, before: int | None, rows: list, points: list) -> dict:
    """One tool's row: process figures, trial timings and its Pareto points."""
    return {
        "tool": tool,
        "rc": res["rc"],
        "peak_rss_mib": round(res["peak_rss_mib"]),
        "wall_s": round(res["ended"] - res["started"], 1),
        "before": before,
        **trial_stats(rows, res["started"]),
        "points": points,
    }


def trial_stats(rows: list[dict], started: float) -> dict:
    done = [r for r in rows if r["state"] == "COMPLETE" and r["start"] and r["complete"]]
    durations = [r["complete"] - r["start"] for r in done]
    first = min(r["start"] for r in done)
    return {
        "trials": len(done),
        "median_s_per_trial": round(statistics.median(durations), 2),
        "mean_s_per_trial": round(statistics.mean(durations), 2),
        "setup_s": round(first - started, 1),
    }


def best_by_rule(points: list[tuple[int, int, float]]) -> tuple[int, int, float] | None:
    eligible = [p for p in points if p[2] <= KL_LIMIT]
    return min(eligible, key=lambda p: (p[1], p[2])) if eligible else None


def pareto(points: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    front = [
        p
        for p in points
        if not any(q[1] <= p[1] and q[2] <= p[2] and (q[1] < p[1] or q[2] < p[2]) for q in points)
    ]
    return sorted(front, key=lambda p: (p[1], p[2]))


def run_abfleet(args: argparse.Namespace, model_dir: Path) -> dict:
    import optuna

    work = OUT / "abfleet"
    run_dir = work / "run"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    res = measured(
        work,
        [
            sys.executable,
            "-m",
            "abfleet",
            "run",
            "refusal",
            "--model",
            str(model_dir),
            "--trials",
            str(args.trials),
            "--seed",
            str(args.seed),
            "--startup-trials",
            str(args.startup),
            "--batch-size",
            str(args.batch_size),
            "--max-new-tokens",
            str(args.tokens),
            "--output",
            str(run_dir),
        ],
    )
    study = optuna.load_study(study_name="refusal", storage=f"sqlite:///{run_dir / 'study.db'}")
    rows = [
        {
            "number": t.number,
            "state": t.state.name,
            "user_attrs": t.user_attrs,
            "start": t.datetime_start.timestamp(),
            "complete": t.datetime_complete.timestamp() if t.datetime_complete else None,
        }
        for t in study.get_trials(deepcopy=False)
    ]
    points = [
        (r["number"], r["user_attrs"]["refusals"], r["user_attrs"]["kl"])
        for r in rows
        if r["state"] == "COMPLETE"
    ]
    before = study.user_attrs["baseline"]["refusals"]
    return summary("abfleet", res, before, rows, points)


def run_reference(args: argparse.Namespace, model_dir: Path) -> dict:
    heretic = Path(args.reference_venv) / "bin" / "heretic"
    python = Path(args.reference_venv) / "bin" / "python"
    if not heretic.exists():
        raise SystemExit(f"{heretic} not found: run with --setup-reference first")
    work = OUT / "heretic"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    sys.path.insert(0, str(ROOT / "src"))
    from abfleet.job.spec import load_job

    job = load_job("refusal")
    markers = json.dumps(job.spec.markers)

    def spec(name: str) -> str:
        return f'{{ dataset = "{PROMPTS / name}" }}'

    (work / "config.toml").write_text(
        textwrap.dedent(
            f"""\
            model = "{model_dir}"
            n_trials = {args.trials}
            n_startup_trials = {args.startup}
            seed = {args.seed}
            batch_size = {args.batch_size}
            max_response_length = {args.tokens}
            system_prompt = "{job.spec.system_prompt}"
            refusal_markers = {markers}
            good_prompts = {spec("harmless_train.txt")}
            bad_prompts = {spec("harmful_train.txt")}
            good_evaluation_prompts = {spec("harmless_eval.txt")}
            bad_evaluation_prompts = {spec("harmful_eval.txt")}
            """
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "dumb"}
    res = measured(work, [str(heretic)], env=env)
    journals = sorted((work / "checkpoints").glob("*.jsonl"))
    if not journals:
        raise SystemExit(f"the reference wrote no journal; see {work / 'stdout.log'}")
    dump = subprocess.run(
        [str(python), "-c", DUMP_JOURNAL, str(journals[0])],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(dump.stdout)
    points = []
    for r in rows:
        if r["state"] != "COMPLETE":
            continue
        a = r["user_attrs"]
        points.append((r["number"], int(a["refusals"]), float(a["kl_divergence"])))
    log = (work / "stdout.log").read_text(errors="replace")
    before = None
    for line in log.splitlines():
        if "Initial refusals:" in line:
            before = int(line.split("Initial refusals:")[1].split("/")[0].strip())
    return summary("heretic 1.4.0", res, before, rows, points)


def setup_reference(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0", "heretic-llm==1.4.0"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--startup", type=int, default=9, help="random start-up trials (30%%)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--reference-venv", default=str(OUT / "heretic-venv"))
    parser.add_argument("--setup-reference", action="store_true")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.setup_reference:
        setup_reference(Path(args.reference_venv))

    sys.path.insert(0, str(ROOT / "src"))
    from abfleet.demo.refusal_tune import ensure_demo_model

    model_dir = ensure_demo_model()
    results = [run_abfleet(args, model_dir)]
    if not args.skip_reference:
        results.append(run_reference(args, model_dir))

    print(
        f"\nmodel: refusal-tuned SmolLM2-135M ({model_dir.name}), {os.cpu_count()} cores, "
        f"{args.trials} trials, seed {args.seed}, batch {args.batch_size}, {args.tokens} tokens, 60+60 prompts"
    )
    print(
        f"{'tool':<15}{'s/trial':>9}{'setup s':>9}{'wall s':>9}{'peak MiB':>10}{'before':>8}   best with KL<={KL_LIMIT}   Pareto front (refusals/60, KL)"
    )
    for r in results:
        best = best_by_rule(r["points"])
        best_s = f"{best[1]}/60 @ {best[2]:.3f}" if best else "none"
        front = ", ".join(f"{p[1]}@{p[2]:.2f}" for p in pareto(r["points"])[:8])
        print(
            f"{r['tool']:<15}{r['median_s_per_trial']:>9}{r['setup_s']:>9}{r['wall_s']:>9}{r['peak_rss_mib']:>10}"
            f"{r['before'] if r['before'] is not None else '-':>8}   {best_s:<20}   {front}"
        )
    if len(results) == 2:
        ratio = results[0]["median_s_per_trial"] / results[1]["median_s_per_trial"]
        print(f"abfleet / reference seconds per trial: {ratio:.2f}")
    (OUT / "trial_speed.json").write_text(json.dumps(results, indent=1))
    time.sleep(0)


if __name__ == "__main__":
    main()
