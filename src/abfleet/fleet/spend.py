"""Money spent so far, from the ledger: each instance bills its full $/h while running and its
disk's $/h while stopped, from its create until its destroy.

What abfleet records: its own stop, start and destroy at the moment it makes them, and any other
change (a box that stopped itself, a stop in the provider's console) at the moment it first
sees it. The latter is corrected to the exact time once the box can tell (after a start).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from abfleet.fleet.ledger import InstanceRecord, Ledger
from abfleet.fleet.providers.base import PENDING, RUNNING, STOPPED, Instance

BILLING_STATES = {RUNNING: "running", PENDING: "running", STOPPED: "stopped"}


@dataclass(frozen=True)
class Spend:
    usd: float
    running_s: float
    stopped_s: float
    billing: str  # running, stopped, or ended (destroyed / never created)
    rate_now: float  # $/h it bills at this moment
    exact: bool  # False: a stop abfleet saw late, so running time may be overstated


def instance_spend(ledger: Ledger, rec: InstanceRecord, now: float | None = None) -> Spend:
    if rec.state == "create-failed" or not rec.instance_id:
        return Spend(0.0, 0.0, 0.0, "ended", 0.0, True)
    now = now or time.time()
    end = rec.destroyed_at or now
    rates = {"running": rec.price_per_hour or 0.0, "stopped": rec.storage_per_hour or 0.0}
    seconds = {"running": 0.0, "stopped": 0.0}
    state, since, exact = "running", rec.created_at, True
    for at, new_state, was_exact in ledger.meter_events(rec.provider, rec.instance_id):
        at = min(max(at, since), end)
        seconds[state] += at - since
        state, since, exact = new_state, at, exact and was_exact
    seconds[state] += max(0.0, end - since)
    usd = sum(rates[s] * seconds[s] / 3600 for s in seconds)
    billing = "ended" if rec.destroyed_at else state
    return Spend(
        usd,
        seconds["running"],
        seconds["stopped"],
        billing,
        0.0 if billing == "ended" else rates[state],
        exact,
    )


def observe(ledger: Ledger, rec: InstanceRecord, live: Instance | None) -> None:
    """Note a change of billing state the provider shows, at the time it is seen."""
    if live is None or not rec.instance_id or rec.state != "active":
        return
    state = BILLING_STATES.get(live.state)
    if state is not None:
        ledger.meter_mark(rec.provider, rec.instance_id, state, exact=False)
    if live.outbid and rec.paused_since is None:
        rec.paused_since, rec.pauses = time.time(), (rec.pauses or 0) + 1
        ledger.update(rec.key, paused_since=rec.paused_since, pauses=rec.pauses)
    elif not live.outbid and rec.paused_since is not None:
        rec.paused_since = None
        ledger.update(rec.key, paused_since=None)
    if live.storage_per_hour is not None and rec.storage_per_hour is None:
        ledger.update(rec.key, storage_per_hour=live.storage_per_hour)
        rec.storage_per_hour = live.storage_per_hour


def pause_note(rec: InstanceRecord, now: float | None = None) -> str:
    """What a user reads about an outbid box: since when, how often, what it bills."""
    if rec.paused_since is None:
        return ""
    from abfleet.render import fmt_duration

    now = now or time.time()
    since = time.strftime("%H:%M", time.localtime(rec.paused_since))
    times = f", pause {rec.pauses}" if (rec.pauses or 0) > 1 else ""
    disk = f"{rec.storage_per_hour:.3f} $/h" if rec.storage_per_hour is not None else "?"
    return (
        f"OUTBID since {since} ({fmt_duration(now - rec.paused_since, live=True)}{times}): paused, bills "
        f"only its disk ({disk}); the run goes on when the bid wins again"
    )
