"""`abfleet worker ...`: what a rented box runs. Never reads stdin; logs to the run folder."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click

from abfleet.buildinfo import version_string
from abfleet.console import console, setup_logging
from abfleet.job.spec import load_job
from abfleet.worker import localrun
from abfleet.worker.rundir import RunDir


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_string())
        ctx.exit()


@click.group("worker")
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the version and source hash, then exit.",
)
def worker() -> None:
    """Commands run on a box by abfleet itself (you rarely type these)."""


@worker.command("run")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--index", default=0, show_default=True, help="Worker index (seed offset, file names)."
)
@click.option("--secondary", is_flag=True, help="Run trials only; the primary worker exports.")
@click.option("--resume", is_flag=True, help="Continue a study made by a different job spec.")
@click.option("--no-create", is_flag=True, help="Load the study only (the controller created it).")
def worker_run(run_dir: Path, index: int, secondary: bool, resume: bool, no_create: bool) -> None:
    """Run the job in RUN_DIR/job.toml until the study is complete.

    The box's guardian (`abfleet worker guard`), not this process, ends the box's bill."""
    from abfleet.worker.guardian import budget_reached, metered_spend
    from abfleet.worker.jobrun import LogReporter, RunOptions, run_job
    from abfleet.worker.selfstop import BoxTerms

    run = RunDir(run_dir.resolve())
    setup_logging(verbose=False, log_file=str(run.log_file(index)))
    localrun.apply_threads()
    job = load_job(str(run.job_file))
    localrun.write_pid(run, index)
    terms = BoxTerms.from_env(os.environ, run)
    options = RunOptions(
        worker_index=index, primary=not secondary, resume=resume, create_study=not no_create
    )
    if terms is not None and terms.budget_usd > 0:
        # The guardian's mark, or the meter it keeps (the same figure, read between trials).
        options.out_of_budget = lambda: (
            budget_reached(run) or (metered_spend(run, terms) >= terms.budget_usd)
        )
    with localrun.StopFlag() as stop:
        options.should_stop = stop.is_set
        options.graceful = stop.graceful
        result = run_job(job, run, LogReporter(), options)
    sys.exit(0 if result.state == "done" else 130)


@worker.command("guard")
@click.option("--root", required=True, type=click.Path(file_okay=False, path_type=Path))
def worker_guard(root: Path) -> None:
    """Watch every run on this box and end its bill when the work is over (one per box)."""
    from abfleet.worker.guardian import Guardian, only_one

    root = root.resolve()
    setup_logging(verbose=False, log_file=str(root / "guardian.log"))
    with only_one(root) as mine:
        if not mine:
            click.echo("a guardian already watches this box")
            return
        (root / "guardian.pid").write_text(f"{os.getpid()}\n")
        with localrun.StopFlag() as stop, contextlib.suppress(KeyboardInterrupt):
            Guardian(root).run_forever(stop.is_set)


@worker.command("backup")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
def worker_backup(run_dir: Path, out: Path) -> None:
    """Write a consistent SQLite copy of the run's study to OUT; print what it holds (JSON)."""
    from abfleet.worker.backup import backup_study

    click.echo(json.dumps(backup_study(run_dir.resolve(), out)))


@worker.command("report")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON (the default).")
@click.option("--log-lines", default=20, show_default=True, help="Last lines of each worker log.")
def worker_report(run_dir: Path, as_json: bool, log_lines: int) -> None:
    """One JSON snapshot of the run: state, trials, Pareto front, GPU, disk, files, log tail."""
    from abfleet.worker.snapshot import take_snapshot

    snap = take_snapshot(RunDir(run_dir.resolve()), log_lines=log_lines)
    console.print_json(json.dumps(snap, default=str)) if not as_json else click.echo(
        json.dumps(snap, default=str)
    )
