"""One interface for every place a job can run: Vast.ai, a machine reached over SSH, this machine.

The launcher only sees this interface: it asks for offers, creates an instance from one, waits
until it is ready, then talks to it through the Remote that connect() returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

# Normalized instance states.
PENDING = "pending"
RUNNING = "running"
STOPPED = "stopped"
FAILED = "failed"
GONE = "gone"


@dataclass(frozen=True)
class Bid:
    """Rent interruptible: at `usd` $/h for the machine, or, when None, at the offer's minimum
    bid plus `margin` (0.1: 10 %), which wins back a machine sooner after an outbid."""

    usd: float | None = None
    margin: float = 0.1

    def for_offer(self, min_bid: float) -> float:
        return self.usd if self.usd is not None else round(min_bid * (1 + self.margin), 4)


@dataclass(frozen=True)
class Requirements:
    """What a job needs of a box (from sizing)."""

    gpu_name: str | None
    gpu_count: int
    gpu_memory_gb: float  # per GPU
    disk_gb: int
    max_price: float | None = None
    exclude_machines: tuple[int, ...] = ()
    extra_ports: tuple[int, ...] = ()
    host_ram_gb: float = 0.0  # the box's RAM (sizing: the load and the shard-wise export)
    bid: Bid | None = None  # None: on demand


@dataclass(frozen=True)
class Offer:
    id: str
    provider: str
    gpu_name: str
    gpu_count: int
    gpu_memory_gb: float
    disk_gb: float
    price_per_hour: float
    reliability: float | None = None
    inet_down_mbps: float | None = None
    machine_id: int | None = None
    location: str = ""
    storage_per_hour: float | None = None  # what it bills while stopped (its disk), in $/h
    # Interruptible: the lowest bid the machine takes ($/h, its disk not included), and what it
    # bills running at that bid with its disk. None where the offer is on demand only.
    min_bid: float | None = None
    interruptible_per_hour: float | None = None
    # Set once a bid is chosen: this offer is rented at `bid` and price_per_hour is what it
    # bills running at that bid; on_demand_per_hour keeps the other price for comparison.
    bid: float | None = None
    on_demand_per_hour: float | None = None


def at_bid(offer: Offer, policy: Bid) -> Offer:
    """The offer rented interruptible under `policy`: price_per_hour becomes the running rate at
    the bid (plus its disk), the on-demand price is kept beside it."""
    if offer.min_bid is None:
        raise ValueError(f"offer {offer.id} cannot be rented interruptible")
    bid = policy.for_offer(offer.min_bid)
    disk = offer.storage_per_hour or 0.0
    return replace(
        offer,
        bid=bid,
        price_per_hour=round(bid + disk, 6),
        on_demand_per_hour=offer.price_per_hour,
    )


@dataclass(frozen=True)
class CreateSpec:
    label: str
    image: str
    disk_gb: int
    onstart: str = ""
    env: dict[str, str] = field(default_factory=dict)  # never secrets: Vast shows env to the host
    ports: tuple[int, ...] = ()
    public_keys: tuple[str, ...] = ()  # SSH keys the instance must accept (given through the API)


@dataclass
class Instance:
    id: str
    provider: str
    label: str
    state: str  # one of PENDING, RUNNING, STOPPED, FAILED, GONE
    raw_state: str = ""
    status_msg: str = ""
    gpu_name: str = ""
    gpu_count: int = 0
    price_per_hour: float | None = None
    disk_gb: float | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    ssh_user: str = "root"
    machine_id: int | None = None
    started_at: float | None = None
    storage_per_hour: float | None = None  # $/h while stopped
    ports: dict[int, int] = field(default_factory=dict)  # container port -> host port
    extra: dict[str, Any] = field(default_factory=dict)
    interruptible: bool = False  # rented at a bid
    # Stopped by the market, not by anyone's stop: its bid lost; it runs again (container
    # restarted, onstart rerun) when the bid wins. Bills its disk meanwhile.
    outbid: bool = False

    @property
    def ssh_ready(self) -> bool:
        return self.state == RUNNING and bool(self.ssh_host) and bool(self.ssh_port)


class Provider(Protocol):
    name: str
    billable: bool  # creating costs money: confirmation required; destroy removes the machine
    poll_s: float  # how often to ask for an instance's state while it boots

    def describe_offer(self, offer: Offer) -> list[str]:
        """Lines that show the user exactly what would be rented."""
        ...

    def attach_key(self, instance_id: str, public_key: str) -> None:
        """Give a running instance an SSH public key (or say why this provider cannot)."""
        ...

    def self_stop_requests(self, instance_id: str) -> dict[str, Any]:
        """The HTTP requests ("stop", "destroy") a box sends to end its own billing, and the
        container variable ("key_env") holding the key scoped to it; {} if it cannot."""
        ...

    def offers(self, req: Requirements) -> list[Offer]: ...

    def create(self, offer: Offer, spec: CreateSpec) -> Instance: ...

    def get(self, instance_id: str) -> Instance | None: ...

    def list(self) -> list[Instance]: ...

    def start(self, instance_id: str) -> None: ...

    def stop(self, instance_id: str) -> None: ...

    def destroy(self, instance_id: str) -> bool:
        """True if destroyed now, False if it was already gone."""
        ...

    def connect(self, instance: Instance) -> Any:
        """A Remote for running commands and moving files on the instance."""
        ...
