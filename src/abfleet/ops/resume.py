"""`abfleet resume RUN`: continue a run from its local backup, on a new box or on this machine.

What makes it possible: every progress/watch/backup copies a consistent snapshot of the study
home, and submit keeps a copy of the job. A lost or destroyed box costs only the trials after
the last backup; the trial count continues where the backup left it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from abfleet.errors import AbfleetError, UserError
from abfleet.fleet.ledger import Ledger
from abfleet.fleet.plan import DEFAULT_STOP_AFTER_S, Billing, prepare, requirements
from abfleet.fleet.providers.base import Bid
from abfleet.fleet.rent import Rental, create_and_wait
from abfleet.fleet.submit import register, setup, submit
from abfleet.ops.monitor import BACKUP_FILE, read_backup_meta
from abfleet.render import fmt_usd


def _sources(ledger: Ledger, run_name: str) -> tuple[Path, Path, dict[str, Any]]:
    run = ledger.run(run_name)
    if run is None:
        known = ", ".join(r.name for r in ledger.runs()) or "none"
        raise UserError(f"unknown run {run_name!r} (runs: {known})")
    local = Path(run.local_dir)
    study, job = local / BACKUP_FILE, local / "job" / "job.toml"
    meta = read_backup_meta(local)
    if not study.is_file() or meta is None:
        raise UserError(
            f"run {run_name} has no study backup in {local}: nothing to resume from "
            "(`abfleet backup` copies one while the box is alive)"
        )
    if not job.is_file():
        raise UserError(f"run {run_name} has no copy of its job in {local / 'job'}")
    return study, job, meta


def resume(
    ledger: Ledger,
    run_name: str,
    here: bool,
    provider_name: str,
    host: str | None,
    trials: int | None,
    yes: bool,
    max_price: float | None,
    confirm: Callable[[str], bool] | None,
    say: Callable[[str], None],
    keep_on_failure: bool = False,
    budget_usd: float = 0.0,
    bid: Bid | None = None,
    exclude: tuple[int, ...] = (),
    destroy_old: bool = False,
) -> str | None:
    """Returns the new run's name (None when it continues here). bid: rent interruptible;
    exclude: machines not to rent; destroy_old: the old box goes without asking (a move the
    user chose up front with --max-pause)."""
    study, job_file, meta = _sources(ledger, run_name)
    say(
        f"resuming {run_name} from its backup of {time.strftime('%Y-%m-%d %H:%M', time.localtime(meta['at']))} ({meta['complete']} completed trials)"
    )
    # The backup is a SQLite study: the resumed run uses it, whatever store the first run had
    # (a head Postgres went with its box).
    overrides: dict[str, Any] = {"storage": "", **({"trials": trials} if trials else {})}
    if here:
        _resume_here(run_name, study, job_file, overrides, say)
        return None
    from abfleet.fleet.providers import get_provider

    old = ledger.run(run_name)
    # The new box stops itself as the old one would have; its budget counts from this resume.
    billing = Billing(
        stop_after_s=old.stop_after_s
        if old and old.stop_after_s is not None
        else DEFAULT_STOP_AFTER_S,
        then_destroy=bool(old and old.then_destroy),
        budget_usd=budget_usd,
        max_pause_s=(old.max_pause_s or 0.0) if old and bid is not None else 0.0,
    )
    if old and old.budget_usd and not budget_usd:
        say(
            f"note: {run_name} had a budget of {fmt_usd(old.budget_usd)}; this resume has none "
            "(--budget sets one, counted from now)"
        )
    prepared = prepare(str(job_file), overrides, billing=billing, say=say)
    provider = get_provider(provider_name, host)
    req = requirements(prepared.sizing, None, max_price, exclude=exclude, bid=bid)
    new_run = f"{run_name}-r{time.strftime('%H%M%S')}"
    with Rental(provider, ledger, keep_on_failure) as rental:
        instance, remote = create_and_wait(
            provider,
            ledger,
            prepared.sizing,
            req,
            new_run,
            prepared.job.spec.search.n_trials,
            yes,
            confirm,
            say,
            rental,
        )
        try:
            box = setup(remote, say)
            register(provider, ledger, instance, box)
            submit(
                provider,
                instance.id,
                box,
                prepared,
                new_run,
                ledger,
                say,
                study_file=study,
            )
        finally:
            remote.close()
    say(
        f"run {new_run} continues {run_name} on instance {instance.id}: `abfleet watch {instance.id}`"
    )
    ledger.update_run(run_name, continued_by=new_run, state="continued")
    if destroy_old:
        _destroy_old_box(ledger, run_name, say)
    else:
        _offer_to_destroy_old_box(ledger, run_name, confirm, say)
    return new_run


def _destroy_old_box(ledger: Ledger, run_name: str, say: Callable[[str], None]) -> None:
    from abfleet.fleet.providers import get_provider
    from abfleet.fleet.rent import destroy_and_confirm

    old_run = ledger.run(run_name)
    old = ledger.instance(old_run.provider, old_run.instance_id or "") if old_run else None
    if old is None or old.state != "active" or not old.instance_id:
        return
    try:
        destroy_and_confirm(get_provider(old.provider), ledger, old.instance_id)
    except AbfleetError as exc:
        disk = f"{old.storage_per_hour:.3f} $/h" if old.storage_per_hour is not None else "?"
        say(
            f"[bold red]instance {old.instance_id}, the paused box of {run_name}, could NOT be "
            f"destroyed ({exc}):[/] it bills its disk ({disk}, more if its bid wins again); "
            f"`abfleet destroy {old.instance_id}` ends it"
        )
        return
    say(f"destroyed instance {old.instance_id}, the paused box of {run_name}")


def _offer_to_destroy_old_box(
    ledger: Ledger, run_name: str, confirm: Callable[[str], bool] | None, say: Callable[[str], None]
) -> None:
    """The run goes on elsewhere: its old box (stopped or preempted) still bills for its disk."""
    from abfleet.fleet.providers import get_provider
    from abfleet.fleet.rent import destroy_and_confirm

    old_run = ledger.run(run_name)
    old = ledger.instance(old_run.provider, old_run.instance_id or "") if old_run else None
    if old is None or old.state != "active" or not old.instance_id:
        return
    provider = get_provider(old.provider)
    if not provider.billable:
        return
    live = provider.get(old.instance_id)
    if live is None:
        return
    if live.state == "stopped":  # a stopped box bills its disk, not its GPU
        disk = live.storage_per_hour or old.storage_per_hour
        rate = f"{disk:.3f} $/h for its disk" if disk else "its disk"
    else:
        rate = f"{old.price_per_hour:.3f} $/h" if old.price_per_hour else "its full rate"
    question = (
        f"destroy instance {old.instance_id}, the old box of {run_name} (it still bills: {rate})?"
    )
    if confirm is not None and confirm(question):
        destroy_and_confirm(provider, ledger, old.instance_id)
        say(f"destroyed instance {old.instance_id}, the old box of {run_name}")
        return
    say(
        f"instance {old.instance_id}, the old box of {run_name}, still bills ({rate}): "
        f"`abfleet destroy {old.instance_id}` ends it (allowed once the new run's model is downloaded)"
    )


def _resume_here(
    run_name: str,
    study: Path,
    job_file: Path,
    overrides: dict[str, Any],
    say: Callable[[str], None],
) -> None:
    from abfleet.worker import localrun
    from abfleet.worker.jobrun import ConsoleReporter, RunOptions, run_job

    out = Path("runs") / run_name
    flags = {**overrides, "output": str(out)}
    prepared = localrun.prepare(str(job_file), flags)
    target = prepared.run.study_db
    if not target.exists():
        shutil.copyfile(study, target)
    say(f"continuing here in {prepared.run.path}")
    with localrun.StopFlag() as stop:
        result = run_job(
            prepared.job,
            prepared.run,
            ConsoleReporter(),
            RunOptions(should_stop=stop.is_set, graceful=stop.graceful),
        )
    say(
        f"{result.state}: {result.complete}/{result.n_trials} trials"
        + (f", model in {result.model_dir}" if result.model_dir else "")
    )
