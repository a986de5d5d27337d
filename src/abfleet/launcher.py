"""From a job to a worker running on a box: size, offer, confirm, create, wait, ship, submit.

Each step is also a command of its own (create, setup, submit); `launch` chains them. The
launcher only knows the Provider interface, never which provider it has.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abfleet.deploy import (
    Box,
    build_wheel,
    check_disk,
    install,
    locate,
    secret_env,
    start_worker,
    upload_tree,
    write_env,
)
from abfleet.errors import (
    AbfleetError,
    Declined,
    ProviderError,
    RemoteError,
    SshAuthError,
    UserError,
)
from abfleet.jobs import ENV_STORAGE, HEAD_STORAGE, Job, bundle, load_job
from abfleet.ledger import InstanceRecord, Ledger, RunRecord
from abfleet.paths import data_dir
from abfleet.providers.base import FAILED, GONE, CreateSpec, Instance, Offer, Provider, Requirements
from abfleet.resources import resource_path
from abfleet.settings import settings
from abfleet.sizing import Plan, plan_for
from abfleet.storage_url import is_sqlite, resolve_shared

Say = Callable[[str], None]
Confirm = Callable[[str], bool]

UNRESOLVED_CREATE_S = 600  # a "creating" ledger row older than this with no instance is a failure


@dataclass
class Prepared:
    job: Job
    plan: Plan


def prepare(job_arg: str | None, flags: dict[str, Any]) -> Prepared:
    from abfleet.localrun import validate_inputs

    job = load_job(job_arg, flags)
    if job.spec.search.storage.startswith("sqlite"):
        raise UserError(
            "a cloud run keeps its SQLite study on the box: leave storage empty, or give a Postgres URL"
        )
    validate_inputs(job)
    plan = plan_for(
        job.spec.model,
        str(job.source) if job.source else None,
        job.spec.model_options.batch_size or None,
    )
    return Prepared(job, plan)


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


def choose_offer(provider: Provider, req: Requirements) -> Offer:
    return provider.offers(req)[0]


def describe_offer(offer: Offer, req: Requirements, plan: Plan, n_trials: int) -> list[str]:
    lines = [f"provider {offer.provider}, offer {offer.id}"]
    if offer.provider == "vast":
        where = f", {offer.location}" if offer.location else ""
        rel = f", reliability {offer.reliability:.3f}" if offer.reliability is not None else ""
        lines.append(
            f"{offer.gpu_count}x {offer.gpu_name} ({offer.gpu_memory_gb:.0f} GB each), machine {offer.machine_id}{where}{rel}"
        )
        hours = plan.hours_for(n_trials)
        cost = (
            f"about {hours * offer.price_per_hour:.2f} $ for an estimated {hours:.1f} h"
            if hours
            else "time unknown"
        )
        lines.append(
            f"disk {req.disk_gb} GB, {offer.price_per_hour:.3f} $/h ({n_trials} trials: {cost})"
        )
    return lines


def confirm_or_refuse(what: str, lines: list[str], yes: bool, confirm: Confirm | None) -> None:
    """Billable and destructive actions need a yes; without a terminal, --yes is the only yes."""
    if yes:
        return
    if confirm is None:
        raise Declined(
            f"refusing to {what} without confirmation: there is no terminal to ask on; pass --yes"
        )
    if not confirm(f"{what}?"):
        raise Declined(f"did not {what}: nothing was changed")


# ---------------------------------------------------------------------------------------------
# Create and wait


def reconcile_pending(provider: Provider, ledger: Ledger, say: Say) -> None:
    """Settle ledger rows whose create never got an answer before creating anything new."""
    pending = [
        r for r in ledger.instances() if r.provider == provider.name and r.state == "creating"
    ]
    if not pending:
        return
    live = {i.label: i for i in provider.list()}
    for row in pending:
        if row.label in live:
            inst = live[row.label]
            ledger.finish_create(row.key, inst.id)
            say(
                f"found instance {inst.id} of an earlier, interrupted create ({row.label}); it is in the ledger now"
            )
        elif time.time() - row.created_at > UNRESOLVED_CREATE_S:
            ledger.fail_create(row.key, "no instance with this label exists")
        else:
            raise AbfleetError(
                f"an earlier create ({row.label}) is still unresolved: wait a minute and run `abfleet list`, "
                "so that no second instance is created while the first may be booting"
            )


def create(
    provider: Provider, ledger: Ledger, offer: Offer, spec: CreateSpec, run: str | None
) -> Instance:
    """Billable: the ledger row is written before the provider is asked. Owned machines have
    nothing to create, so one already in the ledger is simply reused."""
    if not provider.billable:
        found = provider.create(offer, spec)
        existing = ledger.instance(provider.name, found.id)
        if existing is not None and existing.state == "active":
            return found
    offer_data = {
        "id": offer.id,
        "gpu_name": offer.gpu_name,
        "gpu_count": offer.gpu_count,
        "price_per_hour": offer.price_per_hour,
        "disk_gb": spec.disk_gb,
        "machine_id": offer.machine_id,
    }
    key = ledger.begin_create(provider.name, spec.label, run, offer_data)
    try:
        instance = provider.create(offer, spec)
    except BaseException as exc:
        ledger.update(key, note=f"create raised {type(exc).__name__}: {str(exc)[:200]}")
        raise
    ledger.finish_create(
        key,
        instance.id,
        ssh_host=instance.ssh_host,
        ssh_port=instance.ssh_port,
        ssh_user=instance.ssh_user,
    )
    return instance


class BootFailed(ProviderError):
    def __init__(self, instance: Instance) -> None:
        super().__init__(
            f"instance {instance.id} failed to boot ({instance.raw_state}: {instance.status_msg or 'no message'})"
        )
        self.instance = instance


def wait_ready(
    provider: Provider, instance_id: str, say: Say, timeout: float | None = None
) -> tuple[Instance, Any]:
    """Poll until the instance runs and SSH answers; fail fast on an error state."""
    cfg = settings().vast
    deadline = time.monotonic() + (timeout or cfg.boot_timeout_s)
    last = ""
    while True:
        inst = provider.get(instance_id)
        if inst is None or inst.state == GONE:
            raise ProviderError(f"instance {instance_id} disappeared while booting")
        if inst.state == FAILED:
            raise BootFailed(inst)
        status = f"{inst.raw_state}{': ' + inst.status_msg if inst.status_msg else ''}"
        if status != last:
            say(f"instance {instance_id}: {status}")
            last = status
        # A machine the user already has (ssh, local) is used as it is: nothing to wait for.
        if inst.ssh_ready or not provider.billable:
            try:
                return inst, provider.connect(inst)
            except SshAuthError:
                raise
            except RemoteError as exc:
                # sshd often refuses for a minute after a rented container reports running; a
                # machine the user already has is not booting, so its answer is final.
                if not provider.billable:
                    raise
                if time.monotonic() > deadline:
                    raise ProviderError(
                        f"instance {instance_id} runs but SSH never answered: {exc}"
                    ) from exc
        if time.monotonic() > deadline:
            raise ProviderError(
                f"instance {instance_id} was not ready after {timeout or cfg.boot_timeout_s:.0f} s ({status})"
            )
        time.sleep(cfg.poll_s if provider.name == "vast" else 1)


def destroy_and_confirm(
    provider: Provider, ledger: Ledger, instance_id: str, timeout: float = 120
) -> None:
    """Destroy, then see it gone: a replacement is only created once this one cannot bill."""
    provider.destroy(instance_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inst = provider.get(instance_id)
        if inst is None or inst.state == GONE:
            ledger.mark_destroyed(provider.name, instance_id)
            return
        time.sleep(2)
    raise ProviderError(
        f"instance {instance_id} was destroyed but still shows up: check `abfleet list` before retrying"
    )


def create_and_wait(
    provider: Provider,
    ledger: Ledger,
    plan: Plan,
    req: Requirements,
    run: str,
    n_trials: int,
    yes: bool,
    confirm: Confirm | None,
    say: Say,
    ports: tuple[int, ...] = (),
) -> tuple[Instance, Any]:
    """One instance: create_fleet of one."""
    return create_fleet(provider, ledger, plan, req, run, n_trials, yes, confirm, say, 1, ports)[0]


def create_fleet(
    provider: Provider,
    ledger: Ledger,
    plan: Plan,
    req: Requirements,
    run: str,
    n_trials: int,
    yes: bool,
    confirm: Confirm | None,
    say: Say,
    count: int = 1,
    head_ports: tuple[int, ...] = (),
) -> list[tuple[Instance, Any]]:
    """Create `count` instances on distinct machines after one confirmation, then wait for each.

    Every create is in the ledger before the provider answers; a box that fails to boot is
    destroyed, confirmed gone, and replaced once on a machine not used yet. head_ports are
    exposed on the first instance (Postgres for a shared study).
    """
    reconcile_pending(provider, ledger, say)
    offers = _distinct_machines(provider.offers(req), count)
    if len(offers) < count:
        raise ProviderError(
            f"only {len(offers)} machine(s) offer this; {count} instances were asked for"
        )
    if provider.billable:
        lines = []
        for offer in offers:
            lines += describe_offer(offer, req, plan, n_trials)
        if count > 1:
            rate = sum(o.price_per_hour for o in offers)
            hours = plan.hours_for(max(1, n_trials // count))
            lines.append(
                f"{count} instances: {rate:.3f} $/h together"
                + (f", about {rate * hours:.2f} $ in all" if hours else "")
            )
        for line in lines:
            say(line)
        what = f"{offers[0].gpu_count}x {offers[0].gpu_name} instance at {offers[0].price_per_hour:.3f} $/h"
        if count > 1:
            what = f"{count} instances at {sum(o.price_per_hour for o in offers):.3f} $/h together"
        confirm_or_refuse(
            f"create this {what}" if count == 1 else f"create these {what}", lines, yes, confirm
        )
    used = {o.machine_id for o in offers if o.machine_id is not None}
    created: list[tuple[Instance, CreateSpec]] = []
    for i, offer in enumerate(offers):
        spec = _spec(run, req, i, count, head_ports if i == 0 else ())
        instance = create(provider, ledger, offer, spec, run)
        say(f"created instance {instance.id} ({spec.label}); waiting for it to boot")
        created.append((instance, spec))
    ready = []
    for instance, spec in created:
        try:
            ready.append(wait_ready(provider, instance.id, say))
            continue
        except BootFailed as exc:
            say(f"{exc}; destroying it")
            destroy_and_confirm(provider, ledger, instance.id)
            if exc.instance.machine_id:
                used.add(exc.instance.machine_id)
        retry = Requirements(
            req.gpu_name,
            req.gpu_count,
            req.gpu_memory_gb,
            req.disk_gb,
            req.max_price,
            tuple(sorted(used)),
        )
        offer = choose_offer(provider, retry)
        say(f"trying another machine once: offer {offer.id} at {offer.price_per_hour:.3f} $/h")
        replacement = create(provider, ledger, offer, spec, run)
        ready.append(wait_ready(provider, replacement.id, say))
    return ready


def _distinct_machines(offers: list[Offer], count: int) -> list[Offer]:
    seen: set[int | None] = set()
    out = []
    for offer in offers:
        if offer.machine_id is not None and offer.machine_id in seen:
            continue
        seen.add(offer.machine_id)
        out.append(offer)
        if len(out) == count:
            break
    return out


def _spec(
    run: str, req: Requirements, index: int, count: int, ports: tuple[int, ...]
) -> CreateSpec:
    cfg = settings().vast
    return CreateSpec(
        label=f"abfleet:{run}" + (f"#{index}" if count > 1 else ""),
        image=cfg.image,
        disk_gb=req.disk_gb,
        onstart=(resource_path("infra") / "onstart.sh").read_text(encoding="utf-8"),
        env={"ABFLEET_RUN": run},
        ports=ports,
    )


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


# ---------------------------------------------------------------------------------------------
# Submit


def new_run_name(job: Job) -> str:
    return f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def launch(
    job_arg: str | None,
    flags: dict[str, Any],
    provider_name: str,
    host: str | None,
    yes: bool,
    max_price: float | None,
    disk_gb: int | None,
    workers: int,
    instances: int,
    resume: bool,
    confirm: Confirm | None,
    say: Say,
    show_plan: Callable[[Plan], None] | None = None,
) -> RunRecord:
    """Size, rent (or register), set up and start a job on one or several boxes."""
    from abfleet import headdb
    from abfleet.core.pipeline import create_shared_study
    from abfleet.providers import get_provider

    if workers < 1 or instances < 1:
        raise UserError("--workers and --instances must be at least 1")
    prepared = prepare(job_arg, flags)
    job, plan = prepared.job, prepared.plan
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
        create_shared_study(
            job, storage, resume
        )  # unreachable or wrong password: fails here, unpaid
    provider = get_provider(provider_name, host)
    if instances > 1 and not provider.billable:
        raise UserError(
            "--instances is for rented boxes (--provider vast); give a Postgres URL to share a study with your own machines"
        )
    ledger = Ledger()
    req = requirements(plan, disk_gb, max_price, workers=workers)
    run = new_run_name(job)
    pg_port = settings().vast.postgres_port
    fleet = create_fleet(
        provider,
        ledger,
        plan,
        req,
        run,
        job.spec.search.n_trials,
        yes,
        confirm,
        say,
        instances,
        (pg_port,) if head else (),
    )
    try:
        boxes = []
        for instance, remote in fleet:
            box = setup(remote, say)
            register(provider, ledger, instance, box)
            boxes.append(box)
        envs: list[dict[str, str]] = [{} for _ in fleet]
        files: dict[str, Path] = {}
        if head:
            db = headdb.start(boxes[0], fleet[0][0], pg_port, local_run_dir(run), say)
            create_shared_study(job, db.url_for_controller(), resume)
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
        for i, ((instance, _), box) in enumerate(zip(fleet, boxes, strict=True)):
            gpus = gpu_groups(workers, plan.gpu_count, instance.gpu_count)
            bp = BoxPlan(
                first_index=i * workers,
                workers=workers,
                gpus=gpus,
                env=envs[i],
                shared_study=bool(storage),
                extra_files=files,
            )
            submit_box(box, job, plan, run, say, bp)
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
    )


def local_run_dir(run: str) -> Path:
    return data_dir() / "runs" / run


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


def submit(
    provider_name: str,
    instance_id: str,
    box: Box,
    job: Job,
    plan: Plan,
    run: str,
    ledger: Ledger,
    say: Say,
    workers: int = 1,
    study_file: Path | None = None,
) -> RunRecord:
    """One box, one run: send the job and start its worker(s); record the run."""
    from abfleet.core.pipeline import create_shared_study

    bp = BoxPlan(workers=workers, study_file=study_file)
    storage = job.spec.search.storage
    if storage == HEAD_STORAGE:
        raise UserError(
            "--storage head starts Postgres while renting boxes: use `abfleet launch --storage head`"
        )
    if storage:
        # A study elsewhere: created here first, its URL (and password) only in the env file.
        url = resolve_shared(storage)
        create_shared_study(job, url)
        bp = BoxPlan(
            workers=workers,
            study_file=study_file,
            shared_study=True,
            env={"ABFLEET_STORAGE_URL": url},
        )
    submit_box(box, job, plan, run, say, bp)
    return record_run(ledger, provider_name, [instance_id], box.run_dir(run), job, run, workers)


def submit_box(box: Box, job: Job, plan: Plan, run: str, say: Say, bp: BoxPlan) -> list[int]:
    """Send the job (and a local model) to the box and start its workers.

    A copy of the job stays in the local run folder (for `abfleet resume`). Secrets (HF token,
    the study's URL with its password) go only into the run's mode-0600 env file.
    """
    from abfleet.core.source import materialize, resolve_source

    run_dir = box.run_dir(run)
    free = check_disk(box, plan.free_disk_gb)
    say(f"{box.remote.label}: {free:.0f} GB free, the job needs {plan.free_disk_gb:.0f} GB")
    source = materialize(resolve_source(job.spec.model))
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
    write_env(box, run_dir, {**secret_env(), **(bp.env or {})})
    pids = []
    for i in range(bp.workers):
        index = bp.first_index + i
        gpu = bp.gpus[i] if bp.gpus and i < len(bp.gpus) else ""
        args = (
            *(("--secondary",) if index > 0 else ()),
            *(("--no-create",) if bp.shared_study else ()),
        )
        pids.append(start_worker(box, run_dir, index, gpu, args))
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
) -> RunRecord:
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

    from abfleet.jobs import tomllib

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


# ---------------------------------------------------------------------------------------------
# Which instance a command means


def resolve_instance(
    ledger: Ledger,
    given: str | None,
    choose: Callable[[list[InstanceRecord]], InstanceRecord] | None,
) -> InstanceRecord:
    """An explicit id, or the only instance; with several, ask (or fail without a terminal).

    Never "the first one": commands that guessed acted on a stopped or wrong instance.
    """
    active = [r for r in ledger.instances() if r.instance_id]
    if given:
        matches = [r for r in active if r.instance_id == given]
        if not matches:
            gone = [r for r in ledger.find(given)]
            if gone:
                raise UserError(
                    f"instance {given} was {gone[-1].state} on {time.strftime('%Y-%m-%d %H:%M', time.localtime(gone[-1].destroyed_at or gone[-1].created_at))}"
                )
            raise UserError(
                f"unknown instance {given}: it is not one abfleet created (see `abfleet list`)"
            )
        if len(matches) > 1:
            raise UserError(
                f"instance id {given} is ambiguous across providers: {', '.join(r.provider for r in matches)}"
            )
        return matches[0]
    if not active:
        raise UserError("no instances: create one with `abfleet launch` or `abfleet create`")
    if len(active) == 1:
        return active[0]
    ids = ", ".join(f"{r.instance_id} ({r.label})" for r in active)
    if choose is None:
        raise UserError(f"several instances ({ids}): name the one you mean")
    return choose(active)


def connect_record(record: InstanceRecord, timeout: float | None = None) -> Any:
    from abfleet.remote import open_remote

    return open_remote(record, record.provider, timeout=timeout)
