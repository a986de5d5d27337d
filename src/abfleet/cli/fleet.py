"""Commands that size, rent, set up and feed boxes: size, offers, launch, create, setup, submit,
list, start, stop, destroy, attach-key."""

from __future__ import annotations

import json
import time
from typing import Any

import click
from rich.table import Table

from abfleet.cli.options import job_flags, pop_job_flags
from abfleet.console import console, is_interactive, setup_logging
from abfleet.errors import AbfleetError, UserError
from abfleet.fleet.instances import resolve_instance
from abfleet.fleet.launch import launch
from abfleet.fleet.ledger import InstanceRecord, Ledger
from abfleet.fleet.plan import Billing, LaunchOptions, parse_duration, prepare, requirements
from abfleet.fleet.providers import NAMES, connect_record, get_provider
from abfleet.fleet.providers.base import Bid
from abfleet.fleet.rent import Rental, create_and_wait
from abfleet.fleet.submit import new_run_name, setup, submit
from abfleet.render import fmt_duration, fmt_usd, quantization_table, sizing_table


def say(message: str) -> None:
    console.print(message)


def confirm_fn() -> Any:
    if not is_interactive():
        return None
    return lambda question: click.confirm(question, default=False)


def choose_fn() -> Any:
    if not is_interactive():
        return None

    def choose(records: list[InstanceRecord]) -> InstanceRecord:
        for i, r in enumerate(records, 1):
            console.print(
                f"  {i}. {r.instance_id}  {r.label}  {r.gpu_count or ''}x {r.gpu_name or ''}  ({r.provider})"
            )
        picked = click.prompt("which instance", type=click.IntRange(1, len(records)))
        return records[picked - 1]

    return choose


def render_sizing(plan: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=1))
        return
    console.print(sizing_table(plan))
    console.print(quantization_table(plan))
    if plan.est_seconds_per_trial:
        console.print(
            f"estimated {plan.est_seconds_per_trial:.0f} s per trial (rough; the live ETA replaces it)"
        )


provider_option = click.option(
    "--provider", type=click.Choice(NAMES), default="vast", show_default=True, help="Where to run."
)
host_option = click.option("--host", help="For --provider ssh: user@host[:port] of your machine.")
yes_option = click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
keep_option = click.option(
    "--keep-on-failure",
    is_flag=True,
    help="If a step after the create fails, keep the instance (it bills) instead of destroying it.",
)
gpu_option = click.option(
    "--gpu",
    help="GPU type to rent instead of the sizer's pick, as TYPE or TYPExN (e.g. A100_SXM4x2); "
    "refused if it cannot hold the model.",
)


def billing_options(func: Any) -> Any:
    """--stop-after, --then-destroy, --budget: what a rented box does about money by itself."""
    for option in reversed(
        (
            click.option(
                "--stop-after",
                default="30m",
                show_default=True,
                help="Once its work is over (or failed), the box stops itself after this long "
                "(e.g. 90s, 30m, 2h; 0: never). A stopped box bills only its disk.",
            ),
            click.option(
                "--then-destroy",
                "then_destroy",
                is_flag=True,
                help="Destroy the boxes, not just stop them, once the model is delivered "
                "(downloaded and verified, or pushed and verified).",
            ),
            click.option(
                "--budget",
                type=float,
                help="Most dollars this run may spend, counted from this command: refused up "
                "front if the estimate is higher; on the box, the search ends, the best trial is "
                "exported and the box stops, grace period or not.",
            ),
        )
    ):
        func = option(func)
    return func


def billing_from(
    stop_after: str, then_destroy: bool, budget: float | None, max_pause: str = "0"
) -> Billing:
    return Billing(
        parse_duration(stop_after),
        then_destroy,
        budget or 0.0,
        parse_duration(max_pause, "--max-pause"),
    )


def bid_options(func: Any) -> Any:
    """--interruptible, --bid, --bid-margin: rent at a bid (about half the price; can pause)."""
    for option in reversed(
        (
            click.option(
                "--interruptible",
                is_flag=True,
                help="Rent interruptible (a bid, often about half the on-demand price). Outbid, "
                "the box pauses: it bills only its disk and the run waits, then goes on where "
                "it was when the bid wins again.",
            ),
            click.option(
                "--bid",
                type=float,
                help="With --interruptible: your bid in $/h for the machine (its disk is billed "
                "on top); default: the offer's minimum bid plus --bid-margin.",
            ),
            click.option(
                "--bid-margin",
                type=float,
                default=10.0,
                show_default=True,
                help="With --interruptible and no --bid: percent above the offer's minimum bid "
                "(a higher bid is outbid less often).",
            ),
        )
    ):
        func = option(func)
    return func


