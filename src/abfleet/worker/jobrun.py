"""One worker's run of a job: load, directions, baseline, trials, and (for the primary) export.

Used by `abfleet run` (here) and `abfleet worker run` (on a box). It imports no cloud or SSH
code and asks nothing of a terminal: progress goes to a Reporter and to the run folder's
status file.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from abfleet.console import console
from abfleet.core import capability, search
from abfleet.core.ablation import AblationParams, Ablator
from abfleet.core.batching import find_batch_size, worst_case_edit
from abfleet.core.evaluate import Evaluator
from abfleet.core.export import export_model, source_directory
from abfleet.core.generate import next_token_logprobs
from abfleet.core.judge import Judge
from abfleet.core.markers import MarkerMatcher
from abfleet.core.model import LoadedModel, check_judge_here, load_model
from abfleet.core.pipeline import (
    chat_formatter,
    search_settings,
    shared_answer_prefix,
    shared_baseline,
    shared_directions,
    shared_precision,
)
from abfleet.core.rescore import (
    BASELINE,
    Rescore,
    judge_answers,
    judge_failed,
    long_answers,
    rescore_front,
)
from abfleet.core.result import choose_trial, completed, long_fields, pareto_front, trial_row
from abfleet.errors import UserError
from abfleet.job.source import ModelSource, materialize, resolve_source
from abfleet.job.spec import Job
from abfleet.job.storage import redact_url
from abfleet.render import fmt_kl
from abfleet.worker import publish
from abfleet.worker.report import NAME as REPORT_NAME
from abfleet.worker.report import write_report
from abfleet.worker.rundir import RunDir, StatusWriter, pid_alive

log = logging.getLogger(__name__)


class Reporter(Protocol):
    def phase(self, state: str, detail: str = "") -> None: ...

    def note(self, text: str) -> None: ...

    def trial(self, outcome: search.TrialOutcome, complete: int, total: int) -> None: ...


class LogReporter:
    def phase(self, state: str, detail: str = "") -> None:
        log.info("phase %s %s", state, detail)

    def note(self, text: str) -> None:
        log.warning("%s", text)

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


class ConsoleReporter:
    """One line per phase and per trial: readable live, and in a log when piped."""

    def phase(self, state: str, detail: str = "") -> None:
        console.print(f"[bold cyan]{state:<10}[/] {detail}")

    def note(self, text: str) -> None:
        console.print(f"[yellow]note:[/] {text}")

    def trial(self, outcome: search.TrialOutcome, complete: int, total: int) -> None:
        if outcome.error:
            console.print(f"  trial {outcome.number:>4}  [red]failed[/]: {outcome.error}")
            return
        a = outcome.user_attrs
        console.print(
            f"  trial {outcome.number:>4}  refusals {a['refusals']:>3}/{a['n_bad']:<3}"
            f"  KL {fmt_kl(a['kl']):>6}  degenerate {a['degenerate']:>2}  {a['seconds']:5.1f}s"
            f"   [{complete}/{total}]"
        )


@dataclass
class RunOptions:
    worker_index: int = 0
    primary: bool = True  # the primary worker exports once the study is complete
    resume: bool = False  # continue a study made by a different job spec
    create_study: bool = True  # False on workers of a shared study: the controller made it
    should_stop: Callable[[], bool] = lambda: False  # a signal: end after this trial, no export
    # The search runs inside it: there, a first Ctrl+C lets the current trial finish.
    graceful: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    # The box's budget is spent: end after this trial, and export the best trial so far.
    out_of_budget: Callable[[], bool] = lambda: False


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
    pushed: str = ""  # the Hub URL the export was pushed to
    push_error: str = ""  # why the push failed (the export is still on disk)
    warnings: list[str] = field(default_factory=list)  # what the user must read before using it
    benchmarks: dict[str, Any] = field(default_factory=dict)  # the capability check, per task


def worker_label(index: int) -> str:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{socket.gethostname()}/{index}" + (f" gpu{gpu}" if gpu else "")


def storage_url(job: Job, run: RunDir) -> str:
    url = run.study_url(job.spec.search.storage)
    if not url:
        # On a box the controller passes the real URL (with its password) in the 0600 env file.
        raise UserError(
            f"storage {job.spec.search.storage!r} needs ABFLEET_STORAGE_URL (set by abfleet launch)"
        )
    return url


def run_job(
    job: Job, run: RunDir, reporter: Reporter, options: RunOptions | None = None
) -> RunResult:
    opts = options or RunOptions()
    run.path.mkdir(parents=True, exist_ok=True)
    status = StatusWriter(
        run,
        opts.worker_index,
        primary=opts.primary,
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
            status.update(state="stopped", reason=str(exc) or "interrupted")
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
    check_judge_here(spec.evaluation.judge)  # before hours of search, not after
    fingerprint = job.fingerprint(prompts)
    settings = search_settings(job)
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
    search.reseed(study, settings, opts.worker_index)
    if url.startswith("sqlite") and opts.worker_index == 0 and opts.primary:
        orphans = _recover_local_orphans(study, storage, run)
        if orphans:
            log.info("re-queued %d trial(s) left running by an earlier process", orphans)
    status.update(study=job.study_name, storage=redact_url(url))

    _set_phase(status, reporter, "loading", spec.model)
    source = materialize(
        resolve_source(spec.model), progress=lambda m: reporter.phase("loading", m)
    )
    quantization = spec.model_options.quantization
    loaded = load_model(
        source,
        tuple(spec.model_options.dtypes),
        spec.model_options.device_map,
        quantization=quantization,
    )
    shared_precision(study, storage, loaded, quantization)
    chat = chat_formatter(loaded, spec.system_prompt)
    matcher = MarkerMatcher(spec.markers)
    chat.answer_prefix = shared_answer_prefix(
        study,
        storage,
        loaded,
        chat,
        prompts["good_eval"][:16] + prompts["bad_eval"][:16],
        spec.model_options.batch_size or 8,
    )
    ablator = Ablator(
        loaded.model,
        spec.ablation.norm_preserving,
        copy_device="cpu" if spec.model_options.reset_copy == "cpu" else None,
    )
    batch_size = spec.model_options.batch_size
    if not batch_size:
        with worst_case_edit(ablator):  # the probe sees what a trial's edit costs too
            batch_size = find_batch_size(
                loaded.model,
                chat,
                prompts["bad_eval"] + prompts["good_eval"],
                spec.model_options.max_batch_size,
                max(spec.evaluation.max_new_tokens, spec.evaluation.long_new_tokens),
                worst_prompts=[p for group in prompts.values() for p in group],
            )
    status.update(
        dtype=loaded.dtype,
        dtype_reason=loaded.dtype_reason,
        batch_size=batch_size,
        device=_device_name(),
    )
    timings["load"] = time.monotonic() - started
    if loaded.fell_back:  # the header said what was planned; this is what loaded instead
        reporter.phase("loaded", f"as {loaded.dtype}: {loaded.dtype_reason}")

    _set_phase(status, reporter, "directions", f"batch size {batch_size}")
    t0 = time.monotonic()
    directions = shared_directions(
        study, storage, loaded, chat, prompts, batch_size, spec.ablation.projected
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
    store = ablator.unedited
    if store is not None and store.unsupported:
        reporter.note(
            f"trials compute every layer (the reuse of unedited layers is off: {store.unsupported})"
        )
    baseline = shared_baseline(study, storage, evaluator)
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
        counts = search.count_states(storage, study.study_name)
        complete = counts[search.TrialState.COMPLETE]
        seconds = outcome.user_attrs.get("seconds") or 0.0
        status.update(
            trials_here=status.data.get("trials_here", 0) + (outcome.error is None),
            last_trial=outcome.number,
            current_trial=None,  # between trials (or waiting for others): no trial to hang
            # The guardian's yardstick for a hung trial.
            slowest_trial_s=max(status.data.get("slowest_trial_s") or 0.0, seconds),
        )
        reporter.trial(outcome, complete, settings.n_trials)

    def on_start(trial: Any) -> None:
        trial.set_user_attr("worker", label)  # so progress shows who runs which trial
        status.update(current_trial=trial.number, current_trial_started=time.time())

    def on_wait() -> None:
        status.flush()  # waiting for other workers' trials is progress too (the guardian reads it)

    with opts.graceful():
        trials_here = search.run_trials(
            study,
            storage,
            settings.n_trials,
            ablator.n_layers,
            evaluate,
            lambda: opts.should_stop() or opts.out_of_budget(),
            on_trial,
            on_start=on_start,
            on_wait=on_wait,
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
    budget = "budget reached" if opts.out_of_budget() else None
    if budget and not trials:
        status.update(reason=budget)
        _set_phase(status, reporter, "stopped", "budget reached before any trial completed")
        result.state = "stopped"
        return result
    if budget:
        status.update(reason=budget)
    if not opts.primary:
        if not _primary_gone(run, status, reporter, opts):
            _set_phase(status, reporter, "done", "study complete; the primary worker exports")
            result.state = "done"
            return result
        reporter.note("the primary worker ended without exporting: this worker exports instead")
    holder = _claim_export(run, opts.worker_index)
    if holder is not None:
        _set_phase(status, reporter, "done", f"study complete; worker {holder} exports")
        result.state = "done"
        return result

    rescored: Rescore | None = None
    if spec.evaluation.long_new_tokens > spec.evaluation.max_new_tokens and not budget:
        t0 = time.monotonic()
        rescored = _rescore(job, study, trials, evaluator, ablator, directions, status, reporter)
        timings["rescore"] = time.monotonic() - t0
    rescore = rescored.data if rescored else None
    result.pareto = [trial_row(t, rescore) for t in pareto_front(trials)]
    long_before = long_fields(
        (rescore or {}).get("entries", {}).get(BASELINE), spec.evaluation.long_new_tokens
    )
    result.baseline = baseline = {**(baseline or {}), **long_before}

    _set_phase(status, reporter, "exporting", "")
    t0 = time.monotonic()
    choice = choose_trial(
        trials,
        spec.result.kl_limit,
        spec.result.trial,
        baseline_degenerate=(baseline or {}).get("degenerate"),
        rescore=rescore,
    )
    params = search.params_from_trial(choice.trial, ablator.n_layers)
    chosen = {
        **trial_row(choice.trial, rescore),
        "reason": choice.reason,
        "within_kl_limit": choice.within_limit,
    }
    warnings = [choice.warning] if choice.warning else []
    record = {
        "job": job.to_toml_dict(),
        "job_fingerprint": fingerprint,
        "model": {
            "source": source.display,
            "asked": spec.model,
            "dtype": loaded.dtype,
            "dtype_reason": loaded.dtype_reason,
        },
        "study": {
            "name": job.study_name,
            "storage": redact_url(url),
            "complete": len(trials),
            "ended_by": budget or "all trials complete",
        },
        "chosen": {**chosen, "ablation": params.to_dict()},
        "before": baseline,
        "after": {
            k: chosen[k]
            for k in ("refusals", "n_bad", "kl", "degenerate", *AFTER_LONG)
            if k in chosen
        },
        "rescore": _rescore_record(rescore, timings.get("rescore"), choice.trial.number),
        "timings": {
            **{k: round(v, 1) for k, v in timings.items()},
            "median_trial_seconds": _median_seconds(trials),
        },
        "host": platform.node(),
        "warnings": warnings,
    }

    def release() -> None:
        # The export is loaded for its check where this model is: drop every reference first.
        ablator.detach()
        evaluator.model = None
        loaded.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def reload(folder: Path) -> LoadedModel:
        return load_model(
            ModelSource("dir", str(folder)),
            (loaded.dtype,),
            spec.model_options.device_map,
            for_ablation=False,
            quantization=quantization,
        )

    def fits_unquantized() -> bool:
        need = _loaded_bytes(source, loaded.dtype)
        room = _memory_room()
        if need > room:
            log.info(
                "the full-precision model (%.1f GB) does not fit (%.1f GB free): the export is "
                "checked and measured re-quantized",
                need / 1e9,
                room / 1e9,
            )
        return need <= room

    def reload_shipped(folder: Path) -> LoadedModel:
        """The export at its own precision (after a quantized search)."""
        return load_model(
            ModelSource("dir", str(folder)),
            (loaded.dtype,),
            spec.model_options.device_map,
            for_ablation=False,
        )

    def measure(model: Any) -> dict[str, Any]:
        """The exported model scored as trials were (and re-scored long when the front was)."""
        evaluator.model = model
        try:
            scores = evaluator.score()
            figures: dict[str, Any] = {
                "refusals": scores.refusals,
                "n_bad": scores.n_bad,
                "kl": scores.kl,
                "degenerate": scores.degenerate,
            }
            if rescore:
                _, counts = long_answers(
                    evaluator, spec.evaluation.long_new_tokens, spec.evaluation.judge
                )
                figures["long_refusals"], figures["long_degenerate"] = counts
            return figures
        finally:
            evaluator.model = None

    def judge_export(record: dict[str, Any]) -> None:
        """The judge reads the long answers once the search model and the export's check are
        released. It is informational: any failure is a warning and the export goes on."""
        if rescored is None or not rescored.unjudged:
            return
        started = time.monotonic()
        try:
            judge_answers(
                study,
                rescored,
                evaluator.bad,
                lambda: _load_judge(job, min(batch_size, 8), reporter),
                progress=lambda m: _set_phase(status, reporter, "judging", m),
            )
        except Exception as exc:  # noqa: BLE001 - the judge never costs the export
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            judge_failed(study, rescored, why)
            warning = (
                f"the judge {spec.evaluation.judge} gave no verdicts ({why}): the long figures "
                "are the refusal markers' alone"
            )
            log.warning("%s", warning)
            reporter.note(warning)
            warnings.append(warning)  # the record's own list
            return
        entries = rescored.data["entries"]
        key = str(choice.trial.number)
        for row, at in ((record["before"], BASELINE), (record["after"], key)):
            if "judge" in entries.get(at, {}):
                row["judge"] = dict(entries[at]["judge"])
        if "judge" in entries.get(key, {}):
            record["chosen"]["judge"] = chosen["judge"] = dict(entries[key]["judge"])
        if record.get("rescore"):
            record["rescore"]["judge_seconds"] = round(time.monotonic() - started, 1)

    def benchmark_export(record: dict[str, Any], folder: Path) -> None:
        """The capability check: the lm-eval tasks on the original model, then on the saved
        export, one model in memory at a time. Informational: failures are warnings."""
        ev = spec.evaluation
        if not ev.benchmark:
            return
        if quantization != "none" and not fits_unquantized():
            warning = (
                "the capability check did not run: the full-precision models do not fit this "
                "machine's memory"
            )
            reporter.note(warning)
            warnings.append(warning)
            return
        include = job.benchmark_folder()
        sources = (("the original", source), ("the export", ModelSource("dir", str(folder))))
        measured = []
        skip: set[str] = set()
        for what, src in sources:
            _set_phase(
                status,
                reporter,
                "benchmarking",
                f"{', '.join(ev.benchmark)} on {what} ({ev.benchmark_limit} examples each)",
            )
            try:
                model = load_model(
                    src, (loaded.dtype,), spec.model_options.device_map, for_ablation=False
                )
                try:
                    got = capability.measure(
                        model.model,
                        model.tokenizer,
                        ev.benchmark,
                        ev.benchmark_limit,
                        include,
                        min(batch_size, 8),
                        skip,
                    )
                finally:
                    model = None  # type: ignore[assignment]
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001 - the check never costs the export
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                got = capability.Measured(warnings=[f"the capability check failed ({why})"])
            skip |= {w.split()[1] for w in got.warnings if w.startswith("benchmark ")}
            for warning in got.warnings:
                reporter.note(warning)
                warnings.append(warning)
            measured.append(got)
        if len(measured) == 2:
            table = capability.compare(measured[0], measured[1])
            if table:
                record["benchmarks"] = result.benchmarks = table
                record["benchmark_seconds"] = round(sum(m.seconds for m in measured), 1)
                for line in capability.lines(table):
                    reporter.note(f"capability: {line}")

    def annotate(record: dict[str, Any], folder: Path) -> None:
        judge_export(record)
        benchmark_export(record, folder)

    def full_reference(encoded: list[list[int]]) -> torch.Tensor | None:
        """After a quantized search: the source at full precision with the trial's deltas, the
        model the merged export must reproduce (None where it does not fit). The unedited
        source is scored first: the `before` figures, and the distributions the shipped
        model's KL is measured from, are then the original model's, not its quantized copy's."""
        if not fits_unquantized():
            return None
        base = load_model(source, (loaded.dtype,), spec.model_options.device_map)
        edit = Ablator(base.model, spec.ablation.norm_preserving)
        try:
            evaluator.model = base.model
            evaluator.base_logprobs = evaluator.first_token_logprobs()
            record["before_search"] = dict(baseline)  # the quantized model's, as searched
            baseline.update(measure(base.model), kl=0.0)
            edit.apply(params, directions)
            return next_token_logprobs(base.model, chat, encoded, min(batch_size, 8)).cpu()
        finally:
            evaluator.model = None
            edit.detach()
            base.model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    check = export_model(
        loaded,
        ablator,
        params,
        directions,
        chat,
        run.model_dir,
        record,
        prompts["good_eval"][:4] + prompts["bad_eval"][:4],
        reload,
        release,
        quantized=quantization != "none",
        batch_size=min(batch_size, 8),
        measure=measure,
        annotate=annotate,
        reload_shipped=reload_shipped,
        full_reference=full_reference,
        extras=lambda folder, saved: _extras(study, saved, folder),
    )
    timings["export"] = time.monotonic() - t0
    result.pareto = [trial_row(t, rescore) for t in pareto_front(trials)]  # with the verdicts
    result.warnings = list(warnings)
    if spec.output.push_to_hub:
        _push(run.model_dir, spec.output.push_to_hub, spec.output.push_private, result)
    # What the saved weights do (the search's own figures for the trial stay in the front).
    result.chosen = {**chosen, **check.get("figures", {})}
    result.model_dir = run.model_dir
    result.state = "done"
    status.update(exported=str(run.model_dir), load_check=check["answer"][:200], warnings=warnings)
    detail = f"trial {choice.trial.number}: {choice.reason}"
    if budget:
        detail += f" ({budget} after {len(trials)}/{settings.n_trials} trials)"
    _set_phase(status, reporter, "done", detail)
    return result


