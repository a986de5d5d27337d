"""Download throughput at world distance: scp, single-stream rsync and abfleet's parallel
download of the same model-like folder from an sshd in its own network namespace.

    sudo python benchmarks/download_distance.py [--mb 1024] [--rtt-ms 0 100] [--streams 8]

Two links join this namespace to the box's:
- at 0 ms, a veth pair (the kernel's own path);
- with delay, a veth pair with `tc netem` half the round trip each way where the kernel has
  netem; where it has not (CONFIG_NET_SCH_NETEM unset, as on the Firecracker kernels of CI
  machines), a delay line of two TUN devices and a process that holds every packet for half the
  round trip before passing it on. Either way the TCP stacks at both ends see the full round
  trip, with real windows and congestion control.

Every tool copies the same files into an empty folder, with the same key, cipher (AES-GCM) and
host key; abfleet's time includes its sha256 check of every file. scp checks nothing, so the
table also gives scp followed by `sha256sum -c` on its copy: the same guarantee. Needs root
(namespaces).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shlex
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abfleet.fleet.remote import SshRemote, SshTarget  # noqa: E402
from abfleet.ops.transfer import download, ssh_command  # noqa: E402
from download_watch import make_model  # noqa: E402
from sshbox import SshBox, make_keypair  # noqa: E402

NS = "abf-bench-box"
VETH = ("abfb-v0", "abfb-v1", "10.231.7.1", "10.231.7.2")
TUN = ("abfb-t0", "abfb-t1", "10.231.8.1", "10.231.8.2")
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
MTU = 65000  # few, large packets: the delay line's per-packet cost stays small


def sh(*argv: str, ns: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", NS, *argv] if ns else list(argv)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def teardown() -> None:
    for dev in (VETH[0], TUN[0]):
        sh("ip", "link", "del", dev, check=False)
    sh("ip", "netns", "del", NS, check=False)


def has_netem() -> bool:
    sh("ip", "link", "add", "abfb-probe", "type", "dummy", check=False)
    ok = sh("tc", "qdisc", "add", "dev", "abfb-probe", "root", "netem", "delay", "1ms", check=False)
    sh("ip", "link", "del", "abfb-probe", check=False)
    return ok.returncode == 0


def setup_veth() -> None:
    a, b, ip_a, ip_b = VETH
    sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
    sh("ip", "link", "set", b, "netns", NS)
    sh("ip", "addr", "add", f"{ip_a}/24", "dev", a)
    sh("ip", "link", "set", a, "up")
    sh("ip", "addr", "add", f"{ip_b}/24", "dev", b, ns=True)
    sh("ip", "link", "set", b, "up", ns=True)


def set_netem(one_way_ms: float) -> None:
    a, b = VETH[:2]
    sh("tc", "qdisc", "replace", "dev", a, "root", "netem", "delay", f"{one_way_ms}ms")
    sh("tc", "qdisc", "replace", "dev", b, "root", "netem", "delay", f"{one_way_ms}ms", ns=True)


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def delay_line() -> None:
    """Run in its own process: hold each packet for the one-way delay last read from stdin
    (milliseconds, a line each), then pass it to the other end."""
    a, b = open_tun(TUN[0]), open_tun(TUN[1])
    delay = [0.0]

    def control() -> None:
        for line in sys.stdin:
            delay[0] = float(line) / 1000
            print("set", flush=True)

    def pipe(src: int, dst: int) -> None:
        held: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()

        def writer() -> None:
            while True:
                with ready:
                    while not held:
                        ready.wait()
                    due, packet = held[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with ready:
                    held.popleft()
                with contextlib.suppress(OSError):
                    os.write(dst, packet)

        threading.Thread(target=writer, daemon=True).start()
        while True:
            packet = os.read(src, MTU + 100)
            with ready:
                held.append((time.monotonic() + delay[0], packet))
                ready.notify()

    threading.Thread(target=pipe, args=(a, b), daemon=True).start()
    threading.Thread(target=pipe, args=(b, a), daemon=True).start()
    print("ready", flush=True)
    control()


def setup_tun() -> subprocess.Popen:
    t0, t1, ip0, ip1 = TUN
    for name in (t0, t1):
        sh("ip", "tuntap", "add", "dev", name, "mode", "tun")
    line = subprocess.Popen(
        [sys.executable, __file__, "--delay-line"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert line.stdout is not None
    if line.stdout.readline() != "ready\n":
        raise SystemExit("the delay line did not start")
    # Attached first, then moved: the open file stays bound to its device in the other namespace.
    sh("ip", "link", "set", t1, "netns", NS)
    sh("ip", "link", "set", t0, "mtu", str(MTU), "up")
    sh("ip", "addr", "add", ip0, "peer", ip1, "dev", t0)
    sh("ip", "link", "set", t1, "mtu", str(MTU), "up", ns=True)
    sh("ip", "addr", "add", ip1, "peer", ip0, "dev", t1, ns=True)
    return line


def set_line_delay(line: subprocess.Popen, one_way_ms: float) -> None:
    assert line.stdin is not None and line.stdout is not None
    line.stdin.write(f"{one_way_ms}\n")
    line.stdin.flush()
    line.stdout.readline()


def rtt_ms(host: str, port: int) -> float:
    """The median time of a TCP connect (SYN to SYN-ACK: one round trip), in ms."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        socket.create_connection((host, port), timeout=10).close()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def run_tools(
    host: str, port: int, key: Path, known: Path, src: Path, streams: int, repeat: int
) -> dict:
    """MB/s of each tool, copying `src` from the box into an empty folder."""
    target = SshTarget(host, port, "root", known, str(key), 10)
    remote = SshRemote(target)  # pins the host key in `known` for every tool
    remote.run(["true"])
    ssh = ssh_command(remote)
    remote.close()
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    peaks: list[int] = []  # the most streams abfleet's ramp reached, per run
    scp_opts = ["-P", str(port), *ssh[3:]]
    cases = {
        "scp": lambda dest: subprocess.run(
            ["scp", "-q", "-r", *scp_opts, f"root@{host}:{src}", str(dest)], check=True
        ),
        "rsync": lambda dest: subprocess.run(
            ["rsync", "-a", "-e", shlex.join(ssh), f"root@{host}:{src}/", f"{dest}/"], check=True
        ),
        "abfleet": lambda dest: peaks.append(
            download(lambda: SshRemote(target), str(src), dest, stream_count=streams).streams
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    checks: list[float] = []  # `sha256sum -c` after each scp: what the same guarantee costs
    for round_ in range(repeat):
        names = list(cases)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]  # no fixed order
        for name in names:
            dest = src.parent / f"got-{name}"
            shutil.rmtree(dest, ignore_errors=True)
            os.sync()  # the last run's writeback does not slow this one
            start = time.perf_counter()
            cases[name](dest)
            times[name].append(time.perf_counter() - start)
            if name == "scp":
                start = time.perf_counter()
                subprocess.run(
                    ["sha256sum", "-c", "--quiet", "MANIFEST.sha256"], cwd=dest, check=True
                )
                checks.append(time.perf_counter() - start)
            got = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
            shutil.rmtree(dest)
            if got < total:
                raise SystemExit(f"{name} copied {got} of {total} bytes")
    times["scp + sha256sum -c"] = [a + b for a, b in zip(times["scp"], checks, strict=True)]
    results: dict = {name: total / statistics.median(t) / 1e6 for name, t in times.items()}
    results["streams"] = max(peaks)
    for name, t in times.items():
        runs = ", ".join(f"{x:.1f}" for x in t)
        print(f"  {name}: {results[name]:.1f} MB/s (median of {runs} s)", flush=True)
    print(f"  abfleet's streams at most: {peaks}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=1024, help="size of the model folder")
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0, 100])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool (the median counts)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go")
    parser.add_argument("--delay-line", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.delay_line:
        delay_line()
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root: it makes a network namespace for the box")
    work = Path(tempfile.mkdtemp(prefix="abfleet-distance-", dir=args.dir))
    line = None
    box = None
    teardown()
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "link", "set", "lo", "up", ns=True)
        setup_veth()
        netem = has_netem()
        if not netem:
            line = setup_tun()
        key = make_keypair(work / "keys")
        listen = (VETH[3],) if netem else (VETH[3], TUN[3])
        box = SshBox(work / "box", 2222, key, listen=listen, wrap=["ip", "netns", "exec", NS])
        box.start()
        src = work / "model"
        make_model(src, args.mb)
        print(
            f"{args.mb} MB in {len(list(src.iterdir()))} files; {os.cpu_count()} CPUs", flush=True
        )
        rows = []
        for rtt in args.rtt_ms:
            if rtt == 0 or netem:
                host, link = VETH[3], "veth" + (" + netem" if netem and rtt else "")
                if netem:
                    set_netem(rtt / 2)
            else:
                assert line is not None
                host, link = TUN[3], "TUN delay line"
                set_line_delay(line, rtt / 2)
            measured = rtt_ms(host, 2222)
            print(f"RTT {rtt:g} ms ({link}; TCP connect {measured:.1f} ms)", flush=True)
            known = work / f"known-{rtt:g}"
            rows.append(
                (
                    rtt,
                    measured,
                    link,
                    run_tools(host, 2222, key, known, src, args.streams, args.repeat),
                )
            )
        print()
        print(
            "| RTT | link | scp MB/s | scp + sha256sum -c | rsync MB/s "
            "| abfleet MB/s (streams) | vs rsync | vs scp | vs scp + check |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for rtt, measured, link, r in rows:
            a = r["abfleet"]
            print(
                f"| {rtt:g} ms (TCP connect {measured:.1f}) | {link} | {r['scp']:.1f} "
                f"| {r['scp + sha256sum -c']:.1f} | {r['rsync']:.1f} | {a:.1f} ({r['streams']}) "
                f"| {a / r['rsync']:.2f}x | {a / r['scp']:.2f}x | {a / r['scp + sha256sum -c']:.2f}x |"
            )
        print(f"abfleet: up to {args.streams} streams; every figure includes writing to {args.dir}")
    finally:
        if box is not None:
            box.kill()
        if line is not None:
            line.kill()
        teardown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
