"""An interruptible box outbid for longer than the run's --max-pause: the run moves.

The move is what `abfleet resume` does, without asking, because the user chose it at launch:
the latest local backup of the study goes to another offer (interruptible at the same bid
policy first, else on demand), never above the $/h the user confirmed for the paused box; once
the new box runs the run, the paused one is destroyed. The trials completed on the paused box
after the backup are lost, and counted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from abfleet.errors import AbfleetError, NoOffers, reason
from abfleet.fleet.ledger import InstanceRecord, Ledger, RunRecord
from abfleet.fleet.providers.base import Bid
from abfleet.ops.monitor import read_backup_meta
from abfleet.render import fmt_duration

log = logging.getLogger(__name__)

Say = Callable[[str], None]


def due(run: RunRecord | None, rec: InstanceRecord, now: float | None = None) -> bool:
    """Whether the run on this box has been paused longer than its --max-pause."""
    if run is None or not run.max_pause_s or rec.paused_since is None:
        return False
    if run.continued_by or run.state in ("done", "failed", "continued"):
        return False
    return (now or time.time()) - rec.paused_since >= run.max_pause_s


def move(
    ledger: Ledger, run: RunRecord, rec: InstanceRecord, last_seen: int | None, say: Say
) -> str | None:
    """Continue `run` on another box from its backup; the new run's name, or None when no
    offer fits yet (the run keeps waiting on the paused box, and the next look tries again)."""
    from pathlib import Path

    from abfleet.ops.resume import resume

    meta = read_backup_meta(Path(run.local_dir))
    if meta is None:
        say(f"run {run.name} is paused past --max-pause but has no backup to move: it waits")
        return None
    cap = rec.price_per_hour  # what the user confirmed for the paused box, disk included
    policy = _policy(rec)
    exclude = tuple(m for m in [_machine(rec)] if m is not None)
    paused_for = time.time() - (rec.paused_since or time.time())
    say(
        f"run {run.name}: instance {rec.instance_id} outbid for "
        f"{fmt_duration(paused_for, live=True)} "
        f"(--max-pause {run.max_pause_s / 60:g} min): moving it to another box from its "
        f"backup ({meta['complete']} completed trials), at most {cap:.3f} $/h"
    )
    # Interruptible at the same bid policy first, else on demand; never above the cap.
    for bid in [policy, None] if policy is not None else [None]:
        try:
            new_run = resume(
                ledger,
                run.name,
                here=False,
                provider_name=rec.provider,
                host=None,
                trials=None,
                yes=True,  # agreed at launch (--max-pause), within the confirmed $/h
                max_price=cap,
                confirm=None,
                say=say,
                budget_usd=run.budget_usd or 0.0,
                bid=bid,
                exclude=exclude,
                destroy_old=True,
            )
        except NoOffers as exc:
            log.info("no %s offer to move %s to: %s", "bid" if bid else "on-demand", run.name, exc)
            continue
        except AbfleetError as exc:
            say(f"run {run.name}: the move failed ({reason(exc)}); it waits on the paused box")
            return None
        break
    else:
        say(
            f"run {run.name}: no offer at or below {cap:.3f} $/h right now: it waits on the "
            "paused box, and the next look tries again"
        )
        return None
    if last_seen is not None:  # a backup taken after the last look holds more than it saw
        last_seen = max(last_seen, int(meta["complete"]))
    lost = (last_seen or 0) - int(meta["complete"])
    record: dict[str, Any] = {
        "from_run": run.name,
        "from_instance": rec.instance_id,
        "at": time.time(),
        "paused_s": round(paused_for),
        "backup_complete": int(meta["complete"]),
        "last_seen_complete": last_seen,
        "lost_trials": lost,
    }
    if new_run:
        ledger.update_run(new_run, moved=json.dumps(record))
        say(moved_line(record))
    return new_run


def moved_line(record: dict[str, Any]) -> str:
    seen = record.get("last_seen_complete")
    lost = (
        f"{record['lost_trials']} completed trial(s) lost (the box had {seen} when last seen, "
        f"its backup {record['backup_complete']})"
        if seen is not None
        else f"trials completed after its backup ({record['backup_complete']}) are lost"
    )
    return (
        f"moved from instance {record['from_instance']} (run {record['from_run']}) after "
        f"{fmt_duration(record['paused_s'], live=True)} outbid: {lost}"
    )


def _policy(rec: InstanceRecord) -> Bid | None:
    offer = rec.offer or {}
    if offer.get("bid") is None:
        return None
    min_bid = offer.get("min_bid")
    margin = offer["bid"] / min_bid - 1 if min_bid else 0.1
    return Bid(None, max(0.0, round(margin, 4)))


def _machine(rec: InstanceRecord) -> int | None:
    value = (rec.offer or {}).get("machine_id")
    return int(value) if value is not None else None
