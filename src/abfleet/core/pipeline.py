"""One worker's run of a job: load, directions, baseline, trials, and (for the primary) export.

Used by `abfleet run` (here) and `abfleet worker run` (on a box). It imports no cloud or SSH
code and asks nothing of a terminal: progress goes to a Reporter and to the status file.
"""

from __future__ import annotations

import base64
import logging
import os
import platform
import socket
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from abfleet.core import search
from abfleet.core.ablation import AblationParams, Ablator, decoder_layers
from abfleet.core.batching import find_batch_size
from abfleet.core.chat import ChatFormatter
from abfleet.core.directions import compute_directions, mean_residuals
from abfleet.core.evaluate import Evaluator, Scores
from abfleet.core.export import export_model
from abfleet.core.markers import MarkerMatcher
from abfleet.core.model import LoadedModel, load_model, materialize, resolve_source
from abfleet.core.result import choose_trial, completed, pareto_front, trial_row
from abfleet.errors import AbfleetError, UserError
from abfleet.jobs import SPECIAL_STORAGE, Job
from abfleet.rundir import RunDir, StatusWriter, pid_alive
from abfleet.storage_url import redact_url

log = logging.getLogger(__name__)


class Reporter(Protocol):
    def phase(self, state: str, detail: str = "") -> None: ...

    def trial(self, outcome: search.TrialOutcome, complete: int, total: int) -> None: ...


class LogReporter:
    def phase(self, state: str, detail: str = "") -> None:
        log.info("phase %s %s", state, detail)

    def trial(self, outcome: search.TrialOutcome, complete: int, total: int) -> None:
        if outcome.error:
            log.warning("trial %d failed: %s", outcome.number, outcome.error)
        else:
            a = outcome.user_attrs
            log.info(
                "trial %d: refusals %d/%d, KL %.4f, degenerate %d, %.1fs (%d/%d complete)",
                outcome.number,
                a["refusals"],
                a["n_bad"],
                a["kl"],
                a["degenerate"],
                a["seconds"],
                complete,
                total,
            )


@dataclass
class RunOptions:
    worker_index: int = 0
    primary: bool = True  # the primary worker exports once the study is complete
    resume: bool = False  # continue a study made by a different job spec
    create_study: bool = True  # False on workers of a shared study: the controller made it
    should_stop: Callable[[], bool] = lambda: False


@dataclass
class RunResult:
    state: str
    study_name: str
    storage_url: str
    baseline: dict[str, Any] | None = None
    chosen: dict[str, Any] | None = None
    pareto: list[dict[str, Any]] = field(default_factory=list)
    model_dir: Path | None = None
    trials_here: int = 0
    complete: int = 0
    n_trials: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def worker_label(index: int) -> str:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{socket.gethostname()}/{index}" + (f" gpu{gpu}" if gpu else "")


def storage_url(job: Job, run: RunDir) -> str:
    url = job.spec.search.storage
    if url in SPECIAL_STORAGE:
        # On a box the controller passes the real URL (with its password) in the 0600 env file.
        url = os.environ.get("ABFLEET_STORAGE_URL", "")
        if not url:
            raise UserError(
                f"storage {job.spec.search.storage!r} needs ABFLEET_STORAGE_URL (set by abfleet launch)"
            )
    return search.storage_url_for(run.path, url or None)


