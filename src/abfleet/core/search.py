"""The Optuna study: storage by URL, the parameter space, a budget-exact trial loop, the result.

Trials run through ask/tell rather than study.optimize so that the trial budget holds exactly
when several workers share one study: a worker takes a trial only inside a lock (a file lock for
SQLite, an advisory lock for Postgres) after counting completed and running trials, and a trial
of a dead worker is failed by its stale heartbeat and re-queued with the same parameters.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from abfleet.core.ablation import AblationParams, ComponentParams
from abfleet.errors import AbfleetError, UserError
from abfleet.job.storage import normalize_url, redact_url

log = logging.getLogger(__name__)

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# The trial loop records heartbeats itself (see heartbeat()), which Optuna cannot know.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
optuna.logging.set_verbosity(optuna.logging.WARNING)

OBJECTIVES = ("refusals", "kl")
MAX_CONSECUTIVE_FAILURES = 3
SPACE_VERSION = 1
HEARTBEAT_ATTR = "heartbeat_at"  # a running trial's last heartbeat (Unix time)


@dataclass(frozen=True)
class SearchSettings:
    n_trials: int
    seed: int
    n_startup_trials: int
    heartbeat_interval: int = 20
    grace_period: int = 60
    n_ei_candidates: int = 128


def open_storage(url: str, settings: SearchSettings) -> RDBStorage:
    url = normalize_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # Several workers on one box share the file: wait for the lock instead of failing.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs["connect_args"] = {"connect_timeout": 15}
    try:
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    except Exception as exc:
        raise AbfleetError(
            f"cannot open the study storage {redact_url(url)}: {_first_line(exc)}"
        ) from exc


def make_sampler(
    settings: SearchSettings, worker_index: int = 0, start: int = 0
) -> optuna.samplers.BaseSampler:
    """TPE seeded from the job's seed, the worker and how many trials the study held when it
    started: parallel workers propose different startup points, and a restart or a resume on
    another box does not replay the first trials' random points, yet the same history gives
    the same proposals. The constant liar keeps TPE from proposing a point another worker is
    already evaluating."""
    seed = zlib.crc32(f"{settings.seed}/{worker_index}/{start}".encode())
    return optuna.samplers.TPESampler(
        multivariate=True,
        n_startup_trials=settings.n_startup_trials,
        n_ei_candidates=settings.n_ei_candidates,
        seed=seed,
        constant_liar=True,
    )


def reseed(study: optuna.Study, settings: SearchSettings, worker_index: int) -> None:
    """Give a loaded study the sampler for where it stands now (see make_sampler)."""
    start = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(settings, worker_index, start)


def create_or_load_study(
    storage: RDBStorage,
    study_name: str,
    fingerprint: str,
    sampler: optuna.samplers.BaseSampler,
    allow_mismatch: bool = False,
    create: bool = True,
) -> optuna.Study:
    """Load the study, or create it; refuse one made by a different job unless told to resume."""
    existing = {
        s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
    }
    if study_name in existing:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
        found = study.user_attrs.get("job_fingerprint")
        if found and found != fingerprint and not allow_mismatch:
            raise UserError(
                f"study {study_name!r} exists and was made by a different job spec: "
                "pass --resume to continue it anyway, or --study NAME for a new one"
            )
        return study
    if not create:
        raise UserError(f"study {study_name!r} does not exist in {redact_url(storage.url)}")
    with contextlib.suppress(optuna.exceptions.DuplicatedStudyError):
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            directions=["minimize", "minimize"],
        )
        study.set_metric_names(list(OBJECTIVES))
        study.set_user_attr("job_fingerprint", fingerprint)
        study.set_user_attr("space_version", SPACE_VERSION)
        return study
    return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)


def suggest_params(trial: optuna.Trial, n_layers: int) -> AblationParams:
    """The parameter space of the published method, scaled to the model's depth."""
    last = max(1.0, float(n_layers - 1))
    scope = trial.suggest_categorical("direction_scope", ["global", "per_layer"])
    # Always sampled (even when per-layer ignores it) so the multivariate TPE sees one fixed space.
    index = trial.suggest_float("direction_index", 0.4 * last, 0.9 * last)
    comps = {}
    for comp, (lo, hi) in (("attn", (0.8, 1.5)), ("mlp", (-0.25, 1.5))):
        max_w = trial.suggest_float(f"{comp}.max_weight", lo, hi)
        pos = trial.suggest_float(f"{comp}.max_weight_position", 0.6 * last, last)
        frac = trial.suggest_float(f"{comp}.min_weight_frac", 0.0, 1.0)
        dist = trial.suggest_float(f"{comp}.min_weight_distance", 1.0, max(1.0, 0.6 * last))
        max_w = max(0.0, max_w)  # a negative MLP weight lets the search switch the MLP off
        comps[comp] = ComponentParams(max_w, pos, frac * max_w, dist)
    return AblationParams(scope, index, comps["attn"], comps["mlp"])


def params_from_trial(trial: FrozenTrial, n_layers: int) -> AblationParams:
    """Rebuild a finished trial's parameters (for export) with the same mapping as suggest."""
    fixed = optuna.trial.FixedTrial(trial.params)
    return suggest_params(fixed, n_layers)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The trial loop


