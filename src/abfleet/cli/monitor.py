"""Commands for a running or finished job: status, progress, logs, watch, backup, download,
resume, and the guarded start, stop and destroy."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from abfleet.cli.fleet import choose_fn, confirm_fn, say
from abfleet.console import console, err_console, is_interactive, setup_logging, warn
from abfleet.errors import AbfleetError, Declined
from abfleet.fleet.instances import resolve_instance
from abfleet.fleet.ledger import Ledger
from abfleet.ops.actions import box_trouble, note_state
from abfleet.ops.monitor import RunView, Session, Target, pick_run, require_run
from abfleet.ops.streams import DEFAULT_STREAMS
from abfleet.render import box_lines, fmt_duration, fmt_refusals, fmt_usd, pareto_table

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
run_option = click.option(
    "--run", "run_name", help="Which run on the instance (default: its latest)."
)


def _target(ledger: Ledger, instance: str | None, run_name: str | None = None) -> Target:
    from abfleet.fleet.inventory import settle_open_creates

    settle_open_creates(ledger)
    record = resolve_instance(ledger, instance, choose_fn())
    return Target(record, pick_run(ledger, record, run_name))


def _provider_for(record: Any) -> Any:
    from abfleet.fleet.providers import get_provider

    return get_provider(record.provider)


# ---------------------------------------------------------------------------------------------


@click.command("status")
@click.argument("instance", required=False)
@run_option
@json_option
def status_cmd(instance: str | None, run_name: str | None, as_json: bool) -> None:
    """The instance (provider state, GPU, $/h) and its run (state, trials)."""
    from abfleet.ops.actions import instance_status

    ledger = Ledger()
    target = _target(ledger, instance, run_name)
    data = instance_status(ledger, target, _provider_for(target.instance))
    if as_json:
        click.echo(json.dumps(data, indent=1, default=str))
        return
    i = data["instance"]
    console.print(
        f"instance [bold]{i['id']}[/] ({i['provider']}) {i['label']}: {i['state']} {i['detail']}"
    )
    console.print(f"  {i['gpu']}, {i['price_per_hour'] or 0:.3f} $/h, ssh {i['ssh'] or '-'}")
    if i.get("spent_usd") is not None:
        now = "disk only" if i["billing"] == "stopped" else i["billing"]
        console.print(
            f"  spent so far {fmt_usd(i['spent_usd'])}; billing now {i['rate_now']:.3f} $/h ({now})"
        )
    r = data["run"]
    if r:
        trials = r.get("trials") or {}
        console.print(
            f"run [bold]{r['name']}[/] ({r['job']} on {r['model']}): {r.get('state', 'unknown')}"
            + (f", {trials.get('complete', 0)}/{trials.get('total')} trials" if trials else "")
            + (f" ({r['reason']})" if r.get("reason") else "")
        )
        if r.get("moved"):
            console.print(f"  {r['moved']}", markup=False)
        for warning in r.get("warnings") or []:
            console.print(f"  [yellow]warning:[/] {warning}")
        if r.get("dtype"):
            console.print(
                f"  dtype {r['dtype']} ({r.get('dtype_reason') or 'reason not recorded'})"
            )
        if r.get("budget_usd"):
            console.print(f"  budget {fmt_usd(r['budget_usd'])}")
        for text, style in box_lines(r.get("box")):
            console.print(f"  {text}", style=style or None, markup=False)
        if r.get("hint"):
            console.print(f"  {r['hint']}")
        push = r.get("push") or {}
        if push.get("url"):
            console.print(f"  pushed to {push['url']}")
        elif push.get("error"):
            console.print(
                f"  [red]push to {push['repo']} failed:[/] {push['error']} (the export is kept: "
                f"abfleet download {i['id']}, then abfleet push runs/{r['name']} --repo {push['repo']})"
            )
        if r.get("local_study"):
            from abfleet.cli.run import dashboard_command

            console.print(f"  study backup: {dashboard_command('sqlite:///' + r['local_study'])}")
        if box_trouble(r.get("box")):
            raise SystemExit(1)  # a box that may bill on unseen is not a healthy status


@click.command("progress")
@click.argument("instance", required=False)
@run_option
@json_option
@click.option("--no-backup", is_flag=True, help="Do not copy the study and logs here.")
def progress_cmd(
    instance: str | None, run_name: str | None, as_json: bool, no_backup: bool
) -> None:
    """Trials, Pareto front (refusals k/n, KL), ETA and workers of a run, in one SSH round trip.

    Also copies a consistent snapshot of the study and the logs into the local run folder.
    """
    ledger = Ledger()
    target = _target(ledger, instance, run_name)
    require_run(target)
    view = RunView(ledger, target)
    try:
        snap = view.snapshot()
        backup = None if no_backup else view.backup(snap)
    finally:
        view.close()
    note_state(ledger, target, snap)
    if as_json:
        click.echo(json.dumps({**snap, "backup": backup}, default=str))
        return
    t = snap["trials"]
    console.print(
        f"run [bold]{target.run.name}[/]: {snap['state']}"  # type: ignore[union-attr]
        + (f" ({snap['reason']})" if snap.get("reason") else "")
        + f", {t.get('complete', 0)}/{t.get('total')} trials, {t.get('running', 0)} running, {t.get('failed', 0)} failed"
    )
    if snap.get("median_trial_s"):
        console.print(
            f"median {snap['median_trial_s']} s/trial, ETA {fmt_duration(snap.get('eta_s'), live=True)}"
        )
    base = snap.get("baseline")
    if base:
        console.print(f"before: refusals {fmt_refusals(base['refusals'], base['n_bad'])}")
    for text, style in box_lines(snap.get("box")):
        console.print(text, style=style or None, markup=False)
    console.print(pareto_table(snap.get("pareto", [])))
    if len(snap.get("workers", [])) > 1:
        from abfleet.ops.dashboard import workers_table

        console.print(workers_table(snap, time.time()))
    if backup:
        console.print(
            f"study backed up to {Path(target.run.local_dir) / 'study.db'} ({backup.get('complete', 0)} trials)"
        )  # type: ignore[union-attr]


@click.command("logs")
@click.argument("instance", required=False)
@run_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl+C to stop).")
@click.option("--worker", "worker_index", default=0, show_default=True)
@click.option("-n", "--lines", default=40, show_default=True)
@json_option
def logs_cmd(
    instance: str | None,
    run_name: str | None,
    follow: bool,
    worker_index: int,
    lines: int,
    as_json: bool,
) -> None:
    """The worker's log on the box."""
    ledger = Ledger()
    target = _target(ledger, instance, run_name)
    require_run(target)
    session = Session(target)
    path = f"{session.run_dir}/worker-{worker_index}.log"
    try:
        out = session.remote.run(["tail", "-n", str(lines), path], timeout=60, check=False)
        if out.code != 0:
            raise AbfleetError(f"no log at {path} on the box yet")
        if as_json:
            click.echo(json.dumps({"path": path, "lines": out.stdout.splitlines()}))
            return
        click.echo(out.stdout, nl=False)
        if not follow:
            return
        offset = int(session.remote.run(["stat", "-c", "%s", path], timeout=60).stdout.strip())
        try:
            while True:
                chunk = session.read_from(path, offset)
                if chunk:
                    offset += len(chunk)
                    click.echo(chunk.decode("utf-8", errors="replace"), nl=False)
                else:
                    time.sleep(1)
        except KeyboardInterrupt:
            return
    finally:
        session.close()