def bid_from(interruptible: bool, bid: float | None, margin: float) -> Bid | None:
    if not interruptible:
        if bid is not None:
            raise UserError("--bid rents interruptible: add --interruptible (or drop --bid)")
        return None
    if bid is not None and bid <= 0:
        raise UserError(f"--bid {bid:g} is not a price: give $/h above 0")
    if margin < 0:
        raise UserError(f"--bid-margin {margin:g} is negative: give a percent, 0 or more")
    return Bid(bid, margin / 100)


@click.command("offers")
@click.argument("model")
@click.option("--job", "job_arg", help="Job to size for (batch size, trials).")
@click.option("--max-price", type=float, help="Highest $/h to show.")
@click.option("--disk", "disk_gb", type=int, help="Disk in GB (default: from sizing).")
@click.option("--json", "as_json", is_flag=True)
@gpu_option
@bid_options
def offers_cmd(
    model: str,
    job_arg: str | None,
    max_price: float | None,
    disk_gb: int | None,
    as_json: bool,
    gpu: str | None,
    interruptible: bool,
    bid: float | None,
    bid_margin: float,
) -> None:
    """Vast.ai offers that fit MODEL, cheapest first (--interruptible: at a bid)."""
    from abfleet.fleet.rent import priced
    from abfleet.fleet.sizing import plan_for, with_gpu

    plan = plan_for(model, job_arg)
    plan = with_gpu(plan, gpu) if gpu else plan
    req = requirements(plan, disk_gb, max_price, bid=bid_from(interruptible, bid, bid_margin))
    offers = get_provider("vast").offers(req)
    if req.bid is not None:
        offers = [priced(o, req) for o in offers]
    if as_json:
        click.echo(json.dumps([o.__dict__ for o in offers], indent=1))
        return
    kind = "interruptible " if req.bid is not None else ""
    table = Table(
        title=f"{kind.capitalize()}Offers for {plan.gpu_count}x {plan.gpu}, disk >= {req.disk_gb} GB"
    )
    cols = ["offer", "GPU", "$/h"]
    if req.bid is not None:
        # Running at the bid (with the disk), the bid itself, the same machine on demand, and
        # what a paused box bills.
        cols = ["offer", "GPU", "$/h at bid", "bid", "min bid", "on demand", "paused (disk)"]
    for col in (*cols, "disk GB", "reliability", "Mbps down", "machine", "where"):
        table.add_column(col)
    for o in offers[:20]:
        prices = [f"{o.price_per_hour:.3f}"]
        if o.bid is not None:
            prices += [
                f"{o.bid:.4f}",
                f"{o.min_bid:.4f}" if o.min_bid is not None else "-",
                f"{o.on_demand_per_hour:.3f}" if o.on_demand_per_hour else "-",
                f"{o.storage_per_hour:.3f}" if o.storage_per_hour is not None else "-",
            ]
        table.add_row(
            o.id,
            f"{o.gpu_count}x {o.gpu_name}",
            *prices,
            f"{o.disk_gb:.0f}",
            f"{o.reliability:.3f}" if o.reliability else "-",
            f"{o.inet_down_mbps:.0f}" if o.inet_down_mbps else "-",
            str(o.machine_id or "-"),
            o.location,
        )
    console.print(table)
    for reason in plan.reasons:  # a GPU without bf16: what it runs in, and at what speed
        if reason.startswith(("dtype:", "speed:")):
            console.print(f"note: {reason}")


