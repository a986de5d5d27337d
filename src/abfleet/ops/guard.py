"""Guard rails for stop and destroy: show the exact target, then refuse what would lose work.

destroy refuses while the finished model is not downloaded and verified, or the study backup
lacks completed trials (--force overrides); stop refuses while a trial runs (--force), since
stopping a Vast.ai instance kills its processes at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abfleet.errors import AbfleetError, UserError, reason
from abfleet.fleet.ledger import Ledger
from abfleet.ops.monitor import RunView, Target, backup_is_fresh
from abfleet.render import fmt_duration


@dataclass
class Assessment:
    target: Target
    snapshot: dict[str, Any] | None
    reach_error: str | None
    instance_state: str | None
    model_verified: bool
    backup_fresh: bool | None
    backup_note: str
    continued_in: str | None = None  # the run was resumed elsewhere; its model came home there
    pushed: str | None = None  # the Hub URL the verified export went to
    others: list[str] = field(default_factory=list)  # other runs on the box that are not home
    lines: list[str] = field(default_factory=list)

    @property
    def trial_running(self) -> bool:
        """The worker is searching (a trial runs, or the next starts within milliseconds) or
        exporting: stopping now loses that work."""
        if not self.snapshot:
            return False
        return self.snapshot.get("state") in (
            "searching",
            "rescoring",
            "exporting",
            "judging",
            "benchmarking",
        )


def assess(
    ledger: Ledger, target: Target, provider: Any | None = None, timeout: float = 15
) -> Assessment:
    rec, run = target.instance, target.run
    snap, err = None, None
    if run is not None and rec.remote_root:
        view = None
        try:
            view = RunView(ledger, target, timeout=timeout)
            snap = view.snapshot()
        except AbfleetError as exc:
            err = str(exc)
        finally:
            if view is not None:
                view.close()
    live = None
    if provider is not None:
        try:
            inst = provider.get(rec.instance_id or "")
            live = inst.state if inst else "gone"
        except AbfleetError as exc:
            live = f"unknown ({reason(exc)})"
    verified = bool(run and run.verified)
    push = ((snap or {}).get("output") or {}).get("push") or {}
    pushed = bool(push.get("url")) and not push.get("error")  # checked against the manifest
    fresh, note = (
        (True, "no run on this instance")
        if run is None
        else backup_is_fresh(
            Path(run.local_dir), snap, run.exported_trials if run.verified else None
        )
    )
    if pushed and not verified:
        verified, fresh, note = True, True, f"not needed: the model was pushed to {push['url']}"
    a = Assessment(target, snap, err, live, verified, fresh, note)
    a.pushed = push.get("url") if pushed else None
    a.continued_in = _home_elsewhere(ledger, run)
    a.others = [
        r.name
        for r in ledger.runs_on(rec.provider, rec.instance_id or "")
        if r.name != (run.name if run else None)
        and not r.verified
        and not _home_elsewhere(ledger, r)
    ]
    a.lines = describe(a)
    return a


def _home_elsewhere(ledger: Ledger, run: Any) -> str | None:
    """The run continued on another box (abfleet resume) and that model is downloaded and
    verified: this box holds nothing that is still needed for it."""
    last = ledger.continuation(run) if run is not None else None
    return last.name if last is not None and last.verified else None


def describe(a: Assessment) -> list[str]:
    rec, run, snap = a.target.instance, a.target.run, a.snapshot
    up = fmt_duration(time.time() - rec.created_at)
    price = f"{rec.price_per_hour:.3f} $/h" if rec.price_per_hour else "not billed by abfleet"
    lines = [
        f"instance {rec.instance_id} ({rec.provider}), label {rec.label}",
        f"{rec.gpu_count or '?'}x {rec.gpu_name or '?'}, {price}, up {up} (since abfleet created it)"
        + (f", state {a.instance_state}" if a.instance_state else ""),
    ]
    if run is None:
        lines.append("no run was submitted to it")
        return lines
    if snap:
        t = snap.get("trials", {})
        lines.append(
            f"run {run.name}: {snap.get('state')}, {t.get('complete', 0)}/{t.get('total')} trials, {t.get('running', 0)} running"
        )
    else:
        lines.append(f"run {run.name}: state unknown ({a.reach_error or 'not reachable'})")
    if a.continued_in:
        lines.append(f"continued as run {a.continued_in}, whose model is downloaded and verified")
    elif a.pushed:
        lines.append(f"model: pushed to {a.pushed}, verified against its manifest")
    elif a.model_verified:
        lines.append(
            f"model: downloaded and verified {time.strftime('%Y-%m-%d %H:%M', time.localtime(run.downloaded_at or 0))}"
        )
    else:
        lines.append("model: NOT downloaded and verified")
    lines.append(f"study backup: {a.backup_note}")
    lines += [f"also on this box: run {name}, NOT downloaded" for name in a.others]
    return lines


def check_destroy(a: Assessment, force: bool) -> None:
    if force:
        return
    problems = []
    if a.target.run is not None and not a.continued_in:
        if not a.model_verified:
            problems.append("the finished model is not downloaded and verified (abfleet download)")
        if a.backup_fresh is not True:
            problems.append(f"the study backup is not current: {a.backup_note} (abfleet backup)")
    problems += [f"run {name} on it is not downloaded" for name in a.others]
    if problems:
        raise UserError("refusing to destroy: " + "; ".join(problems) + "; --force destroys anyway")


def check_stop(a: Assessment, force: bool) -> None:
    if force:
        return
    if a.trial_running:
        state = a.snapshot.get("state") if a.snapshot else "?"
        raise UserError(
            f"refusing to stop: the worker is {state} and stopping kills it at once; --force stops anyway"
        )


def confirm_typed(instance_id: str, action: str, yes: bool, ask: Any) -> None:
    """The user types the instance id; anything else (or no terminal without --yes) changes nothing."""
    from abfleet.errors import Declined

    if yes:
        return
    if ask is None:
        raise Declined(
            f"refusing to {action} without confirmation: there is no terminal to ask on; pass --yes"
        )
    typed = ask(f"type the instance id ({instance_id}) to {action} it")
    if typed.strip() != instance_id:
        raise Declined(f"you typed {typed.strip()!r}, not {instance_id}: nothing was changed")
