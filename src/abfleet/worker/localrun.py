"""The embedded default: run a job on this machine, with a SQLite study in the run folder.

Every check that can fail on bad input runs before the run folder is created, and a folder this
command created is removed again if the run fails on bad input, so a mistake leaves nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abfleet.errors import Terminated, UserError
from abfleet.job.source import resolve_source
from abfleet.job.spec import HEAD_STORAGE, Job, bundle, check_output_dir, load_job
from abfleet.job.storage import has_password
from abfleet.worker import publish
from abfleet.worker.rundir import RunDir


@dataclass
class LocalRun:
    job: Job  # the bundled copy inside the run folder
    run: RunDir
    created: bool  # this command created the run folder


def validate_inputs(job: Job) -> None:
    """The model and prompts of a job, checked without loading the model (local or cloud run)."""
    from abfleet.core.model import check_architecture, check_judge_here

    source = resolve_source(job.spec.model)
    if source.is_local:
        check_architecture(source)
    check_judge_here(job.spec.evaluation.judge)
    job.benchmark_folder()
    job.load_all_prompts()


def validate(job: Job) -> None:
    """Everything a local run can check before it creates its run folder."""
    check_output_dir(job.output_dir())
    if job.spec.search.storage == HEAD_STORAGE:
        raise UserError(
            "storage 'head' is for cloud runs (abfleet launch); a local run uses SQLite or a URL"
        )
    validate_inputs(job)


def prepare(job_arg: str | None, flags: dict[str, Any]) -> LocalRun:
    job = load_job(job_arg, flags)
    validate(job)
    if job.spec.output.push_to_hub:
        publish.require_token(job.spec.output.push_to_hub)
    out = job.output_dir()
    if has_password(job.spec.search.storage):
        # The run folder's job says `env` (see bundle): this process and its secondary workers
        # read the URL from their environment, never from a file.
        os.environ["ABFLEET_STORAGE_URL"] = job.spec.search.storage
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        # The run folder keeps its own copy of the job, prompts included, with the model path
        # made absolute: `abfleet resume` and the worker then see exactly what was asked here.
        bundled = load_job(str(bundle(job, out, model=_absolute_model(job), output_dir=str(out))))
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return LocalRun(bundled, RunDir(out), created)


def _absolute_model(job: Job) -> str:
    source = resolve_source(job.spec.model)
    return source.display if source.is_local else job.spec.model


@contextlib.contextmanager
def cleanup_on_bad_input(prepared: LocalRun) -> Iterator[None]:
    """Remove a run folder this command created if the run then fails on bad input, before any
    trial ran: a folder whose study holds trials is kept (a failed export is run again from
    it, and the trials were paid for)."""
    try:
        yield
    except UserError:
        if prepared.created and not _trials_ran(prepared.run):
            shutil.rmtree(prepared.run.path, ignore_errors=True)
        raise


def _trials_ran(run: RunDir) -> bool:
    return any("last_trial" in run.read_status(i) for i in run.workers())


class StopFlag:
    """Signals to a run. SIGTERM ends it now (raises Terminated) from any phase. Ctrl+C during
    the search (inside `graceful()`) finishes the current trial, then stops; a second Ctrl+C,
    or one in any other phase (load, demo build, directions, re-score, export), ends it now."""

    def __init__(self, on_first: Any = None) -> None:
        self.event = threading.Event()
        self.on_first = on_first
        self._graceful = 0
        self._previous: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self.event.is_set()

    @contextlib.contextmanager
    def graceful(self) -> Iterator[None]:
        """While inside, a first Ctrl+C lets the current trial finish."""
        self._graceful += 1
        try:
            yield
        finally:
            self._graceful -= 1

    def _handle(self, signum: int, _frame: Any) -> None:
        first = not self.event.is_set()
        self.event.set()
        if signum == signal.SIGTERM:
            raise Terminated("terminated (SIGTERM)")
        if first and self._graceful:
            if self.on_first is not None:
                self.on_first(signum)
            return
        raise KeyboardInterrupt

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def write_pid(run: RunDir, worker: int) -> Path:
    path = run.pid_file(worker)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(path)
    return path


def placement(workers: int) -> tuple[list[str], int]:
    """CUDA_VISIBLE_DEVICES of each local worker (GPUs split evenly), and CPU threads each."""
    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    threads = max(1, (os.cpu_count() or 1) // workers)
    if n_gpus == 0:
        return [""] * workers, threads
    if workers > n_gpus:
        raise UserError(f"{workers} workers need a GPU each; this machine has {n_gpus}")
    per = n_gpus // workers
    return [
        ",".join(str(g) for g in range(i * per, (i + 1) * per)) for i in range(workers)
    ], threads


def start_secondaries(prepared: LocalRun, workers: int, resume: bool) -> list[Any]:
    """Workers 1..N-1 as detached processes on the same study; worker 0 runs in this process."""
    import subprocess
    import sys

    gpus, threads = placement(workers)
    procs = []
    for index in range(1, workers):
        env = {**os.environ, "ABFLEET_THREADS": str(threads)}
        if gpus[index]:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index]
        argv = [
            sys.executable,
            "-m",
            "abfleet",
            "worker",
            "run",
            "--run-dir",
            str(prepared.run.path),
            "--index",
            str(index),
            "--secondary",
            "--no-create",
            *(["--resume"] if resume else []),
        ]
        out = open(prepared.run.path / f"worker-{index}.out", "ab")  # noqa: SIM115 - the child owns it
        procs.append(
            subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        out.close()
    if gpus[0]:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
    apply_threads(threads)
    return procs


def apply_threads(threads: int | None = None) -> None:
    """Several workers on one CPU share its cores instead of each taking them all."""
    value = threads or int(os.environ.get("ABFLEET_THREADS", "0") or 0)
    if value > 0:
        import torch

        torch.set_num_threads(value)


def finish_secondaries(procs: list[Any], timeout: float = 600) -> None:
    """Secondaries end by themselves once the study is complete; on a stop they are ended
    (SIGTERM: the trial each was running is failed and re-queued, to be redone on resume)."""
    import signal
    import subprocess

    for proc in procs:
        if proc.poll() is None and threading.current_thread() is threading.main_thread():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
