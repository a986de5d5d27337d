"""Expected $ of a 32B x 200-trial run on demand and interruptible, at stated pause rates.

    python benchmarks/interruptible_cost.py [--config benchmarks/configs/qwen2.5-32b] [--trials 200]

The work time is the sizing's estimate (abfleet size); the same model is shown scaled to the
field's reported 9-11 h (10 h) for comparison, since the sizing's per-trial figure is rough.
Each row: pauses per running hour, pause length, bid ratio -> $ and hours.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from abfleet.fleet.pausecost import PauseRate, estimate
from abfleet.fleet.sizing import plan_for

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "benchmarks" / "configs" / "qwen2.5-32b"))
    ap.add_argument("--trials", type=int, default=200)
    args = ap.parse_args()
    plan = plan_for(args.config, None)
    # The field's figure: 9-11 h on one H200 for 32B x 200 trials; 10 h, setup included.
    field = dataclasses.replace(
        plan, est_seconds_per_trial=(10 - (plan.hours_for(0) or 0)) * 3600 / args.trials
    )
    print(f"{plan.model}: {plan.gpu_count}x {plan.gpu} at {plan.price_per_hour} $/h on demand")
    rates = [
        PauseRate(0.0, 0, 0.5),
        PauseRate(0.25, 20, 0.5),
        PauseRate(0.5, 20, 0.5),
        PauseRate(1.0, 30, 0.5),
        PauseRate(0.5, 20, 0.6),
    ]
    for name, p in (("sizing's estimate", plan), ("field's 10 h", field)):
        print(f"\n{name}:")
        print(
            f"{'pauses/h':>9} {'min':>4} {'bid':>4} {'on demand $':>12} {'interr. $':>10} "
            f"{'hours':>6} {'interr. h':>9}"
        )
        for r in rates:
            c = estimate(p, args.trials, r)
            print(
                f"{r.pauses_per_hour:9.2f} {r.pause_minutes:4.0f} {r.bid_ratio:4.0%} "
                f"{c.on_demand_usd:12.2f} {c.interruptible_usd:10.2f} {c.work_hours:6.1f} "
                f"{c.running_hours + c.paused_hours:9.1f}"
            )


if __name__ == "__main__":
    main()