@click.command("watch")
@click.argument("instance", required=False)
@run_option
@click.option(
    "--every", "interval", default=5.0, show_default=True, help="Seconds between refreshes."
)
@click.option("--once", is_flag=True, help="Render one snapshot and exit (no terminal needed).")
@click.option("--no-backup", is_flag=True, help="Do not copy the study and logs here.")
def watch_cmd(
    instance: str | None, run_name: str | None, interval: float, once: bool, no_backup: bool
) -> None:
    """Live dashboard of a run over one SSH connection. Ctrl+C leaves the run untouched."""
    from abfleet.ops.watch import watch

    ledger = Ledger()
    target = _target(ledger, instance, run_name)
    require_run(target)
    watch(ledger, target, interval, once, backup=not no_backup)


@click.command("backup")
@click.argument("instance", required=False)
@run_option
def backup_cmd(instance: str | None, run_name: str | None) -> None:
    """Copy a consistent snapshot of the study and the logs into the local run folder now."""
    ledger = Ledger()
    target = _target(ledger, instance, run_name)
    run = require_run(target)
    view = RunView(ledger, target)
    try:
        meta = view.backup(view.snapshot(), force=True)
    finally:
        view.close()
    console.print(
        f"backed up {meta['complete']} completed trials to {Path(run.local_dir) / 'study.db'} and the logs to {Path(run.local_dir) / 'logs'}"
    )


