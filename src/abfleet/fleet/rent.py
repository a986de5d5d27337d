"""Renting: show the offer, ask, create (ledger first), wait for the boot, replace a box that
fails to boot once, and destroy what must go. Only the Provider interface is used here."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from abfleet.errors import (
    AbfleetError,
    CreateFailed,
    Declined,
    NoOffers,
    ProviderError,
    RemoteError,
    SshAuthError,
    UserError,
    reason,
)
from abfleet.fleet.ledger import InstanceRecord, Ledger
from abfleet.fleet.plan import Confirm, Say
from abfleet.fleet.providers.base import (
    FAILED,
    GONE,
    CreateSpec,
    Instance,
    Offer,
    Provider,
    Requirements,
    at_bid,
)
from abfleet.fleet.remote import public_keys
from abfleet.fleet.sizing import Plan
from abfleet.render import fmt_usd
from abfleet.resources import resource_path
from abfleet.settings import settings

# A "creating" row older than this whose label the provider does not list was never created.
log = logging.getLogger(__name__)

UNRESOLVED_CREATE_S = 30


class Rental:
    """The instances one command rents. If the command then fails (boot, SSH, setup, upload,
    submit, Ctrl-C), they are destroyed, unless the user chose to keep them; either way the
    error names each instance, its $/h and what was done, so nothing bills unseen."""

    def __init__(self, provider: Provider, ledger: Ledger, keep: bool = False) -> None:
        self.provider = provider
        self.ledger = ledger
        self.keep = keep
        self.rates: dict[str, float | None] = {}  # instance id -> $/h

    def add(self, instance_id: str, price_per_hour: float | None) -> None:
        if self.provider.billable:
            self.rates[instance_id] = price_per_hour

    def drop(self, instance_id: str) -> None:
        """Destroyed already (a box that failed to boot)."""
        self.rates.pop(instance_id, None)

    def __enter__(self) -> Rental:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not self.rates:
            return False
        cause = "interrupted" if isinstance(exc, KeyboardInterrupt) else reason(exc)
        if self.keep:
            notes = [
                f"instance {iid} is kept (--keep-on-failure) and bills {_rate(rate)}: "
                f"destroy it with `abfleet destroy {iid}`"
                for iid, rate in self.rates.items()
            ]
        else:
            notes = [self._destroy(iid, rate) for iid, rate in self.rates.items()]
        error = AbfleetError(f"{cause}; " + "; ".join(notes))
        error.exit_code = (
            130 if isinstance(exc, KeyboardInterrupt) else getattr(exc, "exit_code", 1)
        )
        raise error from exc

    def _destroy(self, instance_id: str, rate: float | None) -> str:
        try:
            destroy_and_confirm(self.provider, self.ledger, instance_id)
        except BaseException as exc:  # noqa: BLE001 - the user must hear of it, whatever it was
            return (
                f"instance {instance_id} ({_rate(rate)}) could NOT be destroyed ({reason(exc)}): "
                f"it still bills; destroy it with `abfleet destroy {instance_id}`"
            )
        return f"instance {instance_id} that this command created was destroyed; nothing bills"


def _rate(rate: float | None) -> str:
    return f"{rate:.3f} $/h" if rate is not None else "an unknown $/h"


def choose_offer(provider: Provider, req: Requirements) -> Offer:
    return provider.offers(req)[0]


def priced(offer: Offer, req: Requirements, on_demand: bool = False) -> Offer:
    """The offer as it will be rented: at the user's bid when interruptible was asked for."""
    if req.bid is None or on_demand:
        return offer  # price_per_hour is its on-demand price, from either search
    if offer.min_bid is not None and req.bid.usd is not None and req.bid.usd < offer.min_bid:
        raise UserError(
            f"--bid {req.bid.usd:g} $/h is below offer {offer.id}'s minimum bid "
            f"({offer.min_bid:g} $/h): it would never run; raise --bid, or leave it out to bid "
            "the minimum plus --bid-margin"
        )
    return at_bid(offer, req.bid)


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


def settle_pending(
    ledger: Ledger, provider_name: str, live: list[Instance]
) -> list[tuple[InstanceRecord, Instance | None]]:
    """Ledger rows whose create got no answer, settled by the provider's list of instances:
    adopted when an instance carries their label, failed when none does. Only a row younger
    than a few seconds (a create another command has in flight) stays open."""
    by_label = {i.label: i for i in live}
    settled = []
    for row in ledger.instances():
        if row.provider != provider_name or row.state != "creating":
            continue
        inst = by_label.get(row.label)
        if inst is not None:
            ledger.finish_create(row.key, inst.id)
        elif time.time() - row.created_at > UNRESOLVED_CREATE_S:
            ledger.fail_create(row.key, "the provider has no instance with this label")
        else:
            continue
        settled.append((row, inst))
    return settled


