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
from abfleet.fleet.providers.base import Requirements
from abfleet.fleet.sizing import Plan, plan_for_job, with_gpu
from abfleet.job.source import ModelSource, materialize, resolve_source
from abfleet.job.spec import Job, load_job

Say = Callable[[str], None]
Confirm = Callable[[str], bool]


@dataclass(frozen=True)
class LaunchPlan:
    job: Job
    prompts: dict[str, list[str]]
    source: ModelSource  # local, hub, or the built demo directory
    sizing: Plan


def prepare(job_arg: str | None, flags: dict[str, Any], gpu: str | None = None) -> LaunchPlan:
    """Load, validate, resolve and size a job for a cloud run: fails here, before any rent.
    gpu (TYPE or TYPExN) replaces the sizer's pick, if it can hold the model."""
    from abfleet.core.model import check_architecture

    job = load_job(job_arg, flags)
    if job.spec.search.storage.startswith("sqlite"):
        raise UserError(
            "a cloud run keeps its SQLite study on the box: leave storage empty, or give a Postgres URL"
        )
    source = resolve_source(job.spec.model)
    if source.is_local:
        check_architecture(source)  # no weights loaded: the projections abliteration edits
    prompts = job.load_all_prompts()
    source = materialize(source)
    sizing = plan_for_job(job, prompts, source)
    return LaunchPlan(job, prompts, source, with_gpu(sizing, gpu) if gpu else sizing)


def requirements(
    plan: Plan,
    disk_gb: int | None,
    max_price: float | None,
    exclude: tuple[int, ...] = (),
    workers: int = 1,
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
        plan.gpu, plan.gpu_count * workers, plan.gpu_memory_each_gb * 0.95, disk, max_price, exclude
    )
