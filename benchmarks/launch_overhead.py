"""Controller overhead of `abfleet launch` on the fake Vast.ai provider, and wheel shipping time.

A real `abfleet launch` (subprocess, no terminal, --yes) against the fake Vast API from tests/,
whose instance becomes a real sshd on loopback; a tiny model, so model time is small, and it is
subtracted anyway: overhead = (first trial complete - launch start) - (worker's model load,
directions and baseline) - (first trial's own seconds) - (the fake's simulated boot time).

Then, step by step on a fresh box: wheel build (cold and cached), upload, install (venv + pip),
version check.

    python benchmarks/launch_overhead.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from conftest import make_model, make_tokenizer, write_config, write_job  # noqa: E402
from fakevast import API_KEY, FakeVast  # noqa: E402
from sshbox import SshBox, free_port, make_keypair  # noqa: E402


def log_time(line: str) -> float:
    stamp = line[:23]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def one_launch(base: Path, key: Path, job: Path) -> dict:
    boxes: list[SshBox] = []

    def factory(iid: int) -> SshBox:
        box = SshBox(base / f"box-{iid}", free_port(), key).start()
        boxes.append(box)
        return box

    fake = FakeVast(factory).start()
    boot = fake.created_s + fake.loading_s
    cfg = base / "config"
    write_config(cfg, key, fake.url)
    env = dict(
        os.environ,
        ABFLEET_CONFIG_DIR=str(cfg),
        ABFLEET_DATA_DIR=str(base / "data"),
        VAST_API_KEY=API_KEY,
    )
    try:
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "abfleet", "launch", str(job), "--yes"],
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        returned = time.time()
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        box = boxes[0]
        deadline = time.time() + 300
        logs: list[Path] = []
        while time.time() < deadline:
            logs = list(box.root.rglob("worker-0.log"))
            if logs and "trial 0:" in logs[0].read_text():
                break
            time.sleep(0.2)
        log = logs[0]
        lines = log.read_text().splitlines()
        t_loading = log_time(next(x for x in lines if "phase loading" in x))
        t_search = log_time(next(x for x in lines if "phase searching" in x))
        trial_line = next(x for x in lines if "trial 0:" in x)
        t_trial = log_time(trial_line)
        trial_s = float(re.search(r", ([0-9.]+)s \(", trial_line)[1])
        model_s = t_search - t_loading
        total = t_trial - started
        return {
            "launch_returned_s": round(returned - started, 2),
            "to_first_trial_s": round(total, 2),
            "model_s": round(model_s, 2),
            "trial0_s": round(trial_s, 2),
            "boot_simulated_s": round(boot, 2),
            "overhead_s": round(total - model_s - trial_s - boot, 2),
        }
    finally:
        fake.stop()


def shipping(base: Path, key: Path) -> dict:
    from abfleet.fleet import deploy, settings
    from abfleet.fleet.remote import SshRemote, SshTarget

    os.environ["ABFLEET_CONFIG_DIR"] = str(base / "config")
    os.environ["ABFLEET_DATA_DIR"] = str(base / "data")
    write_config(base / "config", key)
    settings._load.cache_clear()
    from abfleet.buildinfo import source_hash
    from abfleet.paths import cache_dir

    shutil.rmtree(cache_dir() / "wheels" / source_hash(), ignore_errors=True)
    t = time.perf_counter()
    wheel = deploy.build_wheel()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    deploy.build_wheel()
    warm = time.perf_counter() - t
    box = SshBox(base / "ship-box", free_port(), key).start()
    try:
        remote = SshRemote(SshTarget("127.0.0.1", box.port, "root", base / "kh", str(key)))
        t = time.perf_counter()
        b = deploy.locate(remote)
        t_locate = time.perf_counter() - t
        t = time.perf_counter()
        remote.put(wheel, f"{b.root}/wheels/{wheel.name}")
        upload = time.perf_counter() - t
        t = time.perf_counter()
        version = deploy.install(b, wheel).version
        install = time.perf_counter() - t
        t = time.perf_counter()
        version_again = deploy.install(
            b, wheel
        ).version  # a second setup: this build is already there
        reinstall = time.perf_counter() - t
        remote.close()
    finally:
        box.close()
    return {
        "wheel": wheel.name,
        "wheel_kb": round(wheel.stat().st_size / 1024, 1),
        "build_cold_s": round(cold, 2),
        "build_cached_s": round(warm, 4),
        "locate_s": round(t_locate, 2),
        "upload_s": round(upload, 3),
        "install_fresh_box_s": round(install, 2),
        "install_again_s": round(reinstall, 2),
        "version_matches": version == version_again,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="abfleet-bench-launch-"))
    key = make_keypair(base / "keys")
    model = base / "tiny"
    tok = make_tokenizer()
    make_model("llama", len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    job = write_job(base / "job", str(model), n_trials=1)

    ship = shipping(base / "ship", key)
    runs = [one_launch(base / f"launch-{i}", key, job) for i in range(args.repeat)]
    print(
        f"\nwheel {ship['wheel']} ({ship['wheel_kb']} KB): build {ship['build_cold_s']} s cold, "
        f"{ship['build_cached_s']} s cached; upload {ship['upload_s']} s; install on a fresh box "
        f"{ship['install_fresh_box_s']} s (venv + pip + version check), again {ship['install_again_s']} s"
    )
    print(
        f"{'run':<5}{'launch returns':>16}{'first trial':>13}{'model':>8}{'trial 0':>9}{'boot (fake)':>13}{'overhead':>10}"
    )
    for i, r in enumerate(runs):
        print(
            f"{i:<5}{r['launch_returned_s']:>16}{r['to_first_trial_s']:>13}{r['model_s']:>8}{r['trial0_s']:>9}"
            f"{r['boot_simulated_s']:>13}{r['overhead_s']:>10}"
        )
    med = statistics.median(r["overhead_s"] for r in runs)
    print(
        f"median controller overhead, launch to first finished trial, model time excluded: {med:.1f} s"
    )
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch_overhead.json").write_text(
        json.dumps({"shipping": ship, "launches": runs}, indent=1)
    )
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
