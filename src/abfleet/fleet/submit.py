"""Shipping a job to a box that is set up: abfleet itself (setup), then the job, the model
when it is local, the secrets (0600 env file only), and the workers; the run goes in the ledger.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abfleet.errors import UserError
from abfleet.fleet.deploy import (
    Box,
    build_wheel,
    check_disk,
    hub_token_reason,
    install,
    locate,
    run_script,
    secret_env,
    start_worker,
    upload_tree,
    write_env,
)
from abfleet.fleet.ledger import Ledger, RunRecord
from abfleet.fleet.plan import Billing, LaunchPlan, Say
from abfleet.fleet.providers.base import Instance, Provider
from abfleet.job.source import judge_source
from abfleet.job.spec import ENV_STORAGE, HEAD_STORAGE, Job, bundle
from abfleet.job.storage import resolve_shared
from abfleet.paths import local_run_dir
from abfleet.settings import settings
from abfleet.worker.selfstop import BoxTerms


def register(provider: Provider, ledger: Ledger, instance: Instance, box: Box) -> None:
    rec = ledger.instance(provider.name, instance.id)
    if rec is not None:
        ledger.update(
            rec.key,
            ssh_host=instance.ssh_host,
            ssh_port=instance.ssh_port,
            ssh_user=instance.ssh_user,
            remote_root=box.root,
        )


def setup(remote: Any, say: Say) -> Box:
    box = locate(remote)
    wheel = build_wheel()
    say(f"installing {wheel.name} on {remote.label} ({box.root})")
    installed = install(box, wheel)
    say(f"{remote.label} runs {installed.version}")
    say(f"{remote.label} uses {installed.runtime}")
    return box


def new_run_name(job: Job) -> str:
    return f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass
class BoxPlan:
    """What one box of a run gets: its workers, their GPUs, and how they reach the study."""

    first_index: int = 0  # global index of its first worker (index 0 is the primary)
    workers: int = 1
    gpus: list[str] | None = None  # CUDA_VISIBLE_DEVICES per worker
    env: dict[str, str] | None = None  # goes into the run's 0600 env file
    shared_study: bool = False  # the study is in Postgres, created by the controller
    study_file: Path | None = None  # a backed-up SQLite study to continue
    extra_files: dict[str, Path] | None = None  # name in the run folder -> local file
    terms: BoxTerms | None = None  # budget and self-stop; the box's guardian enforces them


def box_terms(
    provider: Provider,
    ledger: Ledger,
    instance_ids: list[str],
    instance_id: str,
    billing: Billing,
    since: float | None = None,
    head_storage: bool = False,
) -> BoxTerms | None:
    """The terms one box of a run gets: the run's whole $/h (every box of it) and when its
    meter starts (the submit, or the first create of a launch), and how this box stops itself.
    None for a machine abfleet does not rent."""
    if not provider.billable:
        return None
    records = [r for r in (ledger.instance(provider.name, i) for i in instance_ids) if r]
    guard = settings().guardian
    first = instance_id == instance_ids[0]
    return BoxTerms(
        instance_id=instance_id,
        rate_per_hour=sum(r.price_per_hour or 0.0 for r in records),
        storage_per_hour=sum(r.storage_per_hour or 0.0 for r in records),
        billing_since=since or min((r.created_at for r in records), default=time.time()),
        budget_usd=billing.budget_usd,
        stop_after_s=billing.stop_after_s,
        then_destroy=billing.then_destroy,
        requests=provider.self_stop_requests(instance_id),
        holds_results=first,
        peers_wait_s=guard.peers_wait_s if head_storage and first and len(instance_ids) > 1 else 0,
        guard={k: v for k, v in guard.model_dump().items() if k != "peers_wait_s"},
    )


def submit(
    provider: Provider,
    instance_id: str,
    box: Box,
    lp: LaunchPlan,
    run: str,
    ledger: Ledger,
    say: Say,
    workers: int = 1,
    study_file: Path | None = None,
) -> RunRecord:
    """One box, one run: send the job and start its worker(s); record the run."""
    from abfleet.core.pipeline import create_shared_study

    job = lp.job
    # A reused box's budget counts from this submit, not from the box's first create.
    terms = box_terms(provider, ledger, [instance_id], instance_id, lp.billing, since=time.time())
    bp = BoxPlan(workers=workers, study_file=study_file, terms=terms)
    storage = job.spec.search.storage
    if storage == HEAD_STORAGE:
        raise UserError(
            "--storage head starts Postgres while renting boxes: use `abfleet launch --storage head`"
        )
    if storage:
        # A study elsewhere: created here first, its URL (and password) only in the env file.
        url = resolve_shared(storage)
        create_shared_study(job, url, prompts=lp.prompts)
        bp = BoxPlan(
            workers=workers,
            study_file=study_file,
            shared_study=True,
            env={"ABFLEET_STORAGE_URL": url},
            terms=terms,
        )
    submit_box(box, lp, run, say, bp)
    return record_run(
        ledger, provider.name, [instance_id], box.run_dir(run), job, run, workers, lp.billing
    )


def submit_box(box: Box, lp: LaunchPlan, run: str, say: Say, bp: BoxPlan) -> list[int]:
    """Send the job (and a local model) to the box and start its workers.

    A copy of the job stays in the local run folder (for `abfleet resume`). Secrets (HF token,
    the study's URL with its password) go only into the run's mode-0600 env file.
    """
    job, plan, source = lp.job, lp.sizing, lp.source
    run_dir = box.run_dir(run)
    free = check_disk(box, plan.free_disk_gb)
    say(f"{box.remote.label}: {free:.0f} GB free, the job needs {plan.free_disk_gb:.0f} GB")
    model_spec = job.spec.model
    if source.is_local:
        local = Path(source.location)
        say(f"uploading the model from {local}")
        sent = upload_tree(box.remote, local, f"{run_dir}/model-src")
        say(f"uploaded {sent / 1e6:.1f} MB")
        model_spec = f"{run_dir}/model-src" + (f"/{source.gguf_file}" if source.gguf_file else "")
    staging = Path(tempfile.mkdtemp(prefix="abfleet-job-"))
    try:
        bundle(job, staging, model=model_spec)
        overrides: dict[str, Any] = {}
        if plan.reset_copy == "cpu":
            overrides["model_options.reset_copy"] = "cpu"
        judge = judge_source(job.spec.evaluation.judge)
        if judge is not None and judge.is_local:
            say(f"uploading the judge from {judge.location}")
            upload_tree(box.remote, Path(judge.location), f"{run_dir}/judge-src")
            gguf = f"/{judge.gguf_file}" if judge.gguf_file else ""
            overrides["evaluation.judge"] = f"{run_dir}/judge-src{gguf}"
        if bp.shared_study:
            overrides["search.storage"] = ENV_STORAGE
        _patch_toml(staging / "job.toml", overrides)
        for name, path in (bp.extra_files or {}).items():
            shutil.copyfile(path, staging / name)
        upload_tree(box.remote, staging, run_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if bp.study_file is not None:
        box.remote.put(bp.study_file, f"{run_dir}/study.db")
    bundle(job, local_run_dir(run) / "job", model=job.spec.model)
    terms_env = bp.terms.to_env() if bp.terms else {}
    token_for = hub_token_reason(job, exports=bp.first_index == 0)
    if token_for:
        say(f"HF_TOKEN goes to {box.remote.label} for {token_for} (removed once the run is over)")
    write_env(box, run_dir, {**secret_env(token_for), **(bp.env or {}), **terms_env})
    pids = []
    for i in range(bp.workers):
        index = bp.first_index + i
        gpu = bp.gpus[i] if bp.gpus and i < len(bp.gpus) else ""
        args = (
            *(("--secondary",) if index > 0 else ()),
            *(("--no-create",) if bp.shared_study else ()),
        )
        pids.append(start_worker(box, run_dir, index, gpu, args))
    if bp.terms is not None:
        run_script(box.remote, "start-guardian.sh", box.root, timeout=60)
    say(
        f"worker(s) {bp.first_index}..{bp.first_index + bp.workers - 1} started on {box.remote.label}: pid {', '.join(map(str, pids))}"
    )
    return pids


def record_run(
    ledger: Ledger,
    provider_name: str,
    instance_ids: list[str],
    remote_dir: str,
    job: Job,
    run: str,
    workers: int,
    billing: Billing | None = None,
) -> RunRecord:
    billing = billing or Billing()
    local = local_run_dir(run)
    local.mkdir(parents=True, exist_ok=True)
    record = RunRecord(
        name=run,
        job=job.name,
        model=job.spec.model,
        provider=provider_name,
        instance_id=instance_ids[0],
        remote_dir=remote_dir,
        local_dir=str(local),
        workers=workers,
        created_at=time.time(),
        downloaded_at=None,
        verified=False,
        last_backup_at=None,
        state="submitted",
        instances=instance_ids,
        stop_after_s=billing.stop_after_s,
        then_destroy=billing.then_destroy,
        budget_usd=billing.budget_usd or None,
        max_pause_s=billing.max_pause_s or None,
    )
    ledger.add_run(record)
    return record


def gpu_groups(workers: int, gpus_per_worker: int, gpus_on_box: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each worker: consecutive groups of gpus_per_worker GPUs."""
    if gpus_on_box <= 0:
        return [""] * workers
    if workers * gpus_per_worker > gpus_on_box:
        raise UserError(
            f"{workers} workers x {gpus_per_worker} GPU(s) do not fit the box's {gpus_on_box} GPU(s)"
        )
    return [
        ",".join(str(g) for g in range(i * gpus_per_worker, (i + 1) * gpus_per_worker))
        for i in range(workers)
    ]


def _patch_toml(job_toml: Path, dotted: dict[str, Any]) -> None:
    import tomli_w

    from abfleet.job.spec import tomllib

    if not dotted:
        return
    data = tomllib.loads(job_toml.read_text(encoding="utf-8"))
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    job_toml.write_text(tomli_w.dumps(data), encoding="utf-8")
