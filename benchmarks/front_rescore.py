"""The demo job's Pareto front screened at 30 tokens and re-scored at 128, with and without
norm-preserving ablation, and the time the re-score adds.

    python benchmarks/front_rescore.py                # 40 trials per variant
    python benchmarks/front_rescore.py --trials 60
    python benchmarks/front_rescore.py --only plain --reuse   # print a finished variant again

The whole front is re-scored (--rescore front) so that both caps can be compared; a normal run
re-scores only the trials that can still be chosen.

Each variant is a plain `abfleet run` of the shipped refusal job (demo model, its prompts, seed
42) in its own run folder under benchmarks/out/front/; figures come from the study and the
exported abfleet-run.json. Run it alone: a second torch process on the same cores skews times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out" / "front"


VARIANTS = {"plain": ["--no-norm-preserving"], "norm-preserving": ["--norm-preserving"]}


def run_variant(name: str, trials: int, extra: list[str], reuse: bool) -> dict:
    out = OUT / name
    wall = None
    if not (reuse and (out / "model" / "abfleet-run.json").is_file()):
        shutil.rmtree(out, ignore_errors=True)
        started = time.monotonic()
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "abfleet", "run", "--trials", str(trials)),
                *("--output", str(out), "--rescore", "front", *extra),
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        wall = time.monotonic() - started
        if proc.returncode != 0:
            sys.exit(f"{name}: abfleet run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    record = json.loads((out / "model" / "abfleet-run.json").read_text())
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="refusal", storage=f"sqlite:///{out / 'study.db'}")
    rescore = study.user_attrs["rescore"]
    rows = []
    for key, entry in rescore["entries"].items():
        if key == "baseline":
            continue
        t = study.trials[int(key)]
        rows.append(
            {
                "trial": t.number,
                "kl": t.user_attrs["kl"],
                "short": t.user_attrs["refusals"],
                "long": entry["refusals"],
                "deg_short": t.user_attrs["degenerate"],
                "deg_long": entry["degenerate"],
                "n": entry["n_bad"],
            }
        )
    return {"record": record, "rows": sorted(rows, key=lambda r: r["kl"]), "wall": wall}


def show(name: str, result: dict) -> None:
    record = result["record"]
    before, after, timings = record["before"], record["after"], record["timings"]
    wall = f"{result['wall']:.0f} s" if result["wall"] else "reused"
    print(f"\n== {name}: {record['study']['complete']} trials, wall {wall}")
    print(
        f"   search {timings.get('search', 0):.0f} s, re-score of the front "
        f"{timings.get('rescore', 0):.0f} s ({len(result['rows'])} trials + the original model)"
    )
    print(
        f"   before: refusals {before['refusals']}/{before['n_bad']} at 30 tokens, "
        f"{before.get('long_refusals')}/{before['n_bad']} at 128"
    )
    print(
        f"   chosen: trial {record['chosen']['trial']} ({record['chosen']['reason']}): "
        f"refusals {after['refusals']} at 30, {after.get('long_refusals')} at 128, "
        f"KL {after['kl']:.3f}, degenerate {after['degenerate']}/{after.get('long_degenerate')}"
    )
    print(f"   {'trial':>5} {'KL':>6} {'@30':>5} {'@128':>5} {'deg@30':>7} {'deg@128':>8}")
    for r in result["rows"]:
        print(
            f"   {r['trial']:>5} {r['kl']:>6.3f} {r['short']:>5} {r['long']:>5} "
            f"{r['deg_short']:>7} {r['deg_long']:>8}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--only", choices=sorted(VARIANTS), help="Run one variant.")
    parser.add_argument("--reuse", action="store_true", help="Read a finished variant's folder.")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, extra in VARIANTS.items():
        if args.only in (None, name):
            show(name, run_variant(name, args.trials, extra, args.reuse))


if __name__ == "__main__":
    main()
