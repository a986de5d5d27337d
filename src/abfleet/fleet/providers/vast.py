"""Vast.ai through the official SDK (`vastai`, class VastAI).

The SDK's own retry is turned off (retry=1): it would replay a create on a 502 and could rent two
machines. Here, reads and idempotent writes are retried on 429/5xx with backoff, while a create
that failed ambiguously is reconciled by looking for its unique label before anything else.
Every answer is checked for shape: an unexpected one is an error, never an empty list (an SDK
that turned a 410 into [] once made paid instances invisible).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import requests

from abfleet.errors import CreateFailed, NoOffers, ProviderError, UserError
from abfleet.fleet.providers.base import (
    FAILED,
    PENDING,
    RUNNING,
    STOPPED,
    CreateSpec,
    Instance,
    Offer,
    Requirements,
)
from abfleet.settings import VastSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = frozenset({429, 500, 502, 503, 504})
# Vast's actual_status values, grouped. Pending ones may still become running.
PENDING_STATES = frozenset(
    {None, "", "created", "loading", "scheduling", "restarting", "rebooting"}
)
FAILED_STATES = frozenset({"exited", "offline", "unknown", "frozen", "error"})
FAILURE_MESSAGES = ("OCI runtime create failed", "Error response from daemon", "no space left")
HOURS_PER_MONTH = 720
MIB_PER_GB = 1024  # Vast reports gpu_ram in MiB (24576 for a 24 GB card); its query takes GB


class VastProvider:
    name = "vast"
    billable = True

    def __init__(
        self, cfg: VastSettings, api_key: str | None = None, attempts: int = 5, backoff: float = 1.0
    ) -> None:
        from vastai import VastAI

        self.cfg = cfg
        self.poll_s = cfg.poll_s
        self.attempts = attempts
        self.backoff = backoff
        try:
            self.sdk = VastAI(
                api_key=api_key, server_url=cfg.server_url, retry=1, raw=True, quiet=True
            )
        except RuntimeError as exc:  # the SDK's "No API key found"
            raise UserError(
                "no Vast.ai API key: set VAST_API_KEY, or save it with `vastai set api-key` "
                "(abfleet never takes it on the command line)"
            ) from exc

    # -- calls ------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T], retry: bool = True) -> T:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except requests.HTTPError as exc:
                status, body = _status_and_body(exc)
                if retry and status in RETRYABLE and attempt < self.attempts:
                    wait = _retry_after(exc) or delay
                    log.warning("Vast.ai answered %s to %s; retrying in %.1fs", status, what, wait)
                    time.sleep(wait)
                    delay *= 2
                    continue
                error = _http_error(what, status, body, attempt)
                error.retry_after = _retry_after(exc)  # type: ignore[attr-defined]
                raise error from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                if retry and attempt < self.attempts:
                    log.warning(
                        "cannot reach Vast.ai for %s (%s); retrying in %.1fs", what, exc, delay
                    )
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise ProviderError(f"cannot reach Vast.ai for {what}: {exc}") from exc
            except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
                raise ProviderError(
                    f"Vast.ai answered {what} in an unexpected shape ({type(exc).__name__}: {exc})"
                ) from exc
        raise ProviderError(
            f"Vast.ai kept failing {what}"
        )  # pragma: no cover - loop always returns or raises

    # -- offers -----------------------------------------------------------------------------

    def _filters(self, req: Requirements) -> list[tuple[str, str]]:
        """(name, clause) pairs in the order they narrow the search; units as Vast wants them."""
        filters = [("num_gpus", f"num_gpus={req.gpu_count}")]
        if req.gpu_name:
            filters.append(("gpu_name", f"gpu_name={req.gpu_name}"))
        filters += [
            ("gpu_ram", f"gpu_ram>={req.gpu_memory_gb:g}"),  # GB: the SDK turns it into MB
            ("disk_space", f"disk_space>={req.disk_gb}"),
            ("cpu_ram", f"cpu_ram>={req.host_ram_gb:g}"),  # GB, like gpu_ram
            ("cuda_max_good", f"cuda_max_good>={self.cfg.min_cuda:g}"),
            ("reliability", f"reliability>={self.cfg.min_reliability:g}"),
            ("inet_down", f"inet_down>={self.cfg.min_inet_down_mbps:g}"),
            ("direct_port_count", "direct_port_count>=1"),
        ]
        if not self.cfg.verified:
            filters.append(("verified", "verified=any"))
        if req.max_price is not None:
            filters.append(("dph_total", f"dph_total<={req.max_price:g}"))
        if req.exclude_machines:
            filters.append(
                (
                    "machine_id",
                    "machine_id notin [" + ",".join(str(m) for m in req.exclude_machines) + "]",
                )
            )
        return filters

    def _search(
        self, clauses: list[str], disk_gb: float, kind: str = "on-demand"
    ) -> list[dict[str, Any]]:
        query = " ".join(clauses)
        # storage: the disk to be rented, so dph_total is what the instance will bill (the SDK
        # prices 5 GB unless told). kind "bid": dph_total is the interruptible price, at min_bid.
        rows = self._call(
            "an offer search",
            lambda: self.sdk.search_offers(
                query=query, order="dph_total", storage=disk_gb, type=kind
            ),
        )
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "id" in r for r in rows):
            raise ProviderError(
                f"Vast.ai answered an offer search with {type(rows).__name__}, not a list of offers"
            )
        return rows

    def offers(self, req: Requirements) -> list[Offer]:
        filters = self._filters(req)
        kind = "bid" if req.bid is not None else "on-demand"
        rows = self._search([clause for _, clause in filters], req.disk_gb, kind)
        if not rows:
            raise NoOffers(self._why_empty(filters, req.disk_gb, kind))
        if req.bid is None:
            offers = [self._offer(r, req.disk_gb) for r in rows]
            return sorted(offers, key=lambda o: o.price_per_hour)
        # A bid search prices at the minimum bid; the same machines on demand come from a
        # second search (no price filter: --max-price caps the interruptible rate).
        clauses = [c for name, c in filters if name != "dph_total"]
        demand = {
            str(r["id"]): _float(r.get("dph_total")) for r in self._search(clauses, req.disk_gb)
        }
        offers = [self._offer(r, req.disk_gb, demand.get(str(r["id"]))) for r in rows]
        offers = [o for o in offers if o.min_bid is not None]
        if not offers:
            raise NoOffers(
                "no Vast.ai offer that fits can be rented interruptible right now: "
                "drop --interruptible or try later"
            )
        return sorted(offers, key=lambda o: o.interruptible_per_hour or o.price_per_hour)

    def _why_empty(
        self, filters: list[tuple[str, str]], disk_gb: float, kind: str = "on-demand"
    ) -> str:
        """Add filters one at a time: the first that empties the list is the one to loosen."""
        previous = None
        for i in range(1, len(filters) + 1):
            count = len(self._search([clause for _, clause in filters[:i]], disk_gb, kind))
            if count == 0:
                name, clause = filters[i - 1]
                if previous is None:
                    return f"no Vast.ai offers at all for {clause} right now: try another GPU type or later"
                return (
                    f"no Vast.ai offers: {previous} offer(s) match {' '.join(c for _, c in filters[: i - 1])}, "
                    f"but none once {clause} is added; loosen {name} or try later"
                )
            previous = count
        return "no Vast.ai offers match (they changed while searching): try again"

    def _offer(self, r: dict[str, Any], disk_gb: float, on_demand: float | None = None) -> Offer:
        storage = _storage_rate(r.get("storage_cost"), disk_gb)
        min_bid = _float(r.get("min_bid"))
        interruptible = on_demand is not None and min_bid is not None
        return Offer(
            id=str(r["id"]),
            provider=self.name,
            gpu_name=str(r.get("gpu_name", "")),
            gpu_count=int(r.get("num_gpus") or 0),
            gpu_memory_gb=float(r.get("gpu_ram") or 0) / MIB_PER_GB,
            disk_gb=float(r.get("disk_space") or 0),
            # From a bid search, dph_total is the interruptible price: the on-demand one is
            # the other search's.
            price_per_hour=on_demand if interruptible else float(r["dph_total"]),  # type: ignore[arg-type]
            reliability=_float(r.get("reliability2", r.get("reliability"))),
            inet_down_mbps=_float(r.get("inet_down")),
            machine_id=int(r["machine_id"]) if r.get("machine_id") is not None else None,
            location=str(r.get("geolocation") or ""),
            storage_per_hour=storage,
            min_bid=min_bid if interruptible else None,
            interruptible_per_hour=float(r["dph_total"]) if interruptible else None,
        )

    # -- instances --------------------------------------------------------------------------

    def create(self, offer: Offer, spec: CreateSpec) -> Instance:
        env = dict(spec.env)
        for port in spec.ports:
            env[f"-p {port}:{port}"] = "1"  # expose a container port (e.g. Postgres)

        def call() -> Any:
            return self.sdk.create_instance(
                id=int(offer.id),
                image=spec.image,
                disk=spec.disk_gb,
                env=env,
                label=spec.label,
                onstart_cmd=spec.onstart or None,
                ssh=True,
                direct=True,
                # An unschedulable create is an error, not a stopped instance billing its disk.
                cancel_unavail=True,
                # A price makes the create a bid (interruptible); none: on demand.
                price=offer.bid,
            )

        iid = self._create(offer, spec, call)
        # An account key added after the create never reaches an instance: give it ours now.
        for key in spec.public_keys:
            try:
                self.attach_key(iid, key)
            except ProviderError as exc:
                raise CreateFailed(
                    f"instance {iid} was created, but attaching your SSH key failed ({exc})",
                    instance_id=iid,
                ) from exc
        instance = self.get(iid)
        return instance or Instance(iid, self.name, spec.label, PENDING)

    def _create(self, offer: Offer, spec: CreateSpec, call: Callable[[], Any]) -> str:
        """The id of the instance the create made, however its answer went."""
        what = f"creating an instance from offer {offer.id}"
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                answer = self._call(what, call, retry=False)
                break
            except ProviderError as exc:
                # The request may have reached Vast even when the answer did not reach us, or
                # was an error: the label says at once whether an instance exists.
                found = self._labelled(spec.label)
                if found is not None:
                    log.warning("create of %s: %s; instance %s exists", spec.label, exc, found.id)
                    return found.id
                if getattr(exc, "status", None) == 429 and attempt < self.attempts:
                    wait = getattr(exc, "retry_after", None) or delay
                    log.warning(
                        "Vast.ai answered 429 to %s; nothing was created; retrying in %.1fs",
                        what,
                        wait,
                    )
                    time.sleep(wait)
                    delay *= 2
                    continue
                if getattr(exc, "status", None) is None:
                    raise  # no answer at all: the ledger row stays open until the list settles it
                raise CreateFailed(
                    f"{exc}; no instance labelled {spec.label} exists, so nothing bills"
                ) from exc
        if (
            isinstance(answer, dict)
            and answer.get("success") is False
            and not answer.get("new_contract")
        ):
            reason = answer.get("msg") or answer.get("error") or "no reason given"
            raise CreateFailed(
                f"Vast.ai could not start an instance from offer {offer.id} ({reason}); "
                "nothing was created, so nothing bills"
            )
        if not isinstance(answer, dict) or "new_contract" not in answer:
            raise ProviderError(
                f"Vast.ai answered the create of offer {offer.id} without an instance id: "
                f"{sorted(answer) if isinstance(answer, dict) else type(answer).__name__}"
            )
        iid = str(answer["new_contract"])
        if not answer.get("success"):
            # Vast made the instance but could not start it ("created stopped, resources
            # unavailable"): it bills for its disk. Never echo the answer: it holds the
            # instance's own API key.
            reason = answer.get("msg") or answer.get("error") or "no reason given"
            raise CreateFailed(
                f"Vast.ai created instance {iid} from offer {offer.id} but did not start it ({reason})",
                instance_id=iid,
            )
        return iid

    def _labelled(self, label: str) -> Instance | None:
        found = [i for i in self.list() if i.label == label]
        return found[0] if len(found) == 1 else None

    def get(self, instance_id: str) -> Instance | None:
        row = self._call(
            f"reading instance {instance_id}", lambda: self.sdk.show_instance(id=int(instance_id))
        )
        if row is None:
            return None
        if not isinstance(row, dict) or "id" not in row:
            raise ProviderError(
                f"Vast.ai answered instance {instance_id} with {type(row).__name__}, not an instance"
            )
        return self._instance(row)

    def list(self) -> list[Instance]:
        rows = self._call("listing instances", self.sdk.show_instances)
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "id" in r for r in rows):
            raise ProviderError(
                f"Vast.ai answered the instance list with {type(rows).__name__}, not a list"
            )
        return [self._instance(r) for r in rows]

    def start(self, instance_id: str) -> None:
        self._checked(
            f"starting instance {instance_id}", lambda: self.sdk.start_instance(id=int(instance_id))
        )

    def stop(self, instance_id: str) -> None:
        self._checked(
            f"stopping instance {instance_id}", lambda: self.sdk.stop_instance(id=int(instance_id))
        )

    def destroy(self, instance_id: str) -> bool:
        try:
            self._checked(
                f"destroying instance {instance_id}",
                lambda: self.sdk.destroy_instance(id=int(instance_id)),
            )
        except ProviderError as exc:
            if "no_such_instance" in str(exc):
                return False  # already gone: that is what was asked
            raise
        return True

    def describe_offer(self, offer: Offer) -> list[str]:
        where = f", {offer.location}" if offer.location else ""
        rel = f", reliability {offer.reliability:.3f}" if offer.reliability is not None else ""
        lines = [
            f"provider {offer.provider}, offer {offer.id}",
            f"{offer.gpu_count}x {offer.gpu_name} ({offer.gpu_memory_gb:.0f} GB each), machine {offer.machine_id}{where}{rel}",
        ]
        if offer.bid is not None:
            disk = offer.storage_per_hour or 0.0
            demand = (
                f" (on demand: {offer.on_demand_per_hour:.3f} $/h)"
                if offer.on_demand_per_hour
                else ""
            )
            lines += [
                f"interruptible: bid {offer.bid:.4f} $/h (minimum {offer.min_bid:.4f}), "
                f"{offer.price_per_hour:.3f} $/h running with its disk{demand}",
                f"outbid, it pauses: it then bills only its disk ({disk:.3f} $/h), the run waits, "
                "and it goes on where it was when the bid wins again",
            ]
        return lines

    def attach_key(self, instance_id: str, public_key: str) -> None:
        self._checked(
            f"attaching an SSH key to instance {instance_id}",
            lambda: self.sdk.attach_ssh(instance_id=int(instance_id), ssh_key=public_key),
        )

    def self_stop_requests(self, instance_id: str) -> dict[str, Any]:
        """What the box sends to stop or destroy itself, with the instance-scoped key Vast
        puts in the container (CONTAINER_API_KEY), the same calls as the SDK's."""
        url = f"{self.sdk.client.server_url.rstrip('/')}/api/v0/instances/{int(instance_id)}/"
        return {
            "stop": {"method": "PUT", "url": url, "json": {"state": "stopped"}},
            "destroy": {"method": "DELETE", "url": url},
            "key_env": "CONTAINER_API_KEY",
        }

    def _checked(self, what: str, fn: Callable[[], Any]) -> Any:
        answer = self._call(what, fn)
        if isinstance(answer, dict) and answer.get("success") is False:
            raise ProviderError(
                f"Vast.ai refused {what}: {answer.get('msg') or answer.get('error')}"
            )
        return answer

    def connect(self, instance: Instance) -> Any:
        from abfleet.fleet.remote import open_remote

        return open_remote(instance, self.name)

    def _instance(self, r: dict[str, Any]) -> Instance:
        actual = r.get("actual_status")
        intended = r.get("intended_status")
        msg = str(r.get("status_msg") or "")
        is_bid = bool(r.get("is_bid"))
        # An interruptible instance its owner wants running but that does not run lost its bid:
        # the market stopped it (paused, not failed); it runs again when the bid wins.
        outbid = is_bid and intended == "running" and actual in ("stopped", "exited")
        if outbid:
            state = STOPPED
        elif any(m in msg for m in FAILURE_MESSAGES) or (
            actual in FAILED_STATES and intended != "stopped"
        ):
            state = FAILED
        elif actual == "running":
            state = RUNNING
        elif actual in ("stopped", "exited") or intended == "stopped":
            state = STOPPED
        elif actual in PENDING_STATES:
            state = PENDING
        else:
            state = PENDING
        host, port = r.get("ssh_host"), r.get("ssh_port")
        ports = _ports(r.get("ports"))
        if r.get("public_ipaddr") and ports.get(22):
            host, port = str(r["public_ipaddr"]).strip(), ports[22]  # direct: faster than the proxy
        return Instance(
            id=str(r["id"]),
            provider=self.name,
            label=str(r.get("label") or ""),
            state=state,
            raw_state=str(actual) if actual else "created",
            status_msg=msg,
            gpu_name=str(r.get("gpu_name") or ""),
            gpu_count=int(r.get("num_gpus") or 0),
            price_per_hour=_float(r.get("dph_total")),
            disk_gb=_float(r.get("disk_space")),
            ssh_host=str(host) if host else None,
            ssh_port=int(port) if port else None,
            machine_id=int(r["machine_id"]) if r.get("machine_id") is not None else None,
            started_at=_float(r.get("start_date")),
            storage_per_hour=_storage_rate(r.get("storage_cost"), r.get("disk_space")),
            ports=ports,
            extra={
                "gpu_util": r.get("gpu_util"),
                "disk_util": r.get("disk_util"),
                "cur_state": r.get("cur_state"),
            },
            interruptible=is_bid,
            outbid=outbid,
        )