def _extras(study: Any, record: dict[str, Any], folder: Path) -> None:
    """The report and the model card beside the model. A model without them is still a
    result (`abfleet report` rebuilds the report), so a failure here is logged, not raised."""
    try:
        write_report(study, record, folder / REPORT_NAME)
    except Exception as exc:  # noqa: BLE001 - plotting must never cost the export
        log.warning("the report could not be written (%s); `abfleet report` rebuilds it", exc)
    try:
        publish.write_card(folder, record)
    except Exception as exc:  # noqa: BLE001 - nor the card
        log.warning("the model card could not be written (%s)", exc)


def _push(folder: Path, repo: str, private: bool, result: RunResult) -> None:
    """Push the export from here (a box far from its user). A failed push leaves the export
    in place, to download or push again with `abfleet push`: it does not fail the run."""
    try:
        result.pushed = publish.push(folder, repo, private)
    except Exception as exc:  # noqa: BLE001 - the run's result is the export on disk
        result.push_error = str(exc).splitlines()[0]
        log.error("push to %s failed: %s", repo, result.push_error)
    # Beside the model (not in it): `status` and `watch` read it through the snapshot.
    publish.write_outcome(folder.parent, repo, result.pushed, result.push_error)


AFTER_LONG = ("long_tokens", "long_refusals", "long_degenerate", "judge")