def reconcile_pending(provider: Provider, ledger: Ledger, say: Say) -> None:
    """Settle rows of earlier interrupted creates before creating anything new."""
    if not any(r.provider == provider.name and r.state == "creating" for r in ledger.instances()):
        return
    for row, inst in settle_pending(ledger, provider.name, provider.list()):
        if inst is not None:
            say(
                f"found instance {inst.id} of an earlier, interrupted create ({row.label}); it is in the ledger now"
            )


def create(
    provider: Provider,
    ledger: Ledger,
    offer: Offer,
    spec: CreateSpec,
    run: str | None,
    rental: Rental,
) -> Instance:
    """Billable: the ledger row is written before the provider is asked, and the instance
    joins the rental as soon as it exists. Owned machines have nothing to create, so one
    already in the ledger is simply reused."""
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
        "storage_per_hour": offer.storage_per_hour,
        # Interruptible: the bid it runs at (None: on demand), to show and to bid alike again.
        "bid": offer.bid,
        "min_bid": offer.min_bid,
        "on_demand_per_hour": offer.on_demand_per_hour,
    }
    key = ledger.begin_create(provider.name, spec.label, run, offer_data)
    try:
        instance = provider.create(offer, spec)
    except CreateFailed as exc:
        if exc.instance_id:
            # Made but unusable (e.g. created stopped): it bills, so it is ours to destroy.
            ledger.finish_create(key, exc.instance_id, note=reason(exc)[:200])
            rental.add(exc.instance_id, offer.price_per_hour)
        else:
            ledger.fail_create(key, reason(exc)[:200])
        raise
    except BaseException as exc:
        # No answer, or Ctrl+C while waiting for one: the instance may exist all the same. Its
        # label finds it, and then it is the rental's to destroy; if the list cannot be read
        # either, the row stays "creating" until `list` or the next launch settles it.
        ledger.update(key, note=f"create raised {type(exc).__name__}: {str(exc)[:200]}")
        try:
            for row, inst in settle_pending(ledger, provider.name, provider.list()):
                if row.key == key and inst is not None:
                    rental.add(inst.id, offer.price_per_hour)
        except Exception:  # noqa: BLE001 - the first failure is the one to report
            log.warning("could not look for the instance of %s after its create failed", spec.label)
        raise
    rental.add(instance.id, offer.price_per_hour)  # first: a Ctrl+C from here on destroys it
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
    rental: Rental,
    ports: tuple[int, ...] = (),
) -> tuple[Instance, Any]:
    """One instance: create_fleet of one."""
    return create_fleet(
        provider, ledger, plan, req, run, n_trials, yes, confirm, say, rental, 1, ports
    )[0]


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
    rental: Rental,
    count: int = 1,
    head_ports: tuple[int, ...] = (),
    budget: BudgetCheck | None = None,
) -> list[tuple[Instance, Any]]:
    """Create `count` instances on distinct machines after one confirmation, then wait for each.

    Every create is in the ledger before the provider answers, and in the rental (destroyed if
    the command fails later); a box that fails to boot is destroyed, confirmed gone, and
    replaced once on a machine not used yet. head_ports are exposed on the first instance
    (Postgres for a shared study).
    """
    reconcile_pending(provider, ledger, say)
    found = provider.offers(req)
    if req.bid is not None and req.max_price is not None:
        # Bid search results are priced at the minimum bid: the cap is on the bid's price.
        found = [o for o in found if priced(o, req).price_per_hour <= req.max_price + 1e-9]
        if not found:
            raise NoOffers(
                f"no interruptible offer runs at or below {req.max_price:.3f} $/h at your bid"
            )
    offers = _distinct_machines(found, count)
    if len(offers) < count:
        raise ProviderError(
            f"only {len(offers)} machine(s) offer this; {count} instances were asked for"
        )
    # Interruptible boxes, except the one hosting a shared study (head_ports): it must not pause.
    offers = [priced(o, req, on_demand=bool(head_ports) and i == 0) for i, o in enumerate(offers)]
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
        if budget is not None and budget.usd:
            lines.append(_check_budget(budget, offers, plan, n_trials, count))
        for line in lines:
            say(line)
        kind = "interruptible " if offers[0].bid is not None else ""
        what = f"{kind}{offers[0].gpu_count}x {offers[0].gpu_name} instance at {offers[0].price_per_hour:.3f} $/h"
        if count > 1:
            what = f"{count} instances at {sum(o.price_per_hour for o in offers):.3f} $/h together"
        confirm_or_refuse(
            f"create this {what}" if count == 1 else f"create these {what}", lines, yes, confirm
        )
    used = {o.machine_id for o in offers if o.machine_id is not None}
    created: list[tuple[Instance, CreateSpec, Offer]] = []
    for i, offer in enumerate(offers):
        spec = _spec(run, req, i, count, head_ports if i == 0 else ())
        instance = create(provider, ledger, offer, spec, run, rental)
        say(f"created instance {instance.id} ({spec.label}); waiting for it to boot")
        created.append((instance, spec, offer))
    ready = []
    for instance, spec, confirmed in created:
        try:
            ready.append(wait_ready(provider, instance.id, say))
            continue
        except BootFailed as exc:
            say(f"{exc}; destroying it")
            destroy_and_confirm(provider, ledger, instance.id)
            rental.drop(instance.id)
            if exc.instance.machine_id:
                used.add(exc.instance.machine_id)
        retry = replace(req, exclude_machines=tuple(sorted(used)))
        offer = priced(choose_offer(provider, retry), req, on_demand=confirmed.bid is None)
        if provider.billable and offer.price_per_hour > confirmed.price_per_hour + 1e-9:
            _ask_for_dearer(provider, offer, confirmed, retry, plan, n_trials, confirm, say)
        say(f"trying another machine once: offer {offer.id} at {offer.price_per_hour:.3f} $/h")
        replacement = create(provider, ledger, offer, spec, run, rental)
        ready.append(wait_ready(provider, replacement.id, say))
    for inst, _ in ready:  # the address SSH answered on (a create knows none yet)
        rec = ledger.instance(provider.name, inst.id)
        if rec is not None:
            ledger.update(
                rec.key, ssh_host=inst.ssh_host, ssh_port=inst.ssh_port, ssh_user=inst.ssh_user
            )
    return ready