class BudgetLock:
    """Mutual exclusion between workers around "count trials, then take one"."""

    def __init__(self, storage: RDBStorage, study_name: str) -> None:
        self.storage = storage
        self.url = storage.url
        self.key = zlib.crc32(study_name.encode()) & 0x7FFFFFFF

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.url.startswith("sqlite"):
            path = self.url.split("///", 1)[1] + ".lock"
            with open(path, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
            return
        if self.url.startswith("postgresql"):
            from sqlalchemy import text

            with self.storage.engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                    conn.commit()
            return
        yield  # other databases: best effort, the heartbeat still keeps counts right


@contextlib.contextmanager
def heartbeat(storage: RDBStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat from a thread while it runs."""
    stop = threading.Event()
    interval = storage.get_heartbeat_interval() or 20

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
                # Also as a trial attribute, so progress can show it through the public API.
                storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())
            except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the trial
                log.warning("heartbeat failed: %s", _first_line(exc))
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@dataclass
class TrialOutcome:
    number: int
    values: tuple[float, float] | None
    user_attrs: dict[str, Any]
    error: str | None = None


def count_states(storage: BaseStorage, study_name: str) -> dict[TrialState, int]:
    """Trials per state, read from the storage itself through Optuna's public storage API (so
    any Optuna storage works): a study object's cache can lag behind other workers by a trial,
    and the budget check must not."""
    counts = dict.fromkeys(TrialState, 0)
    study_id = storage.get_study_id_from_name(study_name)
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        counts[trial.state] += 1
    return counts


def recover_orphans(study: optuna.Study, storage: RDBStorage) -> int:
    """Fail and re-queue RUNNING trials at once; only for a caller that knows none is alive."""
    callback = RetryHeartbeatStaleTrialCallback(max_retry=3)
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                callback(study, storage.get_trial(t._trial_id))
                n += 1
    return n


def run_trials(
    study: optuna.Study,
    storage: RDBStorage,
    n_trials: int,
    n_layers: int,
    evaluate: Callable[[AblationParams], dict[str, Any]],
    should_stop: Callable[[], bool],
    on_trial: Callable[[TrialOutcome], None] | None = None,
    on_start: Callable[[optuna.Trial], None] | None = None,
    poll_seconds: float = 2.0,
    on_wait: Callable[[], None] | None = None,
) -> int:
    """Run trials until n_trials are complete in the study (by any worker) or asked to stop.

    evaluate() returns user attributes including "refusals" and "kl". Returns how many trials
    this worker completed.
    """
    lock = BudgetLock(storage, study.study_name)
    done_here = 0
    failures = 0
    while not should_stop():
        with lock.hold():
            optuna.storages.fail_stale_trials(study)
            counts = count_states(storage, study.study_name)
            complete, running = counts[TrialState.COMPLETE], counts[TrialState.RUNNING]
            if complete >= n_trials:
                break
            # ask() takes a re-queued (WAITING) trial first, so a dead worker's trial is redone
            # within the budget it already had.
            waiting = counts[TrialState.WAITING]
            trial = study.ask() if waiting or complete + running < n_trials else None
            if trial is not None:
                # A first beat at once: a trial with none is never found stale, so a worker
                # killed before its heartbeat thread started would hold the budget forever.
                storage.record_heartbeat(trial._trial_id)
        if trial is None:
            # The rest of the budget is being run by other workers: wait in case one dies.
            if on_wait is not None:
                on_wait()
            time.sleep(poll_seconds)
            continue
        outcome = _run_one(study, storage, trial, n_layers, evaluate, on_start)
        if outcome.error is None:
            done_here += 1
            failures = 0
        else:
            failures += 1
        if on_trial is not None:
            on_trial(outcome)
        if failures >= MAX_CONSECUTIVE_FAILURES:
            raise AbfleetError(f"{failures} trials in a row failed; last error: {outcome.error}")
    return done_here


def _run_one(
    study: optuna.Study,
    storage: RDBStorage,
    trial: optuna.Trial,
    n_layers: int,
    evaluate: Callable[[AblationParams], dict[str, Any]],
    on_start: Callable[[optuna.Trial], None] | None = None,
) -> TrialOutcome:
    with heartbeat(storage, trial._trial_id):
        try:
            if on_start is not None:  # inside: a signal here must not leave the trial running
                on_start(trial)
            params = suggest_params(trial, n_layers)
            attrs = evaluate(params)
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            values = (float(attrs["refusals"]), float(attrs["kl"]))
            study.tell(trial, list(values))
            return TrialOutcome(trial.number, values, attrs)
        except BaseException as exc:
            # Ctrl+C a second time, SIGTERM, an OOM, a bug: the trial is marked failed, never
            # left running. One cut short by a signal is re-queued with its parameters: it did
            # not fail, so a resume runs it again within the same budget.
            message = _first_line(exc) if str(exc) else type(exc).__name__
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", message)
                study.tell(trial, state=TrialState.FAIL)
                if isinstance(exc, KeyboardInterrupt):
                    RetryHeartbeatStaleTrialCallback(max_retry=3)(
                        study, storage.get_trial(trial._trial_id)
                    )
            if not isinstance(exc, Exception):
                raise
            log.exception("trial %d failed", trial.number)
            return TrialOutcome(trial.number, None, {}, message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