def _rescore(
    job: Job,
    study: Any,
    trials: list[Any],
    evaluator: Evaluator,
    ablator: Ablator,
    directions: torch.Tensor,
    status: StatusWriter,
    reporter: Reporter,
) -> Rescore:
    """The Pareto front again with long answers, before the choice (judged after the export)."""
    spec = job.spec
    tokens = spec.evaluation.long_new_tokens

    def apply_trial(trial: Any) -> None:
        if trial is None:
            ablator.reset()
        else:
            ablator.apply(search.params_from_trial(trial, ablator.n_layers), directions)

    asked = next((t for t in trials if t.number == spec.result.trial), None)
    return rescore_front(
        study,
        pareto_front(trials),
        evaluator,
        apply_trial,
        tokens,
        spec.result.kl_limit,
        whole_front=spec.evaluation.rescore == "front",
        asked=asked,
        judge=spec.evaluation.judge,
        progress=lambda m: _set_phase(status, reporter, "rescoring", f"{tokens} tokens, {m}"),
    )


def _load_judge(job: Job, batch_size: int, reporter: Reporter) -> Judge:
    """The judge, loaded as its checkpoint is (a pre-quantized judge stays so: it is never
    edited), in the job's dtypes."""
    spec = job.spec
    source = materialize(
        resolve_source(spec.evaluation.judge),
        progress=lambda m: reporter.phase("judging", f"judge: {m}"),
    )
    judge = load_model(
        source,
        tuple(spec.model_options.dtypes),
        spec.model_options.device_map,
        for_ablation=False,
    )
    try:
        return Judge(judge.model, judge.tokenizer, batch_size, source.display)
    except ValueError as exc:  # no chat template, no single-token letters
        raise UserError(f"judge {source.display}: {exc}") from exc


