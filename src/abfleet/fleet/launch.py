"""`abfleet launch`: one plan, rented, set up and started, in a few steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from abfleet.errors import UserError
from abfleet.fleet.deploy import Box
from abfleet.fleet.ledger import Ledger, RunRecord
from abfleet.fleet.plan import Confirm, LaunchOptions, LaunchPlan, Say, prepare, requirements
from abfleet.fleet.providers.base import Instance, Provider
from abfleet.fleet.rent import BudgetCheck, Rental, create_fleet
from abfleet.fleet.sizing import Plan
from abfleet.fleet.submit import (
    BoxPlan,
    box_terms,
    gpu_groups,
    new_run_name,
    record_run,
    register,
    setup,
    submit_box,
)
from abfleet.job.spec import HEAD_STORAGE
from abfleet.job.storage import is_sqlite, resolve_shared
from abfleet.paths import local_run_dir
from abfleet.settings import settings


def launch(
    job_arg: str | None,
    flags: dict[str, Any],
    opts: LaunchOptions,
    confirm: Confirm | None,
    say: Say,
    show_plan: Callable[[Plan], None] | None = None,
) -> RunRecord:
    """Size, rent (or register), set up and start a job on one or several boxes."""
    from abfleet.core.pipeline import create_shared_study
    from abfleet.fleet.providers import get_provider

    workers, instances, resume = opts.workers, opts.instances, opts.resume
    if workers < 1 or instances < 1:
        raise UserError("--workers and --instances must be at least 1")
    if opts.billing.max_pause_s and opts.bid is None:
        raise UserError("--max-pause is for interruptible boxes: add --interruptible")
    if opts.billing.max_pause_s and instances > 1:
        raise UserError(
            "--max-pause moves a one-box run; with --instances the study's box is on demand and "
            "a paused worker box only loses its running trial: leave --max-pause out"
        )
    lp = prepare(job_arg, flags, opts.gpu, opts.billing, say)
    job, plan = lp.job, lp.sizing
    if show_plan:
        show_plan(plan)
    storage = job.spec.search.storage
    head = storage == HEAD_STORAGE
    if storage and not head:
        storage = resolve_shared(storage)
    if instances > 1 and (not storage or is_sqlite(storage)):
        raise UserError(
            f"{instances} instances need one shared study: --storage head (Postgres on the first instance) "
            "or --storage postgresql://USER@HOST/DB; a SQLite study cannot be shared between boxes"
        )
    if storage and not head:
        # Unreachable or a wrong password: fails here, before anything is rented.
        create_shared_study(job, storage, resume, prompts=lp.prompts)
    provider = get_provider(opts.provider, opts.host)
    if opts.bid is not None and not provider.billable:
        raise UserError("--interruptible is for rented boxes (--provider vast)")
    if instances > 1 and not provider.billable:
        raise UserError(
            "--instances is for rented boxes (--provider vast); give a Postgres URL to share a study with your own machines"
        )
    ledger = Ledger()
    req = requirements(plan, opts.disk_gb, opts.max_price, workers=workers, bid=opts.bid)
    run = new_run_name(job)
    pg_port = settings().vast.postgres_port
    # From the first create on, a failure destroys what this command rented (or keeps it, and
    # says so): a box never bills unseen.
    with Rental(provider, ledger, opts.keep_on_failure) as rental:
        fleet = create_fleet(
            provider,
            ledger,
            plan,
            req,
            run,
            job.spec.search.n_trials,
            opts.yes,
            confirm,
            say,
            rental,
            instances,
            (pg_port,) if head else (),
            budget=BudgetCheck(
                opts.billing.budget_usd,
                opts.billing.stop_after_s,
                rescore_factor(job),
                check_hours(job, plan, say),
            ),
        )
        try:
            boxes = _start_workers(lp, provider, ledger, fleet, run, workers, storage, resume, say)
        finally:
            for _, remote in fleet:
                remote.close()
        return record_run(
            ledger,
            provider.name,
            [inst.id for inst, _ in fleet],
            boxes[0].run_dir(run),
            job,
            run,
            workers * instances,
            opts.billing,
        )


def check_hours(job: Any, plan: Plan, say: Say) -> float:
    """The capability check's estimated hours (0 without one), said before the confirmation."""
    from abfleet.fleet.sizing import benchmark_hours

    ev = job.spec.evaluation
    hours = benchmark_hours(plan, len(ev.benchmark), ev.benchmark_limit)
    if ev.benchmark:
        took = f"about {hours * 60:.0f} min" if hours is not None else "time unknown"
        say(
            f"capability check: {', '.join(ev.benchmark)} ({ev.benchmark_limit} examples each) "
            f"on the original and the export after the search: {took}, counted in the budget"
        )
    return hours or 0.0


def rescore_factor(job: Any) -> float:
    """The re-score's tokens per answer over the search's; 0 when there is no re-score."""
    ev = job.spec.evaluation
    return ev.long_new_tokens / ev.max_new_tokens if ev.long_new_tokens > ev.max_new_tokens else 0.0


def _start_workers(
    lp: LaunchPlan,
    provider: Provider,
    ledger: Ledger,
    fleet: list[tuple[Instance, Any]],
    run: str,
    workers: int,
    storage: str,
    resume: bool,
    say: Say,
) -> list[Box]:
    """Set up every box, start the head Postgres when asked, and start the workers."""
    from abfleet.core.pipeline import create_shared_study
    from abfleet.fleet import headdb

    head = storage == HEAD_STORAGE
    boxes = []
    for instance, remote in fleet:
        box = setup(remote, say)
        register(provider, ledger, instance, box)
        boxes.append(box)
    envs: list[dict[str, str]] = [{} for _ in fleet]
    files: dict[str, Path] = {}
    if head:
        pg_port = settings().vast.postgres_port
        db = headdb.start(boxes[0], fleet[0][0], pg_port, local_run_dir(run), say)
        create_shared_study(lp.job, db.url_for_controller(), resume, prompts=lp.prompts)
        envs = [
            {
                "ABFLEET_STORAGE_URL": db.url_on_head(b.run_dir(run))
                if i == 0
                else db.url_elsewhere(b.run_dir(run))
            }
            for i, b in enumerate(boxes)
        ]
        files = {headdb.CERT_NAME: db.local_cert}
    elif storage:
        envs = [{"ABFLEET_STORAGE_URL": storage} for _ in fleet]
    ids = [instance.id for instance, _ in fleet]
    for i, ((instance, _), box) in enumerate(zip(fleet, boxes, strict=True)):
        bp = BoxPlan(
            first_index=i * workers,
            workers=workers,
            gpus=gpu_groups(workers, lp.sizing.gpu_count, instance.gpu_count),
            env=envs[i],
            shared_study=bool(storage),
            extra_files=files,
            terms=box_terms(provider, ledger, ids, instance.id, lp.billing, head_storage=head),
        )
        submit_box(box, lp, run, say, bp)
    return boxes