@click.command("download")
@click.argument("instance", required=False)
@run_option
@click.option(
    "--to",
    "to_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the model (default: runs/<run>/model).",
)
@click.option(
    "--streams",
    type=click.IntRange(1, 32),
    default=DEFAULT_STREAMS,
    show_default=True,
    help="Parallel SSH connections (files side by side, large files in ranges); "
    "1: one stream, rsync when both ends have it.",
)
@click.option("--sftp", is_flag=True, help="One SFTP stream, even when rsync is on both ends.")
@click.option(
    "--then-destroy", is_flag=True, help="Destroy the instance once every file is verified."
)
@click.option("--yes", is_flag=True, help="With --then-destroy: no confirmation.")
@click.pass_context
def download_cmd(
    ctx: click.Context,
    instance: str | None,
    run_name: str | None,
    to_dir: Path | None,
    streams: int,
    sftp: bool,
    then_destroy: bool,
    yes: bool,
) -> None:
    """Fetch the exported model: resumable, every file checked against MANIFEST.sha256."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from abfleet.ops.delivery import deliver

    setup_logging(ctx.obj.get("verbose", False))
    ledger = Ledger()
    target = _target(ledger, instance, run_name)
    run = require_run(target)
    dest = (to_dir or Path("runs") / run.name / "model").resolve()
    destroy = then_destroy or run.then_destroy
    if run.then_destroy and not then_destroy:
        console.print("once verified, every box of the run is destroyed, as chosen at launch")

    def confirm_destroy(box: Target) -> None:
        # A box chosen for destroy at launch needs no typed id; one asked for now does.
        _guarded_destroy_check(ledger, box, yes or run.then_destroy)

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("download", total=None)
        got = deliver(
            ledger,
            target,
            dest,
            destroy,
            confirm_destroy,
            warn,
            say,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            prefer_rsync=not sftp,
            stream_count=streams,
            on_attempt=lambda n, why: err_console.print(
                f"[yellow]connection lost ({why}); resuming[/]"
            ),
        )
    result = got.result
    console.print(
        f"[bold green]verified[/] {result.files} files, {result.bytes_total / 1e9:.2f} GB in {dest} "
        f"({result.method}{f', {result.streams} streams' if result.streams > 1 else ''}, "
        f"{result.bytes_transferred / 1e6:.1f} MB transferred, {result.seconds:.1f} s)"
    )
    if result.set_aside:
        shown = ", ".join(result.set_aside[:3]) + (" ..." if len(result.set_aside) > 3 else "")
        console.print(
            f"[yellow]moved {len(result.set_aside)} file(s) that are not part of this export "
            f"aside[/] ({shown}) to {result.set_aside_to}: nothing loads them by mistake"
        )
    for iid in got.destroyed:
        console.print(f"[bold]destroyed instance {iid}[/]")
    if got.destroyed:
        for note in got.notes:
            console.print(note)


@click.command("resume")
@click.argument("run_name")
@click.option("--here", is_flag=True, help="Continue on this machine instead of a new box.")
@click.option(
    "--provider", type=click.Choice(("vast", "ssh", "local")), default="vast", show_default=True
)
@click.option("--host", help="For --provider ssh: user@host[:port].")
@click.option("--trials", type=int, help="New total trial budget.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
@click.option("--max-price", type=float)
@click.option(
    "--keep-on-failure",
    is_flag=True,
    help="If a step after the create fails, keep the new instance instead of destroying it.",
)
@click.option(
    "--budget",
    type=click.FloatRange(min=0, min_open=True),
    help="Most $ this resumed run may cost, counted from now (the first run's does not carry over).",
)
@click.pass_context
def resume_cmd(
    ctx: click.Context,
    run_name: str,
    here: bool,
    provider: str,
    host: str | None,
    trials: int | None,
    yes: bool,
    max_price: float | None,
    keep_on_failure: bool,
    budget: float | None,
) -> None:
    """Continue RUN from its local study backup: on a new box, or here with --here."""
    from abfleet.ops.resume import resume

    setup_logging(ctx.obj.get("verbose", False))
    resume(
        Ledger(),
        run_name,
        here,
        provider,
        host,
        trials,
        yes,
        max_price,
        confirm_fn(),
        say,
        keep_on_failure,
        budget or 0.0,
    )


# ---------------------------------------------------------------------------------------------
# Guarded instance actions


def _ask_typed() -> Any:
    if not is_interactive():
        return None
    return lambda question: click.prompt(question, default="", show_default=False)


def _guarded_destroy_check(ledger: Ledger, target: Target, yes: bool, force: bool = False) -> Any:
    """Show exactly what would be destroyed, refuse what would lose work, ask for the id."""
    from abfleet.ops.guard import assess, check_destroy, confirm_typed

    provider = _provider_for(target.instance)
    a = assess(ledger, target, provider)
    console.print("[bold]destroy[/] (deletes the box and everything on it; billing stops):")
    for line in a.lines:
        console.print(f"  {line}")
    check_destroy(a, force)
    confirm_typed(target.instance.instance_id or "", "destroy", yes, _ask_typed())
    return provider


def _destroy(
    ledger: Ledger, instance: str | None, run_name: str | None, yes: bool, force: bool
) -> None:
    from abfleet.ops.actions import destroy_instance

    target = _target(ledger, instance, run_name)
    provider = _guarded_destroy_check(ledger, target, yes, force)
    console.print(f"[bold]{destroy_instance(ledger, target, provider, warn)}[/]")


@click.command("destroy")
@click.argument("instance", required=False)
@click.option("--yes", is_flag=True, help="Do not ask to type the id (for scripts).")
@click.option(
    "--force",
    is_flag=True,
    help="Destroy even if the model is not downloaded or the backup is stale.",
)
def destroy_cmd(instance: str | None, yes: bool, force: bool) -> None:
    """Destroy an instance, after showing exactly what it is and what would be lost."""
    _destroy(Ledger(), instance, None, yes, force)


@click.command("stop")
@click.argument("instance", required=False)
@click.option("--yes", is_flag=True, help="Do not ask to type the id (for scripts).")
@click.option("--force", is_flag=True, help="Stop even while a trial runs.")
def stop_cmd(instance: str | None, yes: bool, force: bool) -> None:
    """Stop an instance: its worker is killed at once; a stopped Vast.ai box still bills for disk."""
    from abfleet.ops.guard import assess, check_stop, confirm_typed

    ledger = Ledger()
    target = _target(ledger, instance, None)
    provider = _provider_for(target.instance)
    a = assess(ledger, target, provider)
    console.print(
        "[bold]stop[/] (kills the worker at once; the box keeps its disk, and keeps billing for it):"
    )
    for line in a.lines:
        console.print(f"  {line}")
    check_stop(a, force)
    iid = target.instance.instance_id or ""
    confirm_typed(iid, "stop", yes, _ask_typed())
    provider.stop(iid)
    ledger.meter_mark(provider.name, iid, "stopped")
    console.print(f"[bold]stopped[/] instance {iid}")


@click.command("start")
@click.argument("instance", required=False)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
def start_cmd(instance: str | None, yes: bool) -> None:
    """Start a stopped instance (billing resumes)."""
    ledger = Ledger()
    target = _target(ledger, instance, None)
    rec = target.instance
    if not yes:
        ask = confirm_fn()
        if ask is None:
            raise Declined("refusing to start a billable instance without confirmation: pass --yes")
        if not ask(
            f"start instance {rec.instance_id} ({rec.gpu_count}x {rec.gpu_name}, {rec.price_per_hour or 0:.3f} $/h)"
        ):
            raise Declined("did not start: nothing was changed")
    provider = _provider_for(rec)
    provider.start(rec.instance_id or "")
    ledger.meter_mark(provider.name, rec.instance_id or "", "running")
    console.print(
        f"[bold]started[/] instance {rec.instance_id}; its SSH port may have changed: see `abfleet status`"
    )
