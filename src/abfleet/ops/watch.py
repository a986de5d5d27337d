"""`abfleet watch`: refresh the dashboard over one persistent SSH connection.

A refresh that fails (dropped connection, box rebooting, a timeout) never ends the watch: the
last snapshot stays on screen marked stale, and the connection is re-opened with backoff.
Ctrl+C ends the watch and nothing else: the run on the box is untouched.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from rich.live import Live

from abfleet.console import console
from abfleet.errors import AbfleetError
from abfleet.fleet.ledger import Ledger
from abfleet.fleet.providers import RENTED, get_provider
from abfleet.fleet.spend import instance_spend, observe, pause_note
from abfleet.ops.actions import note_state
from abfleet.ops.dashboard import ViewInfo, render
from abfleet.ops.monitor import RunView, Target, read_backup_meta

log = logging.getLogger(__name__)


class Watcher:
    def __init__(
        self,
        ledger: Ledger,
        target: Target,
        backup: bool = True,
        say: Callable[[str], None] = console.print,
    ) -> None:
        rec = target.instance
        self.say = say
        self.ledger = ledger
        self.target = target
        self.backup = backup
        self.runview: RunView | None = None
        self.snapshot: dict | None = None
        self.failures = 0
        self.next_try = 0.0
        self.info = ViewInfo(
            instance_id=rec.instance_id or "?",
            gpu=f"{rec.gpu_count or '?'}x {rec.gpu_name or '?'}",
            price_per_hour=rec.price_per_hour,
            created_at=rec.created_at,
            run=target.run.name if target.run else "-",
            backup=read_backup_meta(_local(target)),
            budget_usd=target.run.budget_usd if target.run else None,
        )
        self.last_look = 0.0
        self._meter()

    def _meter(self, look: bool = False) -> None:
        """Spend from the ledger's meter; when the box does not answer, ask the provider what
        it bills now (a stopped box bills its disk, not its GPU), at most every 30 s."""
        run = self.target.run
        recs = [self.target.instance]
        if run is not None:
            found = [self.ledger.instance(run.provider, iid) for iid in run.instances]
            recs = [r for r in found if r is not None] or recs
        if recs[0].provider not in RENTED:
            return
        if look and time.time() - self.last_look > 30:
            self.last_look = time.time()
            try:
                provider = get_provider(recs[0].provider)
                for rec in recs:
                    observe(self.ledger, rec, provider.get(rec.instance_id or ""))
            except AbfleetError as exc:
                log.info("could not ask the provider what the run bills: %s", exc)
        spends = [instance_spend(self.ledger, r) for r in recs]
        self.info.spent_usd = sum(s.usd for s in spends)
        self.info.rate_now = sum(s.rate_now for s in spends)
        states = {s.billing for s in spends}
        self.info.billing = next((b for b in ("running", "stopped") if b in states), "ended")

    def refresh(self) -> None:
        now = time.time()
        if now < self.next_try:
            return
        try:
            if self.runview is None:
                self.runview = RunView(self.ledger, self.target, timeout=15)
            snap = self.runview.snapshot()
            self.snapshot = snap
            self.info.refreshed_at = time.time()
            self.info.stale_since = None
            self.info.error = None
            self.info.paused = None
            self.failures = 0
            self._answered()
            note_state(self.ledger, self.target, snap)
            if self.backup:
                self.info.backup = self.runview.backup(snap)
            self._meter()
        except (AbfleetError, OSError, EOFError, ValueError) as exc:
            self._lost(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except Exception as exc:
            log.exception("watch refresh failed")
            self._lost(f"{type(exc).__name__}: {exc}")

    def _lost(self, why: str) -> None:
        self._meter(look=True)
        if self._pause():
            return  # the run moved: the new box is watched from now on
        self.failures += 1
        if self.info.stale_since is None:
            self.info.stale_since = time.time()
        self.info.error = why
        if self.runview is not None:
            try:
                self.runview.close()
            finally:
                self.runview = None
        self.next_try = time.time() + min(2 ** (self.failures - 1), 30)

    def _answered(self) -> None:
        """The box answered: it is not outbid, whatever an earlier look recorded (a pause
        must never be counted from before the box came back)."""
        rec = self.target.instance
        current = self.ledger.instance(rec.provider, rec.instance_id or "")
        if current is not None and current.paused_since is not None:
            self.ledger.update(current.key, paused_since=None)

    def _pause(self) -> bool:
        """An outbid box: say so, and move the run once it has been paused past --max-pause;
        True when it moved."""
        from abfleet.ops import pauses

        rec = self.ledger.instance(
            self.target.instance.provider, self.target.instance.instance_id or ""
        )
        if rec is None:
            return False
        self.info.paused = pause_note(rec) or None
        run = self.ledger.run(self.target.run.name) if self.target.run else None
        if self.info.paused and run is not None and run.max_pause_s:
            self.info.paused += f"; after {run.max_pause_s / 60:g} min the run moves to another box"
        if not pauses.due(run, rec) or run is None:
            return False
        seen = [(self.snapshot or {}).get("trials", {}).get("complete"), run.last_complete]
        last_seen = max((n for n in seen if n is not None), default=None)
        new_run = pauses.move(self.ledger, run, rec, last_seen, self.say)
        moved = self.ledger.run(new_run) if new_run else None
        inst = self.ledger.instance(moved.provider, moved.instance_id or "") if moved else None
        if moved is None or inst is None:
            return False
        # Watch the run where it goes on: a new box, a new snapshot.
        self.close()
        self.__init__(self.ledger, Target(inst, moved), self.backup, self.say)  # type: ignore[misc]
        self.info.moved = pauses.moved_line(json.loads(moved.moved)) if moved.moved else None
        return True

    def view(self):
        return render(self.snapshot, self.info)

    def close(self) -> None:
        if self.runview is not None:
            self.runview.close()


def _local(target: Target):
    from pathlib import Path

    return Path(target.run.local_dir) if target.run else Path("/nonexistent")


def watch(ledger: Ledger, target: Target, interval: float, once: bool, backup: bool = True) -> None:
    watcher = Watcher(ledger, target, backup)
    try:
        if once:
            watcher.refresh()
            console.print(watcher.view())
            if watcher.info.error is not None:
                # A script must not take an unreachable box for a healthy one.
                raise AbfleetError(f"the box did not answer: {watcher.info.error}")
            return
        with Live(watcher.view(), console=console, refresh_per_second=2, screen=False) as live:
            while True:
                watcher.refresh()
                live.update(watcher.view())
                deadline = time.time() + interval
                while time.time() < deadline:
                    time.sleep(0.25)
                    live.update(
                        watcher.view()
                    )  # keeps "refreshed N s ago" and the stale timer moving
    except KeyboardInterrupt:
        console.print("watch stopped; the run on the box goes on")
    finally:
        watcher.close()