def _ports(raw: Any) -> dict[int, int]:
    """{"22/tcp": [{"HostIp": ..., "HostPort": "41234"}]} -> {22: 41234}."""
    out: dict[int, int] = {}
    if not isinstance(raw, dict):
        return out
    for key, binds in raw.items():
        try:
            container = int(str(key).split("/")[0])
            host = int(binds[0]["HostPort"])
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        out[container] = host
    return out


def _storage_rate(per_gb_month: Any, disk_gb: Any) -> float | None:
    """$/h of a disk: Vast prices storage per GB and month (30 days), by the hour."""
    cost, disk = _float(per_gb_month), _float(disk_gb)
    return cost * disk / HOURS_PER_MONTH if cost is not None and disk is not None else None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _status_and_body(exc: requests.HTTPError) -> tuple[int, dict[str, Any]]:
    response = exc.response
    status = response.status_code if response is not None else 0
    try:
        body = response.json() if response is not None else {}
    except ValueError:
        body = {}
    return status, body if isinstance(body, dict) else {}


def _retry_after(exc: requests.HTTPError) -> float | None:
    try:
        return min(60.0, float(exc.response.headers["Retry-After"]))  # type: ignore[union-attr]
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _http_error(what: str, status: int, body: dict[str, Any], attempts: int = 1) -> ProviderError:
    error = _http_error_text(what, status, body, attempts)
    error.status = status  # type: ignore[attr-defined]
    return error


def _http_error_text(what: str, status: int, body: dict[str, Any], attempts: int) -> ProviderError:
    error = str(body.get("error") or "")
    msg = str(body.get("msg") or body.get("message") or "")
    if error == "auth_error" or status in (401, 403):
        # Vast answers a wrong key with 404 auth_error, not 401.
        return ProviderError(
            "Vast.ai rejected the API key: check VAST_API_KEY (or `vastai set api-key`)"
        )
    if status == 410:
        return ProviderError(
            f"Vast.ai answered 410 Gone to {what} ({error or 'endpoint retired'}): this API call no longer "
            "exists; upgrade the vastai package. Nothing is assumed about your instances."
        )
    detail = f" ({error or msg})" if error or msg else ""
    if status in RETRYABLE and attempts > 1:
        return ProviderError(f"Vast.ai kept answering {status} to {what}; try again later{detail}")
    if status in RETRYABLE:
        return ProviderError(f"Vast.ai answered {status} to {what}{detail}")
    detail = " ".join(x for x in (error, msg) if x) or f"HTTP {status}"
    return ProviderError(f"Vast.ai refused {what}: {detail}")
