"""`abfleet list`: the ledger merged with what each provider reports.

Two mismatches are the reason this exists: an instance that bills but is not in the ledger
(created elsewhere, or a record lost), and a ledger entry the provider no longer knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from abfleet.errors import AbfleetError, reason
from abfleet.fleet.ledger import InstanceRecord, Ledger
from abfleet.fleet.providers import RENTED, get_provider
from abfleet.fleet.providers.base import Instance
from abfleet.fleet.rent import settle_pending
from abfleet.fleet.spend import instance_spend, observe, pause_note


@dataclass
class Inventory:
    rows: list[dict[str, Any]]
    unseen: list[str]  # rented providers that could not be asked, and why


def inventory(ledger: Ledger, include_destroyed: bool = False) -> Inventory:
    live: dict[tuple[str, str], Instance] = {}
    blind: dict[str, str] = {}  # provider -> why it could not be asked
    settled_rows: list[dict[str, Any]] = []
    for name in RENTED:
        try:
            instances = get_provider(name).list()  # no API key: the provider's own message
        except AbfleetError as exc:
            blind[name] = (
                f"cannot see {name} instances ({reason(exc)}); the list below is abfleet's ledger only"
            )
            continue
        live.update({(name, inst.id): inst for inst in instances})
        # Creates that got no answer are settled here, by label, rather than left pending.
        for row, inst in settle_pending(ledger, name, instances):
            if inst is None:
                settled_rows.append(
                    {
                        **_ledger_row(row, None, None),
                        "state": "create-failed",
                        "note": "create failed: the provider never made it; nothing bills",
                    }
                )
    records = ledger.instances(include_destroyed)
    runs = {}
    for run in ledger.runs():
        for iid in run.instances:  # each box of a run (the newest run on a reused box)
            runs[(run.provider, iid)] = run
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
        if rec.provider in RENTED and rec.provider not in blind:
            observe(ledger, rec, inst)
            run = runs.get(key)
            if inst is None and rec.state == "active" and run is not None and run.then_destroy:
                # Its guardian destroyed it once the run was delivered (pushed, or downloaded).
                ledger.mark_destroyed(rec.provider, rec.instance_id or "")
                rec = ledger.instance(rec.provider, rec.instance_id or "") or rec
                if not include_destroyed:
                    continue
        row = _ledger_row(rec, inst, runs.get(key))
        spend = instance_spend(ledger, rec)
        row.update(
            spent_usd=round(spend.usd, 4),
            rate_now=spend.rate_now,
            billing=spend.billing,
            spend_exact=spend.exact,
        )
        if rec.provider in blind:
            row.update(state="unknown", note=f"{rec.provider} could not be asked")
        rows.append(row)
    rows += settled_rows
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
                "spent_usd": None,
                "rate_now": inst.price_per_hour
                if inst.state != "stopped"
                else inst.storage_per_hour,
                "billing": "running" if inst.state != "stopped" else "stopped",
                "note": "NOT IN LEDGER: it bills, but abfleet has no record of creating it",
            }
        )
    return Inventory(rows, list(blind.values()))


def _ledger_row(rec: InstanceRecord, inst: Instance | None, run: Any) -> dict[str, Any]:
    note = ""
    if rec.state == "creating":
        note = "create unresolved: run `abfleet list` again in a minute"
    elif rec.state == "destroyed":
        note = "destroyed"
    elif inst is None:
        note = "vanished: the provider no longer knows it (destroyed elsewhere?)"
    elif inst.outbid:
        note = pause_note(rec)
    elif run is not None and run.box_note and inst.state != "stopped":
        note = run.box_note  # e.g. its self-stop failing, as `status` or `watch` last saw it
    return {
        "id": rec.instance_id or f"(pending {rec.key})",
        "provider": rec.provider,
        "label": rec.label,
        "gpu": f"{(inst.gpu_count if inst else rec.gpu_count) or ''}x {(inst.gpu_name if inst else rec.gpu_name) or ''}".strip(),
        "state": ("outbid" if inst.outbid else inst.state)
        if inst
        else ("destroyed" if rec.state == "destroyed" else "gone"),
        "price_per_hour": inst.price_per_hour if inst else rec.price_per_hour,
        "started_at": (inst.started_at if inst else None) or rec.created_at,
        "ended_at": rec.destroyed_at,  # its time (and its bill) stopped there
        "run": run.name if run else None,
        "run_state": run.state if run else None,
        "in_ledger": True,
        "note": note,
    }


def settle_open_creates(ledger: Ledger) -> None:
    """Before a command picks an instance: creates that got no answer are settled by the
    provider's list (a reachable provider only; `list` says when one is not)."""
    for name in {r.provider for r in ledger.instances() if r.state == "creating"} & set(RENTED):
        try:
            settle_pending(ledger, name, get_provider(name).list())
        except AbfleetError:
            continue
