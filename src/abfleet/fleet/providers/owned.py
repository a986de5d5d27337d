"""Machines that are not rented through abfleet: one reached over SSH, or this machine.

Nothing here bills, so "create" only records the machine in the ledger, "stop" ends abfleet's
workers on it and "destroy" forgets it; the machine itself is never powered off or wiped.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from abfleet.errors import UserError
from abfleet.fleet.ledger import Ledger
from abfleet.fleet.providers.base import GONE, RUNNING, CreateSpec, Instance, Offer, Requirements

_HOST = re.compile(
    r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:]+\])(?::(?P<port>\d{1,5}))?$"
)


def parse_host(spec: str, default_user: str = "root") -> tuple[str, str, int]:
    """user@host:port -> (user, host, port); refuse anything else (it reaches a command line)."""
    m = _HOST.match(spec.strip())
    if not m:
        raise UserError(f"--host {spec!r} is not user@host[:port]")
    port = int(m["port"] or 22)
    if not 0 < port < 65536:
        raise UserError(f"--host {spec!r}: port {port} is out of range")
    return m["user"] or default_user, m["host"].strip("[]"), port


class _Owned:
    name = ""
    billable = False
    poll_s = 1.0

    def describe_offer(self, offer: Offer) -> list[str]:
        return [f"provider {offer.provider}, offer {offer.id}"]

    def self_stop_requests(self, instance_id: str) -> dict[str, Any]:
        return {}  # a machine of the user's is never stopped by abfleet

    def attach_key(self, instance_id: str, public_key: str) -> None:
        raise UserError("attach-key is for Vast.ai instances")

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger or Ledger()

    def _from_record(self, instance_id: str) -> Instance | None:
        rec = self.ledger.instance(self.name, instance_id)
        if rec is None or rec.state in ("destroyed", "create-failed"):
            return None
        return Instance(
            id=instance_id,
            provider=self.name,
            label=rec.label,
            state=RUNNING,
            raw_state="registered",
            gpu_name=rec.gpu_name or "",
            gpu_count=rec.gpu_count or 0,
            price_per_hour=0.0,
            ssh_host=rec.ssh_host,
            ssh_port=rec.ssh_port,
            ssh_user=rec.ssh_user or "root",
            started_at=rec.created_at,
        )

    def get(self, instance_id: str) -> Instance | None:
        return self._from_record(instance_id)

    def list(self) -> list[Instance]:
        out = []
        for rec in self.ledger.instances():
            if rec.provider == self.name and rec.instance_id:
                inst = self._from_record(rec.instance_id)
                if inst:
                    out.append(inst)
        return out

    def start(self, instance_id: str) -> None:
        raise UserError(f"{self.name} machines are not powered by abfleet: start it yourself")

    def stop(self, instance_id: str) -> None:
        """Stopping a machine abfleet does not own means stopping abfleet's workers on it."""
        from abfleet.fleet.deploy import stop_workers

        inst = self.get(instance_id)
        if inst is None:
            raise UserError(f"unknown {self.name} instance {instance_id}")
        stop_workers(self.connect(inst), self.ledger, self.name, instance_id)

    def destroy(self, instance_id: str) -> bool:
        return self.get(instance_id) is not None  # the caller marks it destroyed (forgotten)


class SshProvider(_Owned):
    """A machine the user already has, reached as user@host:port."""

    name = "ssh"

    def __init__(self, host: str | None = None, ledger: Ledger | None = None) -> None:
        super().__init__(ledger)
        self.host = host

    def offers(self, req: Requirements) -> list[Offer]:
        if not self.host:
            raise UserError("the ssh provider needs --host user@host[:port]")
        user, host, port = parse_host(self.host)
        return [
            Offer(
                id=f"{user}@{host}:{port}",
                provider=self.name,
                gpu_name="(yours)",
                gpu_count=req.gpu_count,
                gpu_memory_gb=0,
                disk_gb=0,
                price_per_hour=0.0,
            )
        ]

    def create(self, offer: Offer, spec: CreateSpec) -> Instance:
        user, host, port = parse_host(offer.id)
        return Instance(
            id=f"{host}:{port}",
            provider=self.name,
            label=spec.label,
            state=RUNNING,
            raw_state="registered",
            ssh_host=host,
            ssh_port=port,
            ssh_user=user,
            price_per_hour=0.0,
        )

    def connect(self, instance: Instance) -> Any:
        from abfleet.fleet.remote import open_remote

        return open_remote(instance, self.name)


class LocalProvider(_Owned):
    """This machine, driven exactly like a box (venv, detached worker), without SSH."""

    name = "local"

    def offers(self, req: Requirements) -> list[Offer]:
        return [
            Offer(
                id="local",
                provider=self.name,
                gpu_name=_local_gpu(),
                gpu_count=1,
                gpu_memory_gb=0,
                disk_gb=0,
                price_per_hour=0.0,
            )
        ]

    def create(self, offer: Offer, spec: CreateSpec) -> Instance:
        return Instance(
            id="local",
            provider=self.name,
            label=spec.label,
            state=RUNNING,
            raw_state="registered",
            gpu_name=offer.gpu_name,
            price_per_hour=0.0,
            ssh_host=socket.gethostname(),
        )

    def connect(self, instance: Instance) -> Any:
        from abfleet.fleet.remote import LocalRemote

        return LocalRemote()


def _local_gpu() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


__all__ = ["GONE", "LocalProvider", "SshProvider", "parse_host"]
