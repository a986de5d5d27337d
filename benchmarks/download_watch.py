"""Download throughput against `scp -r` of the same folder (loopback SSH, same run), and the
cost of one `abfleet watch` refresh in milliseconds and bytes.

    python benchmarks/download_watch.py [--mb 600] [--repeat 3]

The folder is a model-like set of files (two large shards, a small one, JSON). Each method
downloads it fresh into an empty folder; abfleet's time includes its sha256 verification of
every file. Bytes of a refresh are counted on the SSH transport (both directions).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from abfleet.fleet.remote import SshRemote, SshTarget  # noqa: E402
from abfleet.job import manifest  # noqa: E402
from abfleet.ops.transfer import download, ssh_command  # noqa: E402
from sshbox import SshBox, free_port, make_keypair  # noqa: E402


def make_model(folder: Path, total_mb: int) -> None:
    sizes = {
        "model-00001-of-00003.safetensors": 0.45,
        "model-00002-of-00003.safetensors": 0.45,
        "model-00003-of-00003.safetensors": 0.09,
        "tokenizer.json": 0.01,
    }
    folder.mkdir(parents=True)
    for name, frac in sizes.items():
        with open(folder / name, "wb") as f:
            left = int(total_mb * frac * (1 << 20))
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    manifest.write(folder)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    # In memory when possible: what is compared is the transfer, and write-back of GBs to a
    # shared disk makes single runs vary by 2x.
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="abfleet-bench-dl-", dir=shm if shm.is_dir() else None))
    key = make_keypair(base / "keys")
    box = SshBox(base / "box", free_port(), key).start()
    src = box.root / "model"
    make_model(src, args.mb)
    total = sum(p.stat().st_size for p in src.iterdir())
    target = SshTarget("127.0.0.1", box.port, "root", base / "known_hosts", str(key))

    def connect() -> SshRemote:
        return SshRemote(target)

    connect().close()  # pins the host key, so scp can use the same known_hosts file
    ssh = ssh_command(connect())
    same_opts = [a for a in ssh[1:] if a != "-p" and a != str(box.port)]
    # Plain scp: the same host key and identity, but ssh's default cipher (what a user types).
    cipher = same_opts.index(next(a for a in same_opts if a.startswith("Ciphers=")))
    plain_opts = same_opts[: cipher - 1] + same_opts[cipher + 1 :]
    results: dict[str, list[float]] = {
        "scp -r": [],
        "scp -r, abfleet's cipher": [],
        "abfleet rsync": [],
        "abfleet sftp": [],
    }

    def scp(dest: Path, opts: list[str]) -> None:
        cmd = [
            "scp",
            "-q",
            "-r",
            "-P",
            str(box.port),
            *opts,
            f"root@127.0.0.1:{src}",
            str(dest),
        ]
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)

    runs = {
        "scp -r": lambda o: scp(o / "scp", plain_opts),
        "scp -r, abfleet's cipher": lambda o: scp(o / "scp-same", same_opts),
        "abfleet rsync": lambda o: download(connect, str(src), o / "rsync", prefer_rsync=True),
        "abfleet sftp": lambda o: download(connect, str(src), o / "sftp", prefer_rsync=False),
    }
    for i in range(args.repeat):
        out = base / f"out-{i}"
        out.mkdir(parents=True)
        names = list(runs)
        for name in names[i % len(names) :] + names[: i % len(names)]:  # no tool always first
            results[name].append(timed(lambda n=name, o=out: runs[n](o)))
        shutil.rmtree(out)

    print(f"\n{total / 1e6:.0f} MB in 5 files over loopback SSH, {args.repeat} runs each (median)")
    scp_median = statistics.median(results["scp -r"])
    for name, values in results.items():
        med = statistics.median(values)
        print(
            f"  {name:<26} {med:6.2f} s  {total / med / 1e6:7.1f} MB/s   x{scp_median / med:.2f} of scp"
        )

    # One watch refresh: the report on the box over an open connection, plus the skipped
    # backup check (nothing changed), measured on a finished tiny run.
    refresh = watch_refresh_cost(base, key)
    print(
        f"watch refresh: {refresh['ms']:.0f} ms, {refresh['bytes_out']} bytes sent, {refresh['bytes_in']} bytes received "
        f"(report {refresh['report_bytes']} bytes of JSON)"
    )
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "download_watch.json").write_text(
        json.dumps({"bytes": total, "seconds": results, "refresh": refresh}, indent=1)
    )
    box.close()
    shutil.rmtree(base, ignore_errors=True)


def watch_refresh_cost(base: Path, key: Path) -> dict:
    from abfleet import settings
    from abfleet.fleet.deploy import build_wheel, install, locate
    from abfleet.fleet.ledger import InstanceRecord, RunRecord
    from abfleet.ops.monitor import Session, Target
    from conftest import make_model as tiny_model
    from conftest import make_tokenizer, write_config, write_job

    os.environ["ABFLEET_DATA_DIR"] = str(base / "data")
    write_config(base / "config", key)
    os.environ["ABFLEET_CONFIG_DIR"] = str(base / "config")
    settings._load.cache_clear()
    box = SshBox(base / "watch-box", free_port(), key).start()
    try:
        model = base / "tiny"
        tok = make_tokenizer()
        tiny_model("llama", len(tok)).save_pretrained(model)
        tok.save_pretrained(model)
        run_dir = box.root / "runs" / "r"
        write_job(run_dir, str(model), n_trials=20)  # writes run_dir/job.toml and its prompts
        subprocess.run(
            [sys.executable, "-m", "abfleet", "worker", "run", "--run-dir", str(run_dir)],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        remote = SshRemote(SshTarget("127.0.0.1", box.port, "root", base / "kh2", str(key)))
        install(locate(remote), build_wheel())
        remote.close()
        rec = InstanceRecord(
            1,
            "ssh",
            f"127.0.0.1:{box.port}",
            "l",
            "r",
            "active",
            "cpu",
            1,
            0.0,
            30,
            "127.0.0.1",
            box.port,
            "root",
            str(box.root),
            time.time(),
            None,
            None,
            None,
        )
        run = RunRecord(
            "r",
            "tiny",
            str(model),
            "ssh",
            rec.instance_id,
            str(run_dir),
            str(base / "local"),
            1,
            time.time(),
            None,
            False,
            None,
            None,
        )
        session = Session(Target(rec, run))
        transport = session.remote.conn.transport  # type: ignore[attr-defined]
        from abfleet.fleet.ledger import Ledger

        ledger = Ledger()
        ledger.add_run(run)
        snap = session.snapshot()
        session.backup(ledger, snap)  # the first backup copies; later refreshes skip it
        times, sent, received, size = [], [], [], 0
        for _ in range(5):
            s0, r0 = (
                transport.packetizer._Packetizer__sent_bytes,
                transport.packetizer._Packetizer__received_bytes,
            )
            start = time.perf_counter()
            snap = session.snapshot()
            session.backup(ledger, snap)
            times.append(time.perf_counter() - start)
            sent.append(transport.packetizer._Packetizer__sent_bytes - s0)
            received.append(transport.packetizer._Packetizer__received_bytes - r0)
            size = len(json.dumps(snap))
        session.close()
        return {
            "ms": statistics.median(times) * 1000,
            "bytes_out": int(statistics.median(sent)),
            "bytes_in": int(statistics.median(received)),
            "report_bytes": size,
        }
    finally:
        box.close()


if __name__ == "__main__":
    main()
