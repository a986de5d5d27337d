"""Renting: show the offer, ask, create (ledger first), wait for the boot, replace a box that
fails to boot once, and destroy what must go. Only the Provider interface is used here."""

from __future__ import annotations

import time
from typing import Any

from abfleet.errors import AbfleetError, Declined, ProviderError, RemoteError, SshAuthError
from abfleet.fleet.ledger import Ledger
from abfleet.fleet.plan import Confirm, Say
from abfleet.fleet.providers.base import (
    FAILED,
    GONE,
    CreateSpec,
    Instance,
    Offer,
    Provider,
    Requirements,
)
from abfleet.fleet.sizing import Plan
from abfleet.resources import resource_path
from abfleet.settings import settings

UNRESOLVED_CREATE_S = 600  # a "creating" ledger row older than this with no instance is a failure


def choose_offer(provider: Provider, req: Requirements) -> Offer:
    return provider.offers(req)[0]


def describe_offer(
    provider: Provider, offer: Offer, req: Requirements, plan: Plan, n_trials: int
) -> list[str]:
    lines = provider.describe_offer(offer)
    if provider.billable:
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
        time.sleep(provider.poll_s)


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
            lines += describe_offer(provider, offer, req, plan, n_trials)
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