def _rescore_record(
    rescore: dict[str, Any] | None, seconds: float | None, chosen: int
) -> dict[str, Any] | None:
    if not rescore:
        return None
    entries = rescore.get("entries", {})
    return {
        "tokens": rescore["tokens"],
        "judge": rescore.get("judge") or None,
        "seconds": round(seconds, 1) if seconds is not None else None,
        "judge_seconds": rescore.get("judge_seconds"),
        "trials": sorted(int(k) for k in entries if k != BASELINE),
        "samples_before": entries.get(BASELINE, {}).get("samples", []),
        "samples_after": entries.get(str(chosen), {}).get("samples", []),
    }


def _loaded_bytes(source: ModelSource, dtype: str) -> int:
    """The source's weights as loaded in dtype (stored in their shards' dtype, mostly 2 bytes)."""
    folder = source_directory(source)
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder else 0
    return stored * 2 if dtype == "float32" else stored


def _memory_room() -> int:
    """Free memory where a model loads: the GPUs' (spread across them) or the host's."""
    if torch.cuda.is_available():
        free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        return int(free * 0.85)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 * 3 // 4
    except (OSError, KeyError, ValueError):
        return 0


def _device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _median_seconds(trials: list[Any]) -> float | None:
    values = [t.user_attrs.get("seconds") for t in trials if t.user_attrs.get("seconds")]
    return round(statistics.median(values), 2) if values else None


