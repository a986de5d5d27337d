"""What one launch will do, decided once: the job (read once), its prompts (loaded once), its
model source (resolved, and built for the demo, once) and the sizing of the box it needs.

Every later step of `launch`, `create` and `submit` takes this object; none reads the job file
again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from abfleet.errors import UserError
from abfleet.fleet.providers.base import Bid, Requirements
from abfleet.fleet.sizing import Plan, plan_for_job, with_gpu
from abfleet.job.source import ModelSource, materialize, resolve_source
from abfleet.job.spec import Job, load_job
from abfleet.worker.publish import require_token

Say = Callable[[str], None]
Confirm = Callable[[str], bool]

DEFAULT_STOP_AFTER_S = 1800.0
_UNITS = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class Billing:
    """What the user chose about money at launch: when a box whose work is over stops itself,
    whether a downloaded one is destroyed instead, and a budget for the whole run."""

    stop_after_s: float = DEFAULT_STOP_AFTER_S  # 0: the box keeps running when done
    then_destroy: bool = False
    budget_usd: float = 0.0  # 0: none
    # Interruptible: outbid longer than this, the run moves to another box (0: it waits).
    max_pause_s: float = 0.0


@dataclass(frozen=True)
class LaunchOptions:
    """How `launch` rents and runs, as the user asked on the command line."""

    provider: str = "vast"
    host: str | None = None  # for the ssh provider
    yes: bool = False
    max_price: float | None = None
    disk_gb: int | None = None
    workers: int = 1  # per box
    instances: int = 1
    resume: bool = False  # continue a shared study made by a different job spec
    keep_on_failure: bool = False
    gpu: str | None = None  # TYPE or TYPExN instead of the sizer's pick
    billing: Billing = Billing()
    bid: Bid | None = None  # interruptible, at this bid policy; None: on demand


def parse_duration(text: str, option: str = "--stop-after") -> float:
    """`30m`, `90s`, `2h` or minutes as a bare number; `0` means never."""
    raw = text.strip().lower()
    unit = raw[-1:] if raw[-1:] in _UNITS else "m"
    number = raw[:-1] if raw[-1:] in _UNITS else raw
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise UserError(
            f"{option} {text!r} is not a duration: use e.g. 30m, 90s, 2h, or 0 for never"
        ) from None
    if value < 0:
        raise UserError(f"{option} {text!r} is negative: use 0 for never")
    return value


@dataclass(frozen=True)
class LaunchPlan:
    job: Job
    prompts: dict[str, list[str]]
    source: ModelSource  # local, hub, or the built demo directory
    sizing: Plan
    billing: Billing = Billing()


def prepare(
    job_arg: str | None,
    flags: dict[str, Any],
    gpu: str | None = None,
    billing: Billing | None = None,
    say: Say | None = None,
) -> LaunchPlan:
    """Load, validate, resolve and size a job for a cloud run: fails here, before any rent.
    gpu (TYPE or TYPExN) replaces the sizer's pick, if it can hold the model."""
    from abfleet.core.model import check_architecture

    job = load_job(job_arg, flags)
    if job.spec.output.push_to_hub:  # the box pushes with the HF_TOKEN shipped from here
        require_token(job.spec.output.push_to_hub)
    if job.spec.evaluation.benchmark_tasks:
        raise UserError(
            "--benchmark-tasks (your own lm-eval task folder) runs with `abfleet run` here; a "
            "box runs lm-eval's own tasks (--benchmark gsm8k,...)"
        )
    if job.spec.search.storage.startswith("sqlite"):
        raise UserError(
            "a cloud run keeps its SQLite study on the box: leave storage empty, or give a Postgres URL"
        )
    source = resolve_source(job.spec.model)
    if source.is_local:
        check_architecture(source)  # no weights loaded: the projections abliteration edits
    prompts = job.load_all_prompts()
    if source.kind == "built" and say is not None:
        say(
            f"the job's model is {source.display} (the built-in demo; --model names another): "
            "it is built here, then uploaded"
        )
    source = materialize(source, progress=say)
    sizing = plan_for_job(job, prompts, source)
    if billing is not None and billing.budget_usd < 0:
        raise UserError("--budget must be a positive amount of dollars")
    return LaunchPlan(
        job, prompts, source, with_gpu(sizing, gpu) if gpu else sizing, billing or Billing()
    )


def requirements(
    plan: Plan,
    disk_gb: int | None,
    max_price: float | None,
    exclude: tuple[int, ...] = (),
    workers: int = 1,
    bid: Bid | None = None,
) -> Requirements:
    """What to rent: the plan's GPUs for each of `workers` workers, and never less disk than
    sizing says (a full disk while saving is how long runs were lost)."""
    disk = plan.disk_gb
    if disk_gb is not None:
        if disk_gb < plan.disk_gb:
            raise UserError(
                f"--disk {disk_gb} GB is below the {plan.disk_gb} GB this model needs "
                "(2 x weights + 20 GB): the run would fail while saving the result"
            )
        disk = disk_gb
    if plan.gpu is None:
        raise UserError(
            f"no GPU in config/gpus.toml holds {plan.gpu_memory_gb:.0f} GB: add a larger type or count"
        )
    return Requirements(
        plan.gpu,
        plan.gpu_count * workers,
        plan.gpu_memory_each_gb * 0.95,
        disk,
        max_price,
        exclude,
        host_ram_gb=plan.host_ram_gb * workers,
        bid=bid,
    )