@click.command("launch")
@click.argument("job", required=False)
@job_flags
@provider_option
@host_option
@yes_option
@click.option("--max-price", type=float, help="Highest $/h to rent at.")
@click.option("--disk", "disk_gb", type=int, help="Disk in GB (never below what sizing says).")
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Workers per box (each gets the GPUs one model needs).",
)
@click.option(
    "--instances",
    type=int,
    default=1,
    show_default=True,
    help="Boxes sharing one study (needs --storage head or a Postgres URL).",
)
@click.option(
    "--resume", is_flag=True, help="Continue a shared study made by a different job spec."
)
@keep_option
@gpu_option
@billing_options
@bid_options
@click.option(
    "--max-pause",
    default="0",
    show_default=True,
    help="With --interruptible: outbid longer than this (e.g. 20m), the run moves to another "
    "offer (never above the $/h you confirm here) from its latest backup, and the paused box is "
    "destroyed once the new one runs. `abfleet watch` does it: leave it running. 0: wait.",
)
@click.pass_context
def launch_cmd(
    ctx: click.Context,
    job: str | None,
    provider: str,
    host: str | None,
    yes: bool,
    max_price: float | None,
    disk_gb: int | None,
    workers: int,
    instances: int,
    resume: bool,
    keep_on_failure: bool,
    gpu: str | None,
    stop_after: str,
    then_destroy: bool,
    budget: float | None,
    interruptible: bool,
    bid: float | None,
    bid_margin: float,
    max_pause: str,
    **kwargs: Any,
) -> None:
    """Size, rent, set up and start JOB on a box (or several), in one go.

    Shows the GPU, disk, $/h and estimated cost, and asks before renting (--yes for scripts).
    """
    setup_logging(ctx.obj.get("verbose", False))
    opts = LaunchOptions(
        provider=provider,
        host=host,
        yes=yes,
        max_price=max_price,
        disk_gb=disk_gb,
        workers=workers,
        instances=instances,
        resume=resume,
        keep_on_failure=keep_on_failure,
        gpu=gpu,
        billing=billing_from(stop_after, then_destroy, budget, max_pause),
        bid=bid_from(interruptible, bid, bid_margin),
    )
    record = launch(
        job,
        pop_job_flags(kwargs),
        opts,
        confirm_fn(),
        say,
        show_plan=lambda plan: render_sizing(plan, False),
    )
    first = record.instances[0]
    where = (
        f"instance {first}"
        if len(record.instances) == 1
        else f"instances {', '.join(record.instances)}"
    )
    console.print(
        f"[bold green]launched[/] run {record.name} on {where}. "
        f"Follow it with `abfleet watch {first}` or `abfleet progress {first}`."
    )


@click.command("create")
@click.argument("model")
@click.option("--job", "job_arg", help="Job to size for (default: refusal).")
@provider_option
@host_option
@yes_option
@click.option("--max-price", type=float, help="Highest $/h to rent at.")
@click.option("--disk", "disk_gb", type=int, help="Disk in GB (never below what sizing says).")
@keep_option
@gpu_option
@bid_options
@click.pass_context
def create_cmd(
    ctx: click.Context,
    model: str,
    job_arg: str | None,
    provider: str,
    host: str | None,
    yes: bool,
    max_price: float | None,
    disk_gb: int | None,
    keep_on_failure: bool,
    gpu: str | None,
    interruptible: bool,
    bid: float | None,
    bid_margin: float,
) -> None:
    """Rent (or register) a box sized for MODEL and wait until SSH answers."""
    setup_logging(ctx.obj.get("verbose", False))
    prepared = prepare(job_arg, {"model": model}, gpu, say=say)
    render_sizing(prepared.sizing, False)
    prov = get_provider(provider, host)
    ledger = Ledger()
    req = requirements(
        prepared.sizing, disk_gb, max_price, bid=bid_from(interruptible, bid, bid_margin)
    )
    run = new_run_name(prepared.job)
    with Rental(prov, ledger, keep_on_failure) as rental:
        instance, remote = create_and_wait(
            prov,
            ledger,
            prepared.sizing,
            req,
            run,
            prepared.job.spec.search.n_trials,
            yes,
            confirm_fn(),
            say,
            rental,
        )
    remote.close()
    console.print(
        f"[bold green]ready[/]: instance {instance.id}; next `abfleet setup {instance.id}`"
    )


@click.command("setup")
@click.argument("instance", required=False)
@click.pass_context
def setup_cmd(ctx: click.Context, instance: str | None) -> None:
    """Ship this exact abfleet to INSTANCE and check its version there."""
    setup_logging(ctx.obj.get("verbose", False))
    ledger = Ledger()
    record = resolve_instance(ledger, instance, choose_fn())
    remote = connect_record(record)
    try:
        box = setup(remote, say)
        ledger.update(record.key, remote_root=box.root)
    finally:
        remote.close()


