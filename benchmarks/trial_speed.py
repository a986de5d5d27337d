"""Seconds per trial and peak memory of abfleet and of the reference tool (heretic), side by side.

Same model (the refusal-tuned SmolLM2 demo model), same prompts (jobs/prompts/refusal: 150 + 143
for the directions, 60 + 60 held out), same markers, system prompt, trial count, seed, batch size
and generation cap. Each tool runs in its own process; peak memory is that process's max RSS.
Seconds per trial come from each study's own trial timestamps (start to complete).

    python benchmarks/trial_speed.py                    # abfleet and heretic, 30 trials
    python benchmarks/trial_speed.py --skip-reference   # abfleet only
    python benchmarks/trial_speed.py --markers short --dtype float32   # any job's settings
    python benchmarks/trial_speed.py --skip-reference --abfleet-src /tmp/old   # another checkout
    python benchmarks/trial_speed.py --profile          # where a trial's time goes (after a run)
    python benchmarks/trial_speed.py --profile --few-refusals --ops   # long answers, by operator

--markers short uses nine markers instead of the job's 22: a marker stops an answer's
generation early once it is seen, so more markers make trials shorter for reasons that are
not the tool's speed. --dtype fixes the dtype both tools load (default: each picks its own).
--profile replays the last abfleet run's first trials in this process and times each phase
(the generation's own prefill apart); with --compare-ablation FILE it replays them also
through another checkout's ablation.py, interleaved trial by trial on the same loaded model (an
A/B that machine drift cannot skew); --compare-unshared and --compare-unreused add the same
trials without the shared prompt prefix, or computing the unedited layers every time.

The reference runs from its own venv (created with `--setup-reference`, which installs
heretic-llm==1.4.0 into benchmarks/out/heretic-venv, reusing this Python's torch). After its
trials it opens menus that need a terminal; it is run without one, so it stops there and its
Pareto front is read from its Optuna journal.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
PROMPTS = ROOT / "jobs" / "prompts" / "refusal"
KL_LIMIT = 0.5
SHORT_MARKERS = [
    "sorry", "i can't", "i cannot", "i won't", "i will not",
    "i'm unable", "i am unable", "as an ai", "i must decline",
]  # fmt: skip


def markers_for(args: argparse.Namespace) -> list[str] | None:
    return SHORT_MARKERS if args.markers == "short" else None


def job_file(args: argparse.Namespace, work: Path) -> str:
    """The refusal job, with the benchmark's markers (prompt paths made absolute)."""
    markers = markers_for(args)
    if markers is None:
        return "refusal"
    text = (ROOT / "jobs" / "refusal.toml").read_text()
    start = text.index("markers = [")
    end = text.index("]", start) + 1
    text = text[:start] + "markers = " + json.dumps(markers) + text[end:]
    text = text.replace('"prompts/refusal/', f'"{PROMPTS}/')
    path = work / "job.toml"
    path.write_text(text)
    return str(path)


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


# Trials that refuse at most this many of the 60 held-out prompts: nearly every answer runs the
# whole token budget, which is where a good search spends most of its trials.
FEW_REFUSALS = 10