@dataclass(frozen=True)
class BudgetCheck:
    """What the up-front budget check needs beyond the plan."""

    usd: float
    stop_after_s: float = 0.0  # the grace period bills too
    rescore_factor: float = 0.0  # the re-score's tokens per answer over the search's (0: none)
    benchmark_hours: float = 0.0  # the capability check (lm-eval), on the original and the export


def _check_budget(
    budget: BudgetCheck, offers: list[Offer], plan: Plan, n_trials: int, count: int
) -> str:
    """Refuse a run whose estimate (search, re-score, export and grace period) is over budget
    before anything is rented."""
    rate = sum(o.price_per_hour for o in offers)
    search = plan.hours_for(max(1, n_trials // count))
    wrapup = plan.wrapup_hours(budget.rescore_factor)
    if search is None or wrapup is None:
        return (
            f"budget {fmt_usd(budget.usd)} (no estimate): once spent, the search ends, the "
            "best trial so far is exported and the box stops itself"
        )
    grace = budget.stop_after_s / 3600
    hours = search + wrapup + budget.benchmark_hours + grace
    parts = f"search {search:.1f} h, re-score and export {wrapup:.1f} h, grace {grace:.1f} h"
    if budget.benchmark_hours:
        parts += f", capability check {budget.benchmark_hours:.1f} h"
    if rate * hours > budget.usd:
        raise UserError(
            f"the estimated cost, {fmt_usd(rate * hours)} ({parts} at {rate:.3f} $/h), is over "
            f"--budget {fmt_usd(budget.usd)}: raise the budget, lower --trials, shorten "
            "--stop-after or choose a cheaper --gpu; nothing was rented"
        )
    return (
        f"budget {fmt_usd(budget.usd)} (estimated {fmt_usd(rate * hours)}: {parts}): once "
        "spent, the search ends, the best trial so far is exported and the box stops itself"
    )


def _ask_for_dearer(
    provider: Provider,
    offer: Offer,
    confirmed: Offer,
    req: Requirements,
    plan: Plan,
    n_trials: int,
    confirm: Confirm | None,
    say: Say,
) -> None:
    """A replacement costs more than the user agreed to: it is rented only after asking again
    (--yes agreed to the price shown, not to a higher one)."""
    rise = f"{offer.price_per_hour:.3f} $/h instead of the {confirmed.price_per_hour:.3f} $/h you confirmed"
    if confirm is None:
        raise ProviderError(
            f"the next machine costs {rise}: not renting it without asking "
            "(run the command in a terminal to be asked)"
        )
    for line in describe_offer(provider, offer, req, plan, n_trials):
        say(line)
    if not confirm(f"rent this replacement at {rise}?"):
        raise Declined("did not rent a replacement at the higher price")


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
        public_keys=tuple(public_keys()),
    )