@click.command("submit")
@click.argument("instance", required=False)
@click.argument("job", required=False)
@job_flags
@click.option("--workers", type=int, default=1, show_default=True, help="Workers on the box.")
@billing_options
@click.pass_context
def submit_cmd(
    ctx: click.Context,
    instance: str | None,
    job: str | None,
    workers: int,
    stop_after: str,
    then_destroy: bool,
    budget: float | None,
    **kwargs: Any,
) -> None:
    """Send JOB to INSTANCE (set up with `abfleet setup`) and start its worker(s)."""
    from abfleet.fleet.deploy import Box

    setup_logging(ctx.obj.get("verbose", False))
    ledger = Ledger()
    record = resolve_instance(ledger, instance, choose_fn())
    prepared = prepare(
        job, pop_job_flags(kwargs), billing=billing_from(stop_after, then_destroy, budget), say=say
    )
    if not record.remote_root:
        raise UserError(
            f"instance {record.instance_id} is not set up yet: run `abfleet setup {record.instance_id}`"
        )
    remote = connect_record(record)
    try:
        box = Box(remote, record.remote_root)
        run = new_run_name(prepared.job)
        submit(
            get_provider(record.provider),
            record.instance_id or "",
            box,
            prepared,
            run,
            ledger,
            say,
            workers,
        )
    finally:
        remote.close()


@click.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "show_all", is_flag=True, help="Include destroyed instances.")
def list_cmd(as_json: bool, show_all: bool) -> None:
    """Every instance: the ledger merged with what the providers report."""
    from abfleet.fleet.inventory import inventory

    found = inventory(Ledger(), show_all)
    rows = found.rows
    if as_json:
        click.echo(json.dumps(rows, indent=1, default=str))
        _fail_if_blind(found.unseen)
        return
    table = Table(title="Instances")
    # An id is what the user types next: never cut it, whatever the terminal's width.
    table.add_column(
        "id", no_wrap=True, min_width=max((len(str(r["id"])) for r in rows), default=2)
    )
    for col in ("provider", "label", "GPU", "state", "$/h now", "spent", "up", "run", "note"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["provider"],
            r["label"],
            r["gpu"],
            r["state"],
            _rate_now(r),
            _spent(r),
            fmt_duration((r.get("ended_at") or time.time()) - r["started_at"])
            if r.get("started_at")
            else "-",
            r.get("run") or "-",
            r.get("note") or "",
        )
    console.print(table)
    billing = [r for r in rows if r.get("billing") in ("running", "stopped")]
    spent = sum(r.get("spent_usd") or 0 for r in rows)
    console.print(
        f"spent so far {fmt_usd(spent)}"
        + ("" if show_all else " (live instances; --all adds destroyed ones)")
        + f"; billing now {sum(r.get('rate_now') or 0 for r in billing):.3f} $/h"
        + f" ({sum(r['billing'] == 'running' for r in billing)} running,"
        + f" {sum(r['billing'] == 'stopped' for r in billing)} stopped: disk only)"
    )
    for r in rows:
        if r.get("note", "").startswith("NOT IN LEDGER"):
            console.print(
                f"[bold red]instance {r['id']} bills but abfleet did not create it[/] (or lost its record)"
            )
    _fail_if_blind(found.unseen)


def _rate_now(row: dict[str, Any]) -> str:
    rate = row.get("rate_now")
    if row.get("billing") == "ended":
        return "-"
    if rate is None:
        rate = row.get("price_per_hour")
    if not rate:
        return "-"
    return f"{rate:.3f}" + (" (disk)" if row.get("billing") == "stopped" else "")


def _spent(row: dict[str, Any]) -> str:
    if row.get("spent_usd") is None:
        return "?"
    return ("≤ " if row.get("spend_exact") is False else "") + fmt_usd(row["spent_usd"])


def _fail_if_blind(unseen: list[str]) -> None:
    """A list that could not ask a provider must not look complete: a box may bill unseen."""
    if unseen:
        raise AbfleetError("; ".join(unseen))


@click.command("attach-key")
@click.argument("instance", required=False)
@click.option(
    "--key",
    "key_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Public key file (default: ~/.ssh/id_ed25519.pub).",
)
def attach_key_cmd(instance: str | None, key_file: str | None) -> None:
    """Attach an SSH public key to a Vast.ai instance created before the key was on the account."""
    from pathlib import Path

    ledger = Ledger()
    record = resolve_instance(ledger, instance, choose_fn())
    path = Path(key_file) if key_file else Path.home() / ".ssh" / "id_ed25519.pub"
    if not path.is_file():
        raise UserError(f"{path} does not exist: pass --key PATH.pub")
    provider = get_provider(record.provider)
    provider.attach_key(record.instance_id or "", path.read_text().strip())
    console.print(f"attached {path.name} to instance {record.instance_id}")
