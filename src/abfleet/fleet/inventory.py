"""`abfleet list`: the ledger merged with what each provider reports.

Two mismatches are the reason this exists: an instance that bills but is not in the ledger
(created elsewhere, or a record lost), and a ledger entry the provider no longer knows.
"""

from __future__ import annotations

from typing import Any

from abfleet.fleet.ledger import Ledger
from abfleet.fleet.providers import RENTED, get_provider, has_account
from abfleet.fleet.providers.base import Instance


def inventory(ledger: Ledger, include_destroyed: bool = False) -> list[dict[str, Any]]:
    records = ledger.instances(include_destroyed)
    live: dict[tuple[str, str], Instance] = {}
    for name in RENTED:
        if has_account(name) or any(r.provider == name for r in records if r.state != "destroyed"):
            for inst in get_provider(name).list():
                live[(name, inst.id)] = inst
    runs = {}
    for run in ledger.runs():
        runs[(run.provider, run.instance_id)] = run
    rows = []
    known = set()
    for rec in records:
        key = (rec.provider, rec.instance_id or "")
        known.add(key)
        inst = (
            live.get(key)
            if rec.provider in RENTED
            else get_provider(rec.provider).get(rec.instance_id or "")
        )
        note = ""
        if rec.state == "creating":
            note = "create unresolved: run `abfleet list` again in a minute"
        elif rec.state == "destroyed":
            note = "destroyed"
        elif inst is None:
            note = "vanished: the provider no longer knows it (destroyed elsewhere?)"
        run = runs.get(key)
        rows.append(
            {
                "id": rec.instance_id or f"(pending {rec.key})",
                "provider": rec.provider,
                "label": rec.label,
                "gpu": f"{(inst.gpu_count if inst else rec.gpu_count) or ''}x {(inst.gpu_name if inst else rec.gpu_name) or ''}".strip(),
                "state": inst.state
                if inst
                else ("destroyed" if rec.state == "destroyed" else "gone"),
                "price_per_hour": inst.price_per_hour if inst else rec.price_per_hour,
                "started_at": (inst.started_at if inst else None) or rec.created_at,
                "run": run.name if run else None,
                "run_state": run.state if run else None,
                "in_ledger": True,
                "note": note,
            }
        )
    for key, inst in live.items():
        if key in known:
            continue
        rows.append(
            {
                "id": inst.id,
                "provider": inst.provider,
                "label": inst.label,
                "gpu": f"{inst.gpu_count}x {inst.gpu_name}",
                "state": inst.state,
                "price_per_hour": inst.price_per_hour,
                "started_at": inst.started_at,
                "run": None,
                "run_state": None,
                "in_ledger": False,
                "note": "NOT IN LEDGER: it bills, but abfleet has no record of creating it",
            }
        )
    return rows