def run_job(
    job: Job, run: RunDir, reporter: Reporter, options: RunOptions | None = None
) -> RunResult:
    opts = options or RunOptions()
    run.path.mkdir(parents=True, exist_ok=True)
    status = StatusWriter(
        run,
        opts.worker_index,
        job=job.name,
        model=job.spec.model,
        n_trials=job.spec.search.n_trials,
        label=worker_label(opts.worker_index),
        gpu=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    try:
        return _run(job, run, reporter, opts, status)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            status.update(state="stopped", reason="interrupted")
        else:
            status.update(
                state="failed", reason=str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            )
        raise


def _set_phase(status: StatusWriter, reporter: Reporter, state: str, detail: str = "") -> None:
    status.update(state=state, detail=detail)
    reporter.phase(state, detail)


def _run(
    job: Job, run: RunDir, reporter: Reporter, opts: RunOptions, status: StatusWriter
) -> RunResult:
    timings: dict[str, float] = {}
    started = time.monotonic()
    spec = job.spec
    prompts = job.load_all_prompts()
    fingerprint = job.fingerprint(prompts)
    settings = search.SearchSettings(
        n_trials=spec.search.n_trials,
        seed=spec.search.seed,
        n_startup_trials=job.n_startup_trials,
        heartbeat_interval=spec.search.heartbeat_interval,
        grace_period=3 * spec.search.heartbeat_interval,
    )
    url = storage_url(job, run)
    # The storage is opened before the model is loaded: a wrong URL or password fails in seconds.
    storage = search.open_storage(url, settings)
    sampler = search.make_sampler(settings, opts.worker_index)
    study = search.create_or_load_study(
        storage,
        job.study_name,
        fingerprint,
        sampler,
        allow_mismatch=opts.resume,
        create=opts.create_study,
    )
    if url.startswith("sqlite") and opts.worker_index == 0 and opts.primary:
        orphans = _recover_local_orphans(study, storage, run)
        if orphans:
            log.info("re-queued %d trial(s) left running by an earlier process", orphans)
    status.update(study=job.study_name, storage=redact_url(url))

    _set_phase(status, reporter, "loading", spec.model)
    source = materialize(
        resolve_source(spec.model), progress=lambda m: reporter.phase("loading", m)
    )
    loaded = load_model(source, tuple(spec.model_options.dtypes), spec.model_options.device_map)
    chat = _chat(loaded, spec.system_prompt)
    matcher = MarkerMatcher(spec.markers)
    batch_size = spec.model_options.batch_size or find_batch_size(
        loaded.model,
        chat,
        prompts["bad_eval"] + prompts["good_eval"],
        spec.model_options.max_batch_size,
    )
    status.update(dtype=loaded.dtype, batch_size=batch_size, device=_device_name())
    timings["load"] = time.monotonic() - started

    _set_phase(status, reporter, "directions", f"batch size {batch_size}")
    t0 = time.monotonic()
    directions = _directions(
        study, storage, loaded, chat, prompts, batch_size, spec.ablation.projected
    )
    ablator = Ablator(
        loaded.model,
        spec.ablation.norm_preserving,
        copy_device="cpu" if spec.model_options.reset_copy == "cpu" else None,
    )
    evaluator = Evaluator(
        loaded.model,
        chat,
        prompts["good_eval"],
        prompts["bad_eval"],
        matcher,
        spec.evaluation.max_new_tokens,
        batch_size,
    )
    baseline = _baseline(study, storage, evaluator)
    timings["directions"] = time.monotonic() - t0

    _set_phase(status, reporter, "searching", f"{settings.n_trials} trials")
    t0 = time.monotonic()
    label = worker_label(opts.worker_index)

    def evaluate(params: AblationParams) -> dict[str, Any]:
        t = time.perf_counter()
        ablator.apply(params, directions)
        scores = evaluator.score()
        return {
            "refusals": scores.refusals,
            "n_bad": scores.n_bad,
            "kl": scores.kl,
            "degenerate": scores.degenerate,
            "seconds": round(time.perf_counter() - t, 3),
            "worker": label,
            "samples": [list(s) for s in scores.samples],
        }

    def on_trial(outcome: search.TrialOutcome) -> None:
        counts = search.count_states(study)
        complete = counts[search.TrialState.COMPLETE]
        status.update(
            trials_here=status.data.get("trials_here", 0) + (outcome.error is None),
            last_trial=outcome.number,
        )
        reporter.trial(outcome, complete, settings.n_trials)

    def on_start(trial: Any) -> None:
        trial.set_user_attr("worker", label)  # so progress shows who runs which trial
        status.update(current_trial=trial.number, current_trial_started=time.time())

    trials_here = search.run_trials(
        study,
        storage,
        settings.n_trials,
        ablator.n_layers,
        evaluate,
        opts.should_stop,
        on_trial,
        on_start=on_start,
    )
    status.update(current_trial=None)
    timings["search"] = time.monotonic() - t0
    trials = completed(study)
    result = RunResult(
        state="searching",
        study_name=job.study_name,
        storage_url=url,
        baseline=baseline,
        pareto=[trial_row(t) for t in pareto_front(trials)],
        trials_here=trials_here,
        complete=len(trials),
        n_trials=settings.n_trials,
        timings=timings,
    )
    if opts.should_stop():
        _set_phase(
            status, reporter, "stopped", f"{len(trials)}/{settings.n_trials} trials complete"
        )
        result.state = "stopped"
        return result
    if not opts.primary:
        _set_phase(status, reporter, "done", "study complete; the primary worker exports")
        result.state = "done"
        return result

    _set_phase(status, reporter, "exporting", "")
    t0 = time.monotonic()
    choice = choose_trial(trials, spec.result.kl_limit, spec.result.trial)
    params = search.params_from_trial(choice.trial, ablator.n_layers)
    ablator.apply(params, directions)
    chosen = {
        **trial_row(choice.trial),
        "reason": choice.reason,
        "within_kl_limit": choice.within_limit,
    }
    record = {
        "job": job.to_toml_dict(),
        "job_fingerprint": fingerprint,
        "model": {"source": source.display, "asked": spec.model, "dtype": loaded.dtype},
        "study": {
            "name": job.study_name,
            "storage": redact_url(url),
            "complete": len(trials),
        },
        "chosen": {**chosen, "ablation": params.to_dict()},
        "before": baseline,
        "after": {k: chosen[k] for k in ("refusals", "n_bad", "kl", "degenerate")},
        "timings": {
            **{k: round(v, 1) for k, v in timings.items()},
            "median_trial_seconds": _median_seconds(trials),
        },
        "host": platform.node(),
    }
    check = export_model(
        loaded.model, loaded.tokenizer, chat, run.model_dir, record, prompts["good_eval"][0]
    )
    ablator.reset()
    timings["export"] = time.monotonic() - t0
    result.chosen = chosen
    result.model_dir = run.model_dir
    result.state = "done"
    status.update(exported=str(run.model_dir), load_check=check["answer"][:200])
    _set_phase(status, reporter, "done", f"trial {choice.trial.number}: {choice.reason}")
    return result


def _chat(loaded: LoadedModel, system_prompt: str) -> ChatFormatter:
    try:
        return ChatFormatter(loaded.tokenizer, system_prompt)
    except ValueError as exc:
        raise UserError(f"{loaded.source.display}: {exc}") from exc


def _device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _median_seconds(trials: list[Any]) -> float | None:
    values = [t.user_attrs.get("seconds") for t in trials if t.user_attrs.get("seconds")]
    return round(statistics.median(values), 2) if values else None


def _recover_local_orphans(study: Any, storage: Any, run: RunDir) -> int:
    """On one box, RUNNING trials whose worker process is gone are re-queued at once."""
    alive = []
    for worker in run.workers():
        try:
            pid = int(run.pid_file(worker).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and pid_alive(pid):
            alive.append(pid)
    return 0 if alive else search.recover_orphans(study, storage)


# ---------------------------------------------------------------------------------------------
# Directions and baseline, shared through the study so every worker uses the same ones.


def _encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    raw = zlib.compress(t.contiguous().to(torch.float32).numpy().tobytes())
    return {"shape": list(t.shape), "data": base64.b64encode(raw).decode("ascii")}


def _decode_tensor(d: dict[str, Any]) -> torch.Tensor:
    import numpy as np

    raw = zlib.decompress(base64.b64decode(d["data"]))
    return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).reshape(d["shape"])


def _directions(
    study: Any,
    storage: Any,
    loaded: LoadedModel,
    chat: ChatFormatter,
    prompts: dict[str, list[str]],
    batch_size: int,
    projected: bool,
) -> torch.Tensor:
    """Computed by the first worker and kept in the study; later workers and resumes reuse them."""
    with search.BudgetLock(storage, study.study_name).hold():
        stored = study.user_attrs.get("directions")
        if stored:
            directions = _decode_tensor(stored)
            log.info("using the directions stored in the study")
        else:
            mean_bad = mean_residuals(loaded.model, chat, prompts["bad"], batch_size)
            mean_good = mean_residuals(loaded.model, chat, prompts["good"], batch_size)
            directions = compute_directions(mean_bad, mean_good, projected)
            study.set_user_attr("directions", _encode_tensor(directions))
    expected = len(decoder_layers(loaded.model)) + 1
    if directions.shape[0] != expected:
        raise AbfleetError(
            f"the study's directions have {directions.shape[0]} rows, the model needs {expected}: "
            "this study belongs to another model"
        )
    return directions


def _baseline(study: Any, storage: Any, evaluator: Evaluator) -> dict[str, Any]:
    """Scores of the unmodified model (the "before" figures), computed once per study."""
    with search.BudgetLock(storage, study.study_name).hold():
        stored = study.user_attrs.get("baseline")
        if stored:
            return stored
        scores: Scores = evaluator.score()
        data = scores.to_dict()
        study.set_user_attr("baseline", data)
        return data


def create_shared_study(job: Job, url: str, resume: bool = False) -> str:
    """The controller creates a shared study once, before any worker starts; workers only load it.

    Opening the storage here is also the check that it is reachable with these credentials,
    done before anything is rented. Returns the job's fingerprint.
    """
    prompts = job.load_all_prompts()
    fingerprint = job.fingerprint(prompts)
    spec = job.spec.search
    settings = search.SearchSettings(
        n_trials=spec.n_trials,
        seed=spec.seed,
        n_startup_trials=job.n_startup_trials,
        heartbeat_interval=spec.heartbeat_interval,
        grace_period=3 * spec.heartbeat_interval,
    )
    storage = search.open_storage(url, settings)
    try:
        search.create_or_load_study(
            storage,
            job.study_name,
            fingerprint,
            search.make_sampler(settings),
            allow_mismatch=resume,
        )
    finally:
        storage.engine.dispose()
    return fingerprint