EXPORT_CLAIM = "export.claim"
PRIMARY_POLL_S = 2.0


def _primary_gone(run: RunDir, status: StatusWriter, reporter: Reporter, opts: RunOptions) -> bool:
    """A secondary whose study is complete waits while the run's primary worker (worker 0 in
    this run folder) works on; True when it ended without exporting (killed, failed), so the
    export is handed over and the search was not paid for nothing. A box holding only
    secondaries (a multi-box run's worker box) has no primary to wait for."""
    _set_phase(status, reporter, "waiting", "for the primary worker's export")
    while True:
        primary = run.read_status(0)
        if not primary.get("primary"):
            return False
        if primary.get("state") in ("done", "stopped"):
            return False
        _, alive = run.worker_alive(0)
        if not alive or primary.get("state") == "failed":
            return True
        if opts.should_stop():
            return False
        time.sleep(PRIMARY_POLL_S)
        status.flush()  # waiting is progress (the guardian reads it)


def _claim_export(run: RunDir, index: int) -> int | None:
    """One export per run folder: the claim names who exports. None: this worker holds it (a
    claim whose process is gone is taken over); else the index of the live worker that does."""
    path = run.path / EXPORT_CLAIM
    mine = json.dumps({"worker": index, "pid": os.getpid()})
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                held = {}
            if held.get("pid") == os.getpid() or not pid_alive(held.get("pid")):
                path.unlink(missing_ok=True)  # this process's (a re-export) or a dead one's
                continue
            return int(held.get("worker", -1))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(mine)
        return None
    return None


def _recover_local_orphans(study: Any, storage: Any, run: RunDir) -> int:
    """On one box, RUNNING trials whose worker process is gone are re-queued at once."""
    others = [run.worker_alive(w) for w in run.workers()]
    if any(alive and pid != os.getpid() for pid, alive in others):
        return 0
    return search.recover_orphans(study, storage)
