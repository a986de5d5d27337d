"""The box's guardian: one small process per rented box, apart from every worker, that alone
ends the box's bill.

It is started detached with the first run on the box (`infra/start-guardian.sh`) and again by
the onstart script on every container start; a lock file keeps it to one per box however many
runs it hosts. Every few seconds it looks at each run folder under ROOT/runs that has box terms:

- a worker that died without a final state (OOM, a native crash, a container restart) is
  started again (its running trial goes stale and is re-queued with its parameters); one whose
  trial ran far longer than any trial before is killed first (a hung worker, whose heartbeat
  thread would otherwise keep its trial alive forever);
- the run's spend is metered (running rate while it watches, disk rate across a gap when the box
  was stopped); at the budget the workers are told to end and export (`budget-reached.json`),
  and killed if they are still at it after a bounded window;
- once no worker of any run is alive, and the grace period has passed (none at the budget; the
  end of a download's lease when one was taken), it sends the provider's stop, or its destroy
  when the user chose that and the results are delivered (downloaded and verified, or pushed
  and verified against the manifest). A failed call is retried with backoff for as long as the
  box runs, and every failure is written to ROOT/guardian.json, which the snapshot (and so
  `status`, `progress` and `watch`) shows.

It imports no torch and no Optuna unless the study's host must wait for other boxes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abfleet.worker.publish import read_outcome
from abfleet.worker.rundir import FINAL_STATES, RunDir, write_json_atomic
from abfleet.worker.selfstop import (
    DOWNLOADED_MARK,
    SELF_STOP_FILE,
    BoxTerms,
    ProviderCallFailed,
    call_provider,
)

log = logging.getLogger(__name__)

GUARD_FILE = "guardian.json"  # ROOT/: what the guardian sees and plans, rewritten every step
LEASE_FILE = "lease.json"  # ROOT/: {"until": t}: a download holds the box up until then
LOCK_FILE = "guardian.lock"
BUDGET_MARK = "budget-reached.json"  # RUN/: the workers end after this trial and export
METER_FILE = "meter.json"  # RUN/: the run's spend, as the guardian metered it
STARTED_FILE = "container-started"  # ROOT/: the epoch second of the container's last start
USER_STOPPED = ".stopped-by-user"  # RUN/: `abfleet stop` ended the workers: never restart them
MAX_RESTARTS = 2  # per worker, after its first restart (a crash that repeats is final)
EVENTS_KEPT = 20


@dataclass(frozen=True)
class GuardTimes:
    """The guardian's timings; the controller sets them ([guardian] in its config)."""

    poll_s: float = 10.0
    hang_s: float = 1800.0  # a trial running this long (and 5x the slowest so far) is hung
    lease_s: float = 600.0  # a download's lease, renewed by the controller while it works
    budget_window_s: float = 600.0  # at the budget, the workers' time to export before a kill
    retry_first_s: float = 5.0  # provider call backoff: first wait, doubling to retry_max_s
    retry_max_s: float = 300.0

    @classmethod
    def from_terms(cls, terms: BoxTerms) -> GuardTimes:
        known = {k: float(v) for k, v in terms.guard.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def launch_file(run: RunDir, index: int) -> Path:
    """How worker INDEX was started (GPUs on the first line, then one argument a line)."""
    return run.path / f"worker-{index}.launch"


def container_started(root: Path) -> float | None:
    """When this container last started (infra/onstart.sh writes it on every start)."""
    try:
        return float((root / STARTED_FILE).read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def budget_reached(run: RunDir) -> bool:
    return (run.path / BUDGET_MARK).is_file()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def metered_spend(run: RunDir, terms: BoxTerms, now: float | None = None) -> float:
    """What the run has cost so far: the guardian's meter carried forward, else wall time."""
    now = now or time.time()
    meter = read_json(run.path / METER_FILE)
    if meter is None:
        return terms.spent(now)
    return float(meter["spent_usd"]) + terms.rate_per_hour * max(0.0, now - meter["at"]) / 3600


@dataclass
class _Worker:
    index: int
    pid: int | None
    alive: bool
    status: dict[str, Any]


@dataclass
class Guardian:
    root: Path
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    clock: Callable[[], float] = time.time
    started_at: float = 0.0
    state: dict[str, Any] = field(default_factory=dict)
    children: dict[tuple[str, int], subprocess.Popen] = field(default_factory=dict)
    restarts: dict[tuple[str, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.started_at = self.clock()
        before = read_json(self.root / GUARD_FILE) or {}
        # What earlier guardians of this box did stays readable (a restart is an event too).
        self.state = {"pid": os.getpid(), "started_at": self.started_at, "events": []}
        self.state["events"] = list(before.get("events") or [])[-EVENTS_KEPT:]
        self._note(f"guardian started (pid {os.getpid()})")

    # -- the loop ---------------------------------------------------------------------------

    def run_forever(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        log.info("guardian %d watching %s", os.getpid(), self.root)
        while not should_stop():
            poll = 10.0
            try:
                poll = self.step()
            except Exception:
                log.exception("guardian step failed; trying again")
            deadline = time.monotonic() + poll
            while time.monotonic() < deadline and not should_stop():
                time.sleep(min(0.5, poll))

    def step(self) -> float:
        """Look once, act if due; returns the seconds until the next look."""
        now = self.clock()
        for child in list(self.children.values()):
            child.poll()  # reap the workers it started, so their pids read as gone
        runs = self._runs()
        if not runs:
            self._save(phase="idle", detail="no run with box terms yet")
            return 10.0
        newest = max(runs, key=lambda rt: rt[1].billing_since)[1]
        times = GuardTimes.from_terms(newest)
        over = True
        budget_hit = False
        for run, terms in runs:
            run_over, hit = self._tend(run, terms, times, now)
            over &= run_over
            budget_hit |= hit
        if self.state.get("done"):
            done = self.state["done"]
            # The provider took the request; if this box still runs minutes later, ask again.
            if now - done["at"] < max(300.0, 5 * times.poll_s):
                self._save()
                return times.poll_s
            self._note(f"the box still runs {now - done['at']:.0f} s after its {done['action']}")
            self.state.pop("done")
        if not over:
            self.state.pop("work_over_at", None)
            self._save(phase="working", acts_at=None, action=None, why=None, detail=None)
            return times.poll_s
        self.state.setdefault("work_over_at", now)
        head = next((rt for rt in runs if rt[1].peers_wait_s > 0), None)
        if head is not None and not budget_hit:
            waited = now - self.state["work_over_at"]
            if waited < head[1].peers_wait_s and _peers_busy(head[0]):
                self._save(phase="waiting", detail="other boxes' workers are still at the study")
                return times.poll_s
        self._act(runs, newest, times, budget_hit, now)
        return times.poll_s

    # -- one run ------------------------------------------------------------------------------

    def _runs(self) -> list[tuple[RunDir, BoxTerms]]:
        out = []
        for path in sorted((self.root / "runs").glob("*")):
            if not path.is_dir():
                continue
            run = RunDir(path)
            terms = BoxTerms.from_env({}, run)
            if terms is not None:
                out.append((run, terms))
        return out

    def _workers(self, run: RunDir) -> list[_Worker]:
        out = []
        for index in run.workers():
            pid, alive = run.worker_alive(index)
            out.append(_Worker(index, pid, alive, run.read_status(index)))
        return out

    def _tend(
        self, run: RunDir, terms: BoxTerms, times: GuardTimes, now: float
    ) -> tuple[bool, bool]:
        """Meter the run, enforce its budget, restart or kill its workers; returns (over,
        budget reached)."""
        spent = self._meter(run, terms, times, now)
        hit = terms.budget_usd > 0 and spent >= terms.budget_usd
        mark = run.path / BUDGET_MARK
        if hit and not mark.is_file():
            _write(mark, {"at": now, "spent_usd": spent, "budget_usd": terms.budget_usd})
            self._note(f"run {run.path.name}: budget reached ({spent:.4f} of {terms.budget_usd} $)")
        hit_at = (read_json(mark) or {}).get("at", now) if hit else None
        alive = False
        for w in self._workers(run):
            key = (run.path.name, w.index)
            if w.alive:
                if hit_at is not None and now - hit_at > times.budget_window_s:
                    self._kill(w, f"still running {now - hit_at:.0f} s after the budget")
                    continue
                hung = _hung_for(w, run, times, now)
                if hung is not None:
                    self._kill(w, f"its trial made no progress for {hung:.0f} s")
                    continue
                alive = True
                continue
            if self._should_restart(run, w, key, hit) and self._restart(run, w, key):
                alive = True
        if not alive:
            _forget_token(run)
        return not alive, hit

    def _meter(self, run: RunDir, terms: BoxTerms, times: GuardTimes, now: float) -> float:
        meter = read_json(run.path / METER_FILE)
        if meter is None:
            spent = terms.spent(now)
        else:
            gap = max(0.0, now - meter["at"])
            booted = container_started(self.root)
            if booted is not None and meter["at"] < booted <= now:
                # The container started since the last look (a stop and start, a reboot, an
                # outbid box winning again): down until then, at the disk's rate, then running.
                spent = (
                    float(meter["spent_usd"])
                    + (
                        terms.storage_per_hour * (booted - meter["at"])
                        + terms.rate_per_hour * (now - booted)
                    )
                    / 3600
                )
            else:
                # A gap longer than a few looks: the box was stopped (or the guardian down).
                running = gap <= max(3 * times.poll_s, 120.0)
                rate = terms.rate_per_hour if running else terms.storage_per_hour
                spent = float(meter["spent_usd"]) + rate * gap / 3600
        with contextlib.suppress(OSError):  # a full disk must not stop the guardian
            _write(run.path / METER_FILE, {"spent_usd": spent, "at": now})
        return spent

    def _should_restart(self, run: RunDir, w: _Worker, key: tuple[str, int], hit: bool) -> bool:
        if w.status.get("state") in FINAL_STATES or hit:
            return False
        if (run.path / USER_STOPPED).exists() or not launch_file(run, w.index).is_file():
            return False
        if key not in self.restarts:
            return True  # found dead at the guardian's start (a container restart): not counted
        return self.restarts[key] < MAX_RESTARTS  # it died under this guardian: a crash

    def _restart(self, run: RunDir, w: _Worker, key: tuple[str, int]) -> bool:
        lines = launch_file(run, w.index).read_text(encoding="utf-8").splitlines()
        gpus, args = (lines[0] if lines else ""), lines[1:]
        env = {**self.environ, **run.env()}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        argv = [str(self.root / "venv" / "bin" / "abfleet"), "worker", "run"]
        argv += ["--run-dir", str(run.path), "--index", str(w.index), *args]
        count = self.restarts[key] + 1 if key in self.restarts else 0
        self.restarts[key] = count
        try:
            with open(run.path / f"worker-{w.index}.out", "ab") as out:
                child = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=run.path,
                    env=env,
                    start_new_session=True,
                )
            run.pid_file(w.index).write_text(f"{child.pid}\n")
        except OSError as exc:
            self._note(f"run {run.path.name}: worker {w.index} could not be started again: {exc}")
            return False
        self.children[key] = child
        was = w.status.get("state") or "not started"
        self._note(
            f"run {run.path.name}: worker {w.index} was gone ({was}); started again "
            f"(pid {child.pid}" + (f", restart {count} after a crash)" if count else ")")
        )
        return True

    def _kill(self, w: _Worker, why: str) -> None:
        if w.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w.pid, signal.SIGKILL)  # its session: the worker and anything it started
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(w.pid, signal.SIGKILL)
        self._note(f"killed worker {w.index} (pid {w.pid}): {why}")

    # -- the box's end ------------------------------------------------------------------------

    def _act(
        self,
        runs: list[tuple[RunDir, BoxTerms]],
        terms: BoxTerms,
        times: GuardTimes,
        budget_hit: bool,
        now: float,
    ) -> None:
        why = "budget reached" if budget_hit else "work finished"
        delivered = all(_delivered(run, t) for run, t in runs if t.then_destroy)
        action = "destroy" if terms.then_destroy and delivered else "stop"
        lease = read_json(self.root / LEASE_FILE)
        if lease is not None and float(lease.get("at", 0)) < self.started_at - 60:
            lease = None  # left from before this boot: whoever took it is long gone
        if lease is not None:
            acts_at = float(lease.get("until", 0))  # a download woke the box: its lease rules
        else:
            if budget_hit:
                acts_at = self.state["work_over_at"]
            elif terms.stop_after_s > 0:
                acts_at = self.state["work_over_at"] + terms.stop_after_s
            else:
                self._save(
                    phase="kept",
                    why=why,
                    action=None,
                    acts_at=None,
                    detail="--stop-after 0: the box runs until you stop or destroy it",
                )
                return
            if self.state["work_over_at"] - self.started_at < times.poll_s * 3:
                # Over when the box came up (started for a download, or by hand): whoever
                # started it gets a lease's time to reach it before it stops again.
                acts_at = max(acts_at, self.started_at + times.lease_s)
        if not terms.can_stop_itself:
            self._save(phase="kept", why=why, detail="its provider gave it no way to stop itself")
            return
        fields = {"why": why, "action": action, "acts_at": acts_at}
        if now < acts_at:
            self._save(phase="lease" if lease else "grace", **fields)
            return
        if now < self.state.get("next_try_at", 0):
            self._save(phase="failing", **fields)
            return
        record = {"at": now, "action": action, "why": why}
        for run, t in runs:
            with contextlib.suppress(OSError):
                _write(run.path / SELF_STOP_FILE, {**record, "spent_usd": metered_spend(run, t)})
        try:
            call_provider(terms, action, self.environ)
        except ProviderCallFailed as exc:
            attempts = self.state.get("attempts", 0) + 1
            wait = min(times.retry_max_s, times.retry_first_s * 2 ** (attempts - 1))
            wait = max(wait, exc.retry_after or 0.0)
            self.state.setdefault("failing_since", now)
            self._note(f"the {action} failed ({exc}); attempt {attempts}, next in {wait:.0f} s")
            self._save(
                phase="failing",
                attempts=attempts,
                last_error=str(exc),
                next_try_at=now + wait,
                **fields,
            )
            return
        self._note(
            f"{why}: the box {action}s itself (after {self.state.get('attempts', 0) + 1} attempt(s))"
        )
        self.state["done"] = {"action": action, "at": now}
        for key in ("attempts", "failing_since", "last_error", "next_try_at"):
            self.state.pop(key, None)
        self._save(phase="done", **fields)

    # -- its record ---------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        log.warning("%s", text)
        events = self.state.setdefault("events", [])
        events.append([self.clock(), text])
        del events[:-EVENTS_KEPT]

    def _save(self, **fields: Any) -> None:
        self.state.update(fields)
        self.state["updated_at"] = self.clock()
        try:
            write_json_atomic(self.root / GUARD_FILE, self.state)
        except OSError as exc:  # a full disk: the record waits, the guardian does not
            log.error("could not write %s: %s", GUARD_FILE, exc)


def _hung_for(w: _Worker, run: RunDir, times: GuardTimes, now: float) -> float | None:
    """Seconds a worker has made no progress, if far past the norm: a searching worker rewrites
    its status at each trial's start and end (and while it waits for others' trials); one just
    started again has not written it yet, and gets the same time from its start."""
    status = w.status
    limit = max(times.hang_s, 5 * float(status.get("slowest_trial_s") or 0))
    if status.get("pid") != w.pid:  # the status is its dead predecessor's
        try:
            last = run.pid_file(w.index).stat().st_mtime
        except OSError:
            return None
    elif status.get("state") != "searching":
        return None
    elif status.get("current_trial") is not None:
        last = float(status.get("current_trial_started") or status.get("updated_at") or now)
    else:
        last = float(status.get("updated_at") or now)
    idle = now - last
    return idle if idle > limit else None


def _delivered(run: RunDir, terms: BoxTerms) -> bool:
    """The run's results are safe elsewhere: downloaded and verified, or pushed and verified."""
    if not terms.holds_results:
        return True
    if (run.path / DOWNLOADED_MARK).is_file():
        return True
    outcome = read_outcome(run.path) or {}
    return bool(outcome.get("url")) and not outcome.get("error")


def _peers_busy(run: RunDir) -> bool:
    """Whether any trial of the run's shared study still beats its heartbeat (another box's
    worker at work): the study's host must outlive them."""
    from abfleet.core.search import HEARTBEAT_ATTR

    url = run.env_value("ABFLEET_STORAGE_URL")
    if not url:
        return False
    try:
        import optuna

        storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True)
        studies = storage.get_all_studies()
        fresh = time.time() - 120
        for study in studies:
            for trial in storage.get_all_trials(study._study_id, deepcopy=False):
                running = trial.state == optuna.trial.TrialState.RUNNING
                if running and float(trial.user_attrs.get(HEARTBEAT_ATTR) or 0) > fresh:
                    return True
    except Exception as exc:  # noqa: BLE001 - an unreadable study must not keep a box up
        log.warning("could not read the shared study (%s)", exc)
    return False


def _forget_token(run: RunDir) -> None:
    """The run is over: its Hugging Face token (a write token when it pushed) leaves the box."""
    env_file = run.path / ".env"
    try:
        lines = env_file.read_text().splitlines(keepends=True)
    except OSError:
        return
    kept = [ln for ln in lines if not ln.startswith(("HF_TOKEN=", "HUGGING_FACE_HUB_TOKEN="))]
    if len(kept) == len(lines):
        return
    tmp = env_file.with_name(".env.tmp")
    with contextlib.suppress(OSError):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(kept)
        tmp.replace(env_file)
        log.info("run %s is over: HF_TOKEN removed from its env file", run.path.name)


def _write(path: Path, data: dict[str, Any]) -> None:
    write_json_atomic(path, data)


@contextlib.contextmanager
def only_one(root: Path):
    """Hold the box's guardian lock; yields False when another guardian holds it."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
