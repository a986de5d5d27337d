"""What a run costs on demand and interruptible, from the sizing's time estimate.

An interruptible box runs at a bid (Vast's minimum bids are often about half the on-demand
price) but can be outbid. A pause costs three things: its time (the disk bills, the GPU does not),
the trial that was running (re-run: half a trial on average), and the reload of the model when
the container restarts (from the box's disk, not the hub). Pauses are counted per running hour,
so the reloads add running time, which adds pauses:

    running = work / (1 - pauses_per_hour * (reload + trial / 2))
    paused  = pauses_per_hour * running * pause_length

Every input is stated in the output: the rates are assumptions, not measurements of a market.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from abfleet.errors import UserError
from abfleet.fleet.sizing import Plan

STORAGE_PER_GB_MONTH = 0.15  # $; a typical Vast.ai storage_cost (offers show their own)
HOURS_PER_MONTH = 720
RELOAD_GB_PER_S = 1.0  # the model read again from the box's disk after a container restart


@dataclass(frozen=True)
class PauseRate:
    pauses_per_hour: float = 0.5  # per running hour
    pause_minutes: float = 20.0  # average length of a pause
    bid_ratio: float = 0.5  # bid over the on-demand price


@dataclass(frozen=True)
class CostEstimate:
    n_trials: int
    work_hours: float  # search, setup, re-score and export, uninterrupted
    on_demand_per_hour: float  # GPU and disk
    on_demand_usd: float
    bid_per_hour: float  # GPU at the bid, and disk
    disk_per_hour: float
    running_hours: float  # interruptible: the work plus reloads and re-run trials
    paused_hours: float
    pauses: float
    interruptible_usd: float
    rate: PauseRate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        r = self.rate
        saved = 1 - self.interruptible_usd / self.on_demand_usd if self.on_demand_usd else 0.0
        return [
            f"{self.n_trials} trials: about {self.work_hours:.1f} h of work (the sizing's estimate)",
            f"on demand: {self.on_demand_per_hour:.3f} $/h -> {self.on_demand_usd:.2f} $ "
            f"in {self.work_hours:.1f} h",
            f"interruptible at {r.bid_ratio:.0%} of that ({self.bid_per_hour:.3f} $/h with its "
            f"disk; {self.disk_per_hour:.3f} $/h while paused), {r.pauses_per_hour:g} pauses per "
            f"running hour of {r.pause_minutes:g} min: {self.pauses:.1f} pauses, "
            f"{self.running_hours:.1f} h running + {self.paused_hours:.1f} h paused -> "
            f"{self.interruptible_usd:.2f} $ ({saved:.0%} less, "
            f"{self.running_hours + self.paused_hours - self.work_hours:.1f} h later)",
        ]


def estimate(
    plan: Plan, n_trials: int, rate: PauseRate, rescore_factor: float = 0.0
) -> CostEstimate:
    search = plan.hours_for(n_trials)
    wrapup = plan.wrapup_hours(rescore_factor)
    if search is None or wrapup is None or not plan.price_per_hour:
        raise UserError(
            f"no time or price estimate for {plan.model} on {plan.gpu}: the cost model needs both"
        )
    if not (0 < rate.bid_ratio <= 1) or rate.pauses_per_hour < 0 or rate.pause_minutes < 0:
        raise UserError("--bid-ratio must be in (0, 1]; pauses and their length 0 or more")
    work = search + wrapup
    disk = plan.disk_gb * STORAGE_PER_GB_MONTH / HOURS_PER_MONTH
    trial_h = (plan.est_seconds_per_trial or 0.0) / 3600
    reload_h = plan.weights_gb / RELOAD_GB_PER_S / 3600
    lost_share = rate.pauses_per_hour * (reload_h + trial_h / 2)
    if lost_share >= 1:
        raise UserError(
            "at this pause rate a box never gets a trial done between pauses: rent on demand"
        )
    running = work / (1 - lost_share)
    pauses = rate.pauses_per_hour * running
    paused = pauses * rate.pause_minutes / 60
    bid = plan.price_per_hour * rate.bid_ratio + disk
    return CostEstimate(
        n_trials=n_trials,
        work_hours=work,
        on_demand_per_hour=plan.price_per_hour + disk,
        on_demand_usd=work * (plan.price_per_hour + disk),
        bid_per_hour=bid,
        disk_per_hour=disk,
        running_hours=running,
        paused_hours=paused,
        pauses=pauses,
        interruptible_usd=running * bid + paused * disk,
        rate=rate,
    )
