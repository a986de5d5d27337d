"""`abfleet run`: a job on this machine (the embedded default)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from abfleet import precision
from abfleet.cli.options import job_flags, pop_job_flags
from abfleet.console import console, setup_logging
from abfleet.render import before_after_table, pareto_table
from abfleet.worker import localrun

if TYPE_CHECKING:
    from abfleet.worker.jobrun import RunResult


@click.command("run")
@click.argument("job", required=False)
@job_flags
@click.option("--resume", is_flag=True, help="Continue a study made by a different job spec.")
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes sharing the study (one per GPU).",
)
@click.pass_context
def run_cmd(ctx: click.Context, job: str | None, resume: bool, workers: int, **kwargs: Any) -> None:
    """Run JOB on this machine (default: jobs/refusal.toml on the demo model).

    JOB is a path or the name of a shipped job (refusal, verbosity, hedging). The study lives in
    the run folder (SQLite) unless --storage says otherwise; rerunning the same command resumes it
    up to --trials in total. Ctrl+C during the search stops after the current trial (again:
    at once); SIGTERM ends the run at once, the running trial re-queued.
    """
    from abfleet.worker.jobrun import ConsoleReporter, RunOptions, run_job

    flags = pop_job_flags(kwargs)
    prepared = localrun.prepare(job, flags)
    run = prepared.run
    setup_logging(ctx.obj.get("verbose", False), log_file=str(run.log_file(0)))
    spec = prepared.job.spec
    console.print(
        f"[bold]abfleet run[/] job [bold]{prepared.job.name}[/], model {spec.model}, "
        f"{spec.search.n_trials} trials, run folder {run.path}"
    )
    dtype, why = precision.plan(spec.model_options.dtypes)[0]
    console.print(f"dtype {dtype}: {why}")
    localrun.write_pid(run, 0)
    secondaries = []
    if workers > 1:
        from abfleet.core.pipeline import create_shared_study
        from abfleet.worker.jobrun import storage_url

        create_shared_study(prepared.job, storage_url(prepared.job, run), resume)
        secondaries = localrun.start_secondaries(prepared, workers, resume)
        console.print(
            f"{workers} workers share the study: worker 0 here, 1..{workers - 1} in {run.path}/worker-N.log"
        )

    def first_signal(_signum: int) -> None:
        console.print("[yellow]stopping after the current trial (Ctrl+C again to abort)[/]")

    try:
        with localrun.StopFlag(first_signal) as stop, localrun.cleanup_on_bad_input(prepared):
            options = RunOptions(
                resume=resume,
                should_stop=stop.is_set,
                graceful=stop.graceful,
                create_study=workers == 1,
            )
            result = run_job(prepared.job, run, ConsoleReporter(), options)
    finally:
        localrun.finish_secondaries(secondaries)
    _render(result, prepared)
    if result.state == "stopped":
        sys.exit(130)


def _render(result: RunResult, prepared: localrun.LocalRun) -> None:
    chosen = result.chosen["trial"] if result.chosen else None
    if result.pareto:
        console.print(pareto_table(result.pareto, chosen))
    if result.state == "stopped":
        console.print(
            f"stopped with {result.complete}/{result.n_trials} trials complete; rerun the same "
            f"command to continue, or add --trials {result.complete} to export what there is"
        )
        return
    if result.chosen is None or result.baseline is None:
        return
    console.print(f"chosen: trial {chosen} ({result.chosen['reason']})")
    if not result.chosen["within_kl_limit"]:
        console.print(
            "[yellow]warning: the chosen trial is above the KL limit: expect a damaged model[/]"
        )
    for warning in result.warnings:
        console.print(f"[yellow]warning: {warning}[/]")
    console.print(before_after_table(result.baseline, result.chosen))
    if result.benchmarks:
        from abfleet.core.capability import lines

        for line in lines(result.benchmarks):
            console.print(f"capability: {line}")
    console.print(
        f"model saved to [bold]{result.model_dir}[/] (verified: MANIFEST.sha256, abfleet-run.json)"
    )
    console.print(f"report: [bold]{result.model_dir / 'report.html'}[/] (open it in a browser)")
    console.print(f"study: {dashboard_command(result.storage_url)}")
    if result.pushed:
        console.print(f"pushed to [bold]{result.pushed}[/]")
    elif result.push_error:
        spec = prepared.job.spec.output
        private = " --private" if spec.push_private else ""
        console.print(
            f"[red]push failed:[/] {result.push_error}; the export is kept: "
            f"abfleet push {prepared.run.path} --repo {spec.push_to_hub}{private}"
        )


def dashboard_command(url: str) -> str:
    """The command that opens the study in optuna-dashboard (never with a password in it)."""
    from abfleet.job.storage import has_password

    if has_password(url):
        return 'optuna-dashboard "$ABFLEET_STORAGE_URL"  (pip install optuna-dashboard)'
    return f"optuna-dashboard {url}  (pip install optuna-dashboard)"


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--out", type=click.Path(path_type=Path), help="Where to write (default: RUN/report.html)."
)
def report_cmd(run_dir: Path, out: Path | None) -> None:
    """Rebuild the HTML report of a run folder (its study.db and model/), offline."""
    from abfleet.worker.report import report_for_folder

    path = report_for_folder(run_dir, out)
    console.print(
        f"report: [bold]{path}[/] ({path.stat().st_size / 1e6:.1f} MB, no network needed)"
    )


@click.command("push")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--repo", required=True, metavar="OWNER/NAME", help="Hub repository to push to.")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
def push_cmd(run_dir: Path, repo: str, private: bool, yes: bool) -> None:
    """Push a run's verified export (RUN/model, or the model folder itself) to the Hugging
    Face Hub, with its model card. The token comes from HF_TOKEN, never from an argument."""
    from abfleet.cli.fleet import confirm_fn
    from abfleet.errors import UserError
    from abfleet.worker import publish

    folder = run_dir / "model" if (run_dir / "model").is_dir() else run_dir
    publish.require_token(repo)
    entries = publish.listed(folder)
    size = sum(e.size for e in entries) / 1e9
    question = (
        f"push {folder} ({len(entries)} files, {size:.2f} GB) to {repo} "
        f"({'private' if private else 'PUBLIC'})?"
    )
    if not yes:
        ask = confirm_fn()
        if ask is None:
            raise UserError(f"{question} Not asked without a terminal: add --yes")
        if not ask(question):
            console.print("nothing pushed")
            return
    console.print(f"checking {folder} against its manifest, then pushing it to {repo}")
    url = publish.push(folder, repo, private)
    console.print(f"pushed to [bold]{url}[/]")


@click.command("size")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the sizing as JSON.")
@click.option("--job", "job_arg", help="Job whose batch size and generation cap to size for.")
@click.option("--batch-size", type=int, help="Batch size to size the cache for (default 64).")
@click.option(
    "--quantization",
    type=click.Choice(("none", "bnb-8bit", "bnb-4bit")),
    help="Size the search at this quantization (default: the job's, else none).",
)
@click.option(
    "--interruptible",
    is_flag=True,
    help="Also estimate the run's cost on demand and interruptible, at a stated pause rate.",
)
@click.option("--trials", type=int, help="Trials to cost (default: the job's).")
@click.option(
    "--pauses-per-hour",
    type=float,
    default=0.5,
    show_default=True,
    help="Outbids per running hour.",
)
@click.option("--pause-minutes", type=float, default=20.0, show_default=True, help="Their length.")
@click.option(
    "--bid-ratio",
    type=float,
    default=0.5,
    show_default=True,
    help="The bid over the on-demand price (Vast's minimum bids are often about half).",
)
def size_cmd(
    model: str,
    as_json: bool,
    job_arg: str | None,
    batch_size: int | None,
    quantization: str | None,
    interruptible: bool,
    trials: int | None,
    pauses_per_hour: float,
    pause_minutes: float,
    bid_ratio: float,
) -> None:
    """Disk, host RAM and GPU needed for MODEL, and the cheapest GPU that fits, per quantization."""
    from abfleet.cli.fleet import render_sizing
    from abfleet.fleet.pausecost import PauseRate, estimate
    from abfleet.fleet.sizing import plan_for
    from abfleet.job.spec import load_job

    plan = plan_for(model, job_arg, batch_size, quantization)
    if not interruptible:
        render_sizing(plan, as_json)
        if job_arg and not as_json:
            from abfleet.fleet.launch import check_hours

            check_hours(load_job(job_arg, {"model": model}), plan, console.print)
        return
    n_trials = trials or load_job(job_arg, {"model": model}).spec.search.n_trials
    cost = estimate(plan, n_trials, PauseRate(pauses_per_hour, pause_minutes, bid_ratio))
    if as_json:
        click.echo(json.dumps({**plan.to_dict(), "cost": cost.to_dict()}, indent=1))
        return
    render_sizing(plan, False)
    for line in cost.lines():
        console.print(line)