def trial_stats(rows: list[dict], started: float) -> dict:
    done = [r for r in rows if r["state"] == "COMPLETE" and r["start"] and r["complete"]]
    durations = [r["complete"] - r["start"] for r in done]
    few = [
        r["complete"] - r["start"]
        for r in done
        if int(r["user_attrs"].get("refusals", FEW_REFUSALS + 1)) <= FEW_REFUSALS
    ]
    first = min(r["start"] for r in done)
    return {
        "trials": len(done),
        "median_s_per_trial": round(statistics.median(durations), 2),
        "mean_s_per_trial": round(statistics.mean(durations), 2),
        "few_refusal_trials": len(few),
        "median_s_few_refusals": round(statistics.median(few), 2) if few else None,
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
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.abfleet_src:  # another checkout (e.g. the previous commit) for a before/after
        env["PYTHONPATH"] = str(Path(args.abfleet_src) / "src")
    extra = ["--dtype", args.dtype] if args.dtype else []
    res = measured(
        work,
        [
            sys.executable,
            "-m",
            "abfleet",
            "run",
            job_file(args, work),
            *extra,
            "--long-tokens",
            "0",
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
        env=env,
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
    markers = json.dumps(markers_for(args) or job.spec.markers)
    dtypes = f"dtypes = {json.dumps([args.dtype])}" if args.dtype else ""

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
            {dtypes}
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
    # With the system's packages visible, so the one torch installed here is reused (a test box
    # never gets a second torch); pip adds only what heretic needs beyond it.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "heretic-llm==1.4.0"], check=True)


def profile(args: argparse.Namespace) -> None:
    """Replay the last run's first trials here, timing each phase of a trial."""
    import optuna
    import torch

    sys.path.append(str(ROOT / "src"))
    from abfleet.core.ablation import Ablator
    from abfleet.core.evaluate import Evaluator
    from abfleet.core.markers import MarkerMatcher
    from abfleet.core.model import ModelSource, load_model
    from abfleet.core.pipeline import _decode_tensor, chat_formatter
    from abfleet.core.search import params_from_trial
    from abfleet.demo.refusal_tune import ensure_demo_model
    from abfleet.job.spec import load_job

    run_dir = OUT / "abfleet" / "run"
    if args.abfleet_src:
        sys.path.insert(0, str(Path(args.abfleet_src) / "src"))
    study = optuna.load_study(study_name="refusal", storage=f"sqlite:///{run_dir / 'study.db'}")
    job = load_job(job_file(args, OUT / "abfleet"))
    prompts = job.load_all_prompts()
    dtypes = (args.dtype,) if args.dtype else tuple(job.spec.model_options.dtypes)
    loaded = load_model(ModelSource("dir", str(ensure_demo_model())), dtypes, None)
    chat = chat_formatter(loaded, job.spec.system_prompt)
    directions = _decode_tensor(study.user_attrs["directions"])
    evaluator = Evaluator(
        loaded.model,
        chat,
        prompts["good_eval"],
        prompts["bad_eval"],
        MarkerMatcher(job.spec.markers),
        args.tokens,
        args.batch_size,
    )
    import abfleet.core.generate as generate

    sharing = generate.MIN_SHARED_PREFIX
    ablators = {"now": Ablator(loaded.model)}
    if args.compare_ablation:  # e.g. the previous commit's in-place edit, same model, same trials
        import importlib.util

        spec = importlib.util.spec_from_file_location("other_ablation", args.compare_ablation)
        assert spec is not None and spec.loader is not None
        other = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = other  # dataclasses look their module up there
        spec.loader.exec_module(other)
        ablators["other"] = other.Ablator(loaded.model)
    n_layers = ablators["now"].n_layers
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if args.few_refusals:  # where answers run the whole budget: what a good search spends on
        trials = [t for t in trials if t.user_attrs["refusals"] <= FEW_REFUSALS]
    trials = trials[:10]
    names = ("apply", "KL prefill", "generation", "reset")
    runs = [(key, True, True) for key in ablators]
    if args.compare_unshared:  # the same trials without the shared prompt prefix
        runs.append(("now", False, True))
    store = ablators["now"].unedited
    if args.compare_unreused and store is not None:  # without reusing the unedited layers
        runs.append(("now", True, False))
    if store is None:
        print(" (two Ablators on one model: the unedited layers are not reused)")
    evaluator.score()  # the unedited baseline, as the search scores it before its trials
    phases = {run: {name: [] for name in names} for run in runs}
    lengths = []
    in_prefill = [0.0]  # the generation's own prefill, timed apart from its decode steps
    plain_prefill = generate.prefill

    def timed_prefill(*a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        try:
            return plain_prefill(*a, **k)
        finally:
            in_prefill[0] += time.perf_counter() - started

    generate.prefill = timed_prefill
    for t in trials:  # interleaved, so a slower minute of a shared machine hits both alike
        for key, shared, reuse in runs:
            ablator = ablators[key]
            generate.MIN_SHARED_PREFIX = sharing if shared else 10**9
            if store is not None:
                store.enabled = reuse
            params = params_from_trial(t, n_layers)
            for name, call in zip(
                names,
                (
                    lambda a=ablator, p=params: a.apply(p, directions),
                    evaluator.kl,
                    lambda: lengths.append(evaluator.answers()),
                    ablator.reset,
                ),
                strict=True,
            ):
                in_prefill[0] = 0.0
                started = time.perf_counter()
                call()
                phases[(key, shared, reuse)][name].append(time.perf_counter() - started)
                if name == "generation":
                    phases[(key, shared, reuse)].setdefault("  its prefill", []).append(
                        in_prefill[0]
                    )
    print(
        f"{len(trials)} trials of {run_dir}, dtype {loaded.dtype}, batch {args.batch_size}, "
        f"{len(job.spec.markers)} markers, torch threads {torch.get_num_threads()}"
    )
    for (key, shared, reuse), found in phases.items():
        total = sum(statistics.mean(v) for k, v in found.items() if k in names)
        which = "this checkout" if key == "now" else args.compare_ablation
        print(
            f" ablation: {which}, {'shared' if shared else 'no shared'} prompt prefix, "
            f"{'reusing' if reuse and store is not None else 'computing'} the unedited layers"
        )
        for name, values in found.items():
            mean = statistics.mean(values)
            print(f"  {name:<11} {mean:7.3f} s  {100 * mean / total:5.1f} %")
        print(f"  total       {total:7.3f} s")
    words = [len(a.split()) for answers in lengths for a in answers]
    print(f" answers average {statistics.mean(words):.1f} words")
    if args.ops:  # which operators the generation of the first trial spends its time in
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        ablator = ablators["now"]
        ablator.apply(params_from_trial(trials[0], n_layers), directions)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            evaluator.answers()
        ablator.reset()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


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
    parser.add_argument("--skip-abfleet", action="store_true")
    parser.add_argument("--markers", choices=("job", "short"), default="job")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--abfleet-src", help="run abfleet from this checkout instead")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--few-refusals",
        action="store_true",
        help=f"with --profile: replay only trials with at most {FEW_REFUSALS}/60 refusals",
    )
    parser.add_argument(
        "--ops", action="store_true", help="with --profile: torch.profiler's top operators"
    )
    parser.add_argument("--compare-ablation", help="with --profile: another ablation.py, A/B")
    parser.add_argument(
        "--compare-unshared", action="store_true", help="with --profile: also without prefix"
    )
    parser.add_argument(
        "--compare-unreused",
        action="store_true",
        help="with --profile: also computing the layers below the first edited one every time",
    )
    args = parser.parse_args()
    if args.profile:
        profile(args)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    if args.setup_reference:
        setup_reference(Path(args.reference_venv))

    sys.path.insert(0, str(ROOT / "src"))
    from abfleet.demo.refusal_tune import ensure_demo_model

    model_dir = ensure_demo_model()
    results = [] if args.skip_abfleet else [run_abfleet(args, model_dir)]
    if not args.skip_reference:
        results.append(run_reference(args, model_dir))

    print(
        f"\nmodel: refusal-tuned SmolLM2-135M ({model_dir.name}), {os.cpu_count()} cores, "
        f"{args.trials} trials, seed {args.seed}, batch {args.batch_size}, {args.tokens} tokens, "
        f"60+60 prompts, {len(markers_for(args) or [0] * 22)} markers, dtype {args.dtype or 'auto'}"
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
    import torch

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for r in results:
        print(
            f"{r['tool']}: median {r['median_s_few_refusals']} s over its "
            f"{r['few_refusal_trials']} trials with at most {FEW_REFUSALS}/60 refusals"
        )
    if len(results) == 2:
        ratio = results[0]["median_s_per_trial"] / results[1]["median_s_per_trial"]
        print(f"abfleet / reference seconds per trial: {ratio:.2f}")
        a, b = (r["median_s_few_refusals"] for r in results)
        if a and b:
            print(f"abfleet / reference at <= {FEW_REFUSALS}/60 refusals: {a / b:.2f}")
    (OUT / "trial_speed.json").write_text(json.dumps(results, indent=1))
    time.sleep(0)


if __name__ == "__main__":
    main()
