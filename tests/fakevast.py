"""A local fake of the Vast.ai API, driven by the real `vastai` SDK through its server_url.

It speaks what vastai 1.9's SDK sends and expects (read from its source): POST /api/v0/bundles/
with a filter dict (gpu_ram in MB, `order`, `type`, `allocated_storage`), PUT /api/v0/asks/{id}/
answering {"success": true, "new_contract": id, "instance_api_key": ...} (or success false with
the id of an instance created stopped), the paginated GET /api/v1/instances/ (25 a page,
next_token), GET /api/v0/instances/{id}/?owner=me -> {"instances": {...}}, PUT/DELETE on
/api/v0/instances/{id}/, and the traps of the real service: a wrong key answers 404 auth_error,
the old list endpoint answers 410, destroying a missing instance answers no_such_instance.

Instances move through created -> loading -> running over time; when one runs, a real SSH server
on 127.0.0.1 (tests/sshbox.py) becomes its box, and the instance's onstart command runs in it,
as on Vast on every container start (first boot, start after a stop, reboot). A stop or a
reboot kills every process of the box; its disk stays. Faults can be injected per endpoint.
`cancel_unavail` on a create makes an unschedulable create an error instead of a stopped
instance.

Bids (interruptible instances), as Vast.ai does them: a search of type "bid" prices offers at
their `min_bid` (dph_total = min_bid + the disk's share); a create that sends `price` is a bid
(`is_bid`, billing price + disk while it runs); a competing bid above it (outbid()) stops it:
its container's processes die, intended_status stays "running", only its disk bills; when it
wins again (release(), or a higher bid through PUT /api/v0/instances/bid_price/{id}/) the
container restarts and runs its onstart, as after any start. A create whose bid is below the
machine's winning price is unschedulable: with cancel_unavail, not made.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_KEY = "fake-vast-key-0123456789"
HOURS_PER_MONTH = 720  # storage_cost is $/GB/month; Vast prices the allocated disk by the hour
DEFAULT_STORAGE_GB = 5.0  # what a search prices when it names no allocated_storage (the SDK's)


def make_offer(
    offer_id: int,
    gpu: str,
    num_gpus: int,
    gpu_ram_mb: int,
    price: float,
    disk: float = 500.0,
    **extra: Any,
) -> dict[str, Any]:
    """price: dph_total as a search with the default 5 GB of storage shows it."""
    storage_cost = 0.15
    offer = {
        "id": offer_id,
        "ask_contract_id": offer_id,
        "machine_id": 10_000 + offer_id,
        "host_id": 20_000 + offer_id,
        "num_gpus": num_gpus,
        "gpu_name": gpu,
        "gpu_ram": gpu_ram_mb,
        "gpu_total_ram": gpu_ram_mb * num_gpus,
        "compute_cap": 890,
        "cuda_max_good": 12.8,
        "cpu_cores_effective": 16.0,
        "cpu_ram": 128_000,
        "disk_space": disk,
        "disk_bw": 2000.0,
        "inet_up": 800.0,
        "inet_down": 900.0,
        "direct_port_count": 20,
        "dph_base": price - storage_cost * DEFAULT_STORAGE_GB / HOURS_PER_MONTH,
        "dph_total": price,
        "min_bid": round(price * 0.5, 4),
        "storage_cost": storage_cost,
        "reliability": 0.995,
        "reliability2": 0.995,
        "dlperf": 50.0,
        "geolocation": "Testland, TL",
        "verified": True,
        "rentable": True,
        "rented": False,
        "external": False,
        "hosting_type": 1,
    }
    offer.update(extra)
    return offer


def default_offers() -> list[dict[str, Any]]:
    return [
        make_offer(101, "RTX 3090", 1, 24_576, 0.21),
        make_offer(102, "RTX 3090", 1, 24_576, 0.24),
        make_offer(103, "RTX 4090", 1, 24_564, 0.41),
        make_offer(104, "H200", 1, 143_771, 2.35),
        make_offer(105, "A100 SXM4", 1, 81_920, 1.05, disk=150.0),
        make_offer(106, "RTX 3090", 1, 24_576, 0.19, verified=False),
    ]


@dataclass
class Fault:
    method: str
    path: str  # regex on the path
    status: int
    body: dict[str, Any]
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    after: bool = False  # do the work, then answer with the fault (a lost answer)


class FakeVast:
    def __init__(
        self,
        box_factory: Callable[[int], Any] | None = None,
        api_key: str = API_KEY,
        created_s: float = 0.3,
        loading_s: float = 0.6,
    ) -> None:
        self.api_key = api_key
        self.box_factory = box_factory
        self.created_s = created_s
        self.loading_s = loading_s
        self.offers = default_offers()
        self.instances: dict[int, dict[str, Any]] = {}
        self.boxes: dict[int, Any] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, Any]] = []
        self.boot_failures = 0  # the next N created instances fail to boot
        # The next N creates make the instance but cannot start it: Vast answers
        # {"success": false, "new_contract": N, ...} and the instance stays, stopped, billing.
        self.start_failures = 0
        self.ignore_cancel_unavail = False  # as a Vast that makes a stopped instance anyway
        # As on Vast: a box accepts only SSH keys on the account when it was created, or
        # attached to it through the API (the test key handed to boxes otherwise is not used).
        self.api_keys_only = False
        self.account_keys: list[str] = []
        self.scoped_calls: list[tuple[str, str, Any]] = []  # made with an instance's own key
        # The provider's own meter: (at, instance id, "running" | "stopped" | "destroyed").
        self.billing: list[tuple[float, int, str]] = []
        self.competing: dict[int, float] = {}  # machine id -> another renter's winning bid
        self.lock = threading.RLock()
        self._next_id = 5_000_000
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeVast:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        for box in list(self.boxes.values()):
            box.close()

    def inject(
        self,
        method: str,
        path: str,
        status: int,
        body: Any = None,
        times: int = 1,
        headers: dict[str, str] | None = None,
        after: bool = False,
    ) -> None:
        if body is None:
            body = {"success": False, "error": "fault"}
        self.faults.append(Fault(method, path, status, body, times, headers or {}, after))

    @staticmethod
    def _disk(offer: dict[str, Any], storage_gb: float) -> float:
        return offer["storage_cost"] * storage_gb / HOURS_PER_MONTH

    def _set_bid(self, inst: dict[str, Any], bid: float) -> None:
        inst["_bid"] = bid
        inst["dph_total"] = round(
            bid + inst["storage_cost"] * inst["disk_space"] / HOURS_PER_MONTH, 6
        )

    @staticmethod
    def price(offer: dict[str, Any], storage_gb: float) -> float:
        """$/h of an offer with storage_gb of disk: the base plus the disk's share of storage."""
        return offer["dph_base"] + offer["storage_cost"] * storage_gb / HOURS_PER_MONTH

    def gpu_seconds_after(self, iid: int, since: float) -> float:
        """Seconds the instance billed its full (GPU) rate after `since`, by the meter above."""
        events = sorted(e for e in self.billing if e[1] == iid)
        total, running_from = 0.0, None
        for at, _, state in [*events, (time.time(), iid, "now")]:
            if running_from is not None:
                total += max(0.0, at - max(running_from, since))
            running_from = at if state == "running" else None
        return total

    def advance(self) -> None:
        """Move every instance along its states, as any API read does (a reboot needs one)."""
        with self.lock:
            for inst in list(self.instances.values()):
                self._advance(inst)

    def billed_usd(
        self, iid: int, rate: float, disk_rate: float, until: float | None = None
    ) -> float:
        """What the meter above billed the instance until then: `rate` $/h running,
        `disk_rate` stopped (outbid included)."""
        until = until or time.time()
        events = sorted(e for e in self.billing if e[1] == iid and e[0] < until)
        total = 0.0
        for (at, _, state), (end, _, _) in zip(
            events, [*events[1:], (until, iid, "now")], strict=True
        ):
            if state in ("running", "stopped"):
                total += (end - at) * (rate if state == "running" else disk_rate) / 3600
        return total

    def outbid(self, iid: int, price: float | None = None) -> None:
        """Another renter bids above the instance: it stops at once, its disk keeps billing."""
        with self.lock:
            inst = self.instances[iid]
            self.competing[inst["machine_id"]] = price or inst["_bid"] * 1.5 + 0.01
            self._contest(inst)

    def release(self, iid: int) -> None:
        """The competing renter leaves: the instance's bid wins again."""
        with self.lock:
            inst = self.instances[iid]
            self.competing.pop(inst["machine_id"], None)
            self._contest(inst)

    def _outbid(self, inst: dict[str, Any]) -> bool:
        winning = self.competing.get(inst["machine_id"])
        return bool(inst.get("is_bid")) and winning is not None and winning > inst["_bid"]

    def _contest(self, inst: dict[str, Any]) -> None:
        """Apply the market to an instance its owner wants running."""
        if inst["intended_status"] != "running":
            return
        if self._outbid(inst) and inst["actual_status"] != "stopped":
            self.billing.append((time.time(), inst["id"], "stopped"))
            inst.update(actual_status="stopped", cur_state="stopped", status_msg="outbid")
            box = self.boxes.pop(inst["id"], None)
            if box is not None:
                box.halt()  # the container's processes die at once; its disk stays
        elif not self._outbid(inst) and inst["actual_status"] == "stopped":
            self.billing.append((time.time(), inst["id"], "running"))
            inst.update(actual_status=None, cur_state="running", _created=time.time())

    def gpu_billing(self, iid: int) -> bool:
        """Whether the instance bills its full rate now."""
        events = [e for e in self.billing if e[1] == iid]
        return bool(events) and events[-1][2] == "running"

    def restart(self, iid: int) -> None:
        """The container restarts (a host reboot, Vast's reboot, an interruptible box coming
        back): every process on the box dies at once, its disk stays, and it boots again."""
        with self.lock:
            inst = self.instances[iid]
            box = self.boxes.pop(iid, None)
            if box is not None:
                box.halt()
            inst.update(actual_status=None, status_msg="rebooting", _created=time.time())

    def scoped(self, auth: str | None, method: str, path: str) -> bool:
        """An instance's own key (CONTAINER_API_KEY) may read, stop, start or destroy that
        instance and nothing else."""
        m = re.fullmatch(r"/api/v0/instances/(\d+)/", path)
        inst = self.instances.get(int(m[1])) if m else None
        return (
            inst is not None
            and method in ("GET", "PUT", "DELETE")
            and auth == f"Bearer {inst['_api_key']}"
        )

    def calls(self, method: str, path_regex: str) -> list[Any]:
        return [b for m, p, b in self.requests if m == method and re.search(path_regex, p)]

    # -- the state machine ------------------------------------------------------------------

    def _advance(self, inst: dict[str, Any]) -> None:
        self._contest(inst)
        age = time.time() - inst["_created"]
        if inst["intended_status"] == "stopped" or inst["actual_status"] in (
            "exited",
            "running",
            "stopped",
        ):
            return
        if age < self.created_s:
            inst["actual_status"], inst["cur_state"] = None, "running"
        elif age < self.created_s + self.loading_s:
            inst["actual_status"], inst["status_msg"] = "loading", "Pulling image"
        elif inst["_fail_boot"]:
            inst["actual_status"] = "exited"
            inst["status_msg"] = (
                "Error response from daemon: OCI runtime create failed: container init failed"
            )
        else:
            self._boot(inst)

    def _boot(self, inst: dict[str, Any]) -> None:
        port = 0
        if self.box_factory is not None:
            # As on Vast: the container's environment holds its id and a key scoped to it.
            box = self.box_factory(
                inst["id"],
                env={"CONTAINER_ID": str(inst["id"]), "CONTAINER_API_KEY": inst["_api_key"]},
            )
            self.boxes[inst["id"]] = box
            port = box.port
            self._authorize(inst)
            if inst.get("onstart"):
                box.run_onstart(inst["onstart"])
        inst.update(
            actual_status="running",
            status_msg="success, running",
            ssh_host="127.0.0.1",
            ssh_port=port,
            public_ipaddr="127.0.0.1",
            ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}], **inst["_exposed"]},
        )

    def _authorize(self, inst: dict[str, Any]) -> None:
        box = self.boxes.get(inst["id"])
        if self.api_keys_only and box is not None:
            (box.directory / "authorized_keys").write_text("".join(k + "\n" for k in inst["_keys"]))

    def _row(self, inst: dict[str, Any]) -> dict[str, Any]:
        self._advance(inst)
        row = {k: v for k, v in inst.items() if not k.startswith("_")}
        row["uptime_mins"] = 12_345.0  # accumulated across renters: meaningless for a job
        return row

    # -- HTTP -------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                # A box that stopped itself took its caller down with it: nobody reads this.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

            def _handle(self, method: str) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with fake.lock:
                    fake.requests.append((method, parts.path, body))
                    for fault in fake.faults:
                        if (
                            fault.times > 0
                            and fault.method == method
                            and re.search(fault.path, parts.path)
                        ):
                            fault.times -= 1
                            if fault.after:
                                fake.route(method, parts.path, parse_qs(parts.query), body)
                            return self._reply(fault.status, fault.body, fault.headers)
                    auth = self.headers.get("Authorization")
                    if fake.scoped(auth, method, parts.path):
                        fake.scoped_calls.append((method, parts.path, body))
                    elif auth != f"Bearer {fake.api_key}":
                        return self._reply(
                            404,
                            {"success": False, "error": "auth_error", "msg": "Invalid user key"},
                        )
                    status, answer = fake.route(method, parts.path, parse_qs(parts.query), body)
                return self._reply(status, answer)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        return Handler

    def route(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        if method == "POST" and path == "/api/v0/bundles/":
            return 200, {"offers": self._search(body or {})}
        m = re.fullmatch(r"/api/v0/asks/(\d+)/", path)
        if m and method == "PUT":
            return self._create(int(m[1]), body or {})
        if path == "/api/v1/instances/" and method == "GET":
            return 200, self._page(query)
        if path == "/api/v0/instances/" and method == "GET":
            return 410, {
                "success": False,
                "error": "deprecated_endpoint",
                "msg": "use /api/v1/instances/",
            }
        m = re.fullmatch(r"/api/v0/instances/(\d+)/", path)
        if m:
            iid = int(m[1])
            inst = self.instances.get(iid)
            if method == "GET":
                return 200, {"instances": self._row(inst) if inst else None}
            if inst is None:
                return 404, {
                    "success": False,
                    "error": "no_such_instance",
                    "msg": f"Instance {iid} not found.",
                }
            if method == "DELETE":
                self.billing.append((time.time(), iid, "destroyed"))
                self.instances.pop(iid)
                box = self.boxes.pop(iid, None)
                if box is not None:
                    box.close()
                return 200, {"success": True}
            if method == "PUT":
                return self._change(inst, body or {})
        m = re.fullmatch(r"/api/v0/instances/bid_price/(\d+)/", path)
        if m and method == "PUT":
            inst = self.instances.get(int(m[1]))
            if inst is None:
                return 404, {"success": False, "error": "no_such_instance"}
            if not inst.get("is_bid"):
                return 400, {"success": False, "error": "invalid_args", "msg": "not a bid"}
            self._set_bid(inst, float((body or {})["price"]))
            self._contest(inst)
            return 200, {"success": True}
        m = re.fullmatch(r"/api/v0/instances/reboot/(\d+)/", path)
        if m and method == "PUT":
            inst = self.instances.get(int(m[1]))
            if inst is None:
                return 404, {"success": False, "error": "no_such_instance"}
            self.restart(inst["id"])
            return 200, {"success": True}
        m = re.fullmatch(r"/api/v0/instances/(\d+)/ssh/", path)
        if m and method == "POST":
            inst = self.instances.get(int(m[1]))
            if inst is None:
                return 404, {"success": False, "error": "no_such_instance"}
            inst["_keys"].append((body or {})["ssh_key"])
            self._authorize(inst)
            return 200, {"success": True}
        if path == "/api/v0/ssh/" and method == "POST":
            self.account_keys.append((body or {})["ssh_key"])
            return 200, {"success": True, "key": {"id": len(self.account_keys)}}
        return 404, {"success": False, "error": "not_found", "msg": f"{method} {path}"}

    def _search(self, q: dict[str, Any]) -> list[dict[str, Any]]:
        control = {"order", "type", "limit", "allocated_storage", "disable_bundling"}
        storage = float(q.get("allocated_storage") or DEFAULT_STORAGE_GB)
        bid = q.get("type") == "bid"
        if bid:  # interruptible pricing: the machine at its minimum bid, plus the disk
            priced = [
                {**o, "dph_total": round(o["min_bid"] + self._disk(o, storage), 6)}
                for o in self.offers
                if o.get("min_bid") is not None
            ]
        else:
            priced = [{**o, "dph_total": round(self.price(o, storage), 6)} for o in self.offers]
        out = [
            o
            for o in priced
            if all(_match(o.get(k), ops) for k, ops in q.items() if k not in control)
        ]
        for field_name, direction in reversed(q.get("order") or []):
            out.sort(key=lambda o: o.get(field_name) or 0, reverse=direction == "desc")
        if q.get("limit"):
            out = out[: int(q["limit"])]
        return out

    def _create(self, offer_id: int, body: dict[str, Any]) -> tuple[int, Any]:
        for key in ("client_id", "image", "env", "disk", "label", "onstart", "runtype"):
            if key not in body:
                return 400, {"success": False, "error": "invalid_args", "msg": f"missing {key}"}
        offer = next((o for o in self.offers if o["id"] == offer_id), None)
        if offer is None or offer["rented"]:
            return 404, {
                "success": False,
                "error": "no_such_ask",
                "msg": f"Offer {offer_id} is not available.",
            }
        offer["rented"] = True
        offer["rentable"] = False
        self._next_id += 1
        iid = self._next_id
        fail = self.boot_failures > 0
        self.boot_failures -= int(fail)
        stopped = self.start_failures > 0
        self.start_failures -= int(stopped)
        bid = body.get("price")
        if bid is not None and float(bid) < max(
            offer["min_bid"] or 0.0, self.competing.get(offer["machine_id"], 0.0)
        ):
            stopped = True  # the bid cannot win: unschedulable until it does
        if stopped and body.get("cancel_unavail") and not self.ignore_cancel_unavail:
            offer["rented"], offer["rentable"] = False, True
            return 200, {
                "success": False,
                "error": "resources_unavailable",
                "msg": "Required resources are unavailable; the instance was not created.",
            }
        self.instances[iid] = {
            "id": iid,
            "machine_id": offer["machine_id"],
            "actual_status": None,
            "cur_state": "running",
            "next_state": "running",
            "intended_status": "running",
            "status_msg": None,
            "label": body["label"],
            "num_gpus": offer["num_gpus"],
            "gpu_name": offer["gpu_name"],
            "gpu_util": 0.0,
            "gpu_temp": 35.0,
            "cuda_max_good": offer["cuda_max_good"],
            "cpu_ram": offer["cpu_ram"],
            "disk_space": float(body["disk"]),
            "disk_util": 0.0,
            "disk_usage": 0.0,
            "ssh_host": None,
            "ssh_port": None,
            "public_ipaddr": None,
            "ports": {},
            "_exposed": _exposed_ports(body.get("env") or {}),
            "extra_env": [[k, v] for k, v in (body.get("env") or {}).items()],
            "onstart": body["onstart"],
            "image_uuid": body["image"],
            "start_date": time.time(),
            "dph_total": round(self.price(offer, float(body["disk"])), 6),
            "storage_cost": offer["storage_cost"],
            "reliability2": offer["reliability2"],
            "geolocation": offer["geolocation"],
            "_created": time.time(),
            "_fail_boot": fail,
            "_keys": list(self.account_keys),
            "_api_key": f"instance-secret-{iid}",
            "is_bid": bid is not None,
            "min_bid": offer["min_bid"],
            "_bid": float(bid) if bid is not None else None,
        }
        if bid is not None:
            self._set_bid(self.instances[iid], float(bid))
        self.billing.append((time.time(), iid, "stopped" if stopped else "running"))
        # The real answer carries the instance's own API key: it must never be shown.
        answer = {"new_contract": iid, "instance_api_key": self.instances[iid]["_api_key"]}
        if stopped:
            self.instances[iid].update(
                intended_status="stopped", actual_status="stopped", cur_state="stopped"
            )
            return 200, {
                "success": False,
                **answer,
                "msg": "Instance created but could not be started: resources unavailable",
            }
        return 200, {"success": True, **answer}

    def _page(self, query: dict[str, list[str]]) -> dict[str, Any]:
        limit = int(json.loads(query.get("limit", ["25"])[0]))
        ids = sorted(self.instances)
        after = query.get("after_token", [None])[0]
        start = ids.index(int(after)) + 1 if after else 0
        page = ids[start : start + limit]
        more = start + limit < len(ids)
        return {
            "instances": [self._row(self.instances[i]) for i in page],
            "next_token": str(page[-1]) if more and page else None,
            "total_instances": len(ids),
        }

    def _change(self, inst: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        if "label" in body:
            inst["label"] = body["label"]
        if body.get("state") == "stopped":
            self.billing.append((time.time(), inst["id"], "stopped"))
            inst.update(intended_status="stopped", actual_status="stopped", cur_state="stopped")
            box = self.boxes.pop(inst["id"], None)
            if box is not None:
                box.halt()  # stopping kills every process on the box at once; its disk stays
        elif body.get("state") == "running" and self._outbid(inst):
            inst["intended_status"] = "running"  # it waits for its bid to win; disk bills
        elif body.get("state") == "running":
            self.billing.append((time.time(), inst["id"], "running"))
            inst.update(
                intended_status="running",
                actual_status=None,
                cur_state="running",
                _created=time.time(),
            )
        return 200, {"success": True}


def _match(value: Any, ops: Any) -> bool:
    if not isinstance(ops, dict):
        return value == ops
    for op, raw in ops.items():
        want = _coerce(raw, value)
        if op in ("eq",) and value != want:
            return False
        if op == "neq" and value == want:
            return False
        if value is None and op in ("gt", "gte", "lt", "lte"):
            return False
        if op == "gt" and not value > want:
            return False
        if op == "gte" and not value >= want:
            return False
        if op == "lt" and not value < want:
            return False
        if op == "lte" and not value <= want:
            return False
        if op == "in" and value not in _typed(want, value):
            return False
        if op in ("notin", "nin") and value in _typed(want, value):
            return False
    return True


def _exposed_ports(env: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """ "-p HOST:CONTAINER" entries of the create env. On loopback there is no NAT, so the host
    port is the container port; Vast.ai would pick another and report it the same way."""
    out = {}
    for key in env:
        if key.startswith("-p "):
            container = key[3:].split(":")[-1].split("/")[0]
            out[f"{container}/tcp"] = [{"HostIp": "0.0.0.0", "HostPort": container}]
    return out


def _coerce(want: Any, like: Any) -> Any:
    """The SDK sends most numbers as strings ("1", "12.4"); the service compares them as numbers."""
    if isinstance(want, str) and isinstance(like, (int, float)) and not isinstance(like, bool):
        try:
            return float(want)
        except ValueError:
            return want
    return want


def _typed(values: list[Any], like: Any) -> list[Any]:
    """The SDK sends list members as strings; compare them as the field's type."""
    try:
        return [type(like)(v) for v in values] if like is not None else values
    except (TypeError, ValueError):
        return values
