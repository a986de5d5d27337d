"""Provisioning through the CLI: the fake Vast.ai API, real sshd boxes, the real worker."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abfleet.fleet.ledger import Ledger
from abfleet.fleet.remote import SshRemote, SshTarget, known_hosts_file
from conftest import write_job


def abfleet(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "abfleet", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,  # no terminal: what a script or CI sees
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def wait_for_state(box_root: Path, wanted=("done", "failed"), timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in box_root.rglob("status-0.json"):
            data = json.loads(path.read_text())
            if data.get("state") in wanted:
                return data
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-2000:] for p in box_root.rglob("worker-0.*"))
    raise AssertionError(f"worker did not finish:\n{logs}")


@pytest.fixture
def tiny_job(tmp_path, tiny_model_dir):
    return write_job(tmp_path / "job", str(tiny_model_dir), n_trials=3)


def test_launch_on_the_fake_provider_runs_the_worker_to_the_end(fake_vast, boxes, tiny_job):
    proc = abfleet("launch", str(tiny_job), "--yes")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "launched run tiny-" in proc.stdout
    [box] = boxes.made
    status = wait_for_state(box.root)
    assert status["state"] == "done" and status["trials_here"] == 3
    [model_dir] = box.root.glob("runs/*/model")
    assert (model_dir / "MANIFEST.sha256").is_file() and (model_dir / "abfleet-run.json").is_file()

    [record] = Ledger().instances()
    [instance_id] = [str(i) for i in fake_vast.instances]
    assert (
        record.instance_id == instance_id and record.state == "active" and record.provider == "vast"
    )
    assert record.label.startswith("abfleet:tiny-") and record.remote_root == str(box.root)
    [run] = Ledger().runs()
    assert run.instance_id == instance_id and run.remote_dir.startswith(str(box.root))
    # The controller pinned the box's host key in abfleet's own known_hosts, per instance.
    assert known_hosts_file("vast", instance_id).is_file()
    # The Vast key never reached the box.
    assert not any(
        "fake-vast-key" in p.read_text(errors="ignore")
        for p in box.root.rglob("*")
        if p.is_file() and p.stat().st_size < 1e6
    )

    listed = abfleet("list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["in_ledger"], r["state"]) for r in rows] == [(instance_id, True, "running")]


def test_without_yes_and_without_a_terminal_nothing_is_created(fake_vast, tiny_job):
    proc = abfleet("launch", str(tiny_job))
    assert proc.returncode == 3
    assert "refusing to create" in proc.stderr and "--yes" in proc.stderr
    assert fake_vast.instances == {} and fake_vast.calls("PUT", r"/api/v0/asks/") == []
    assert Ledger().instances(include_destroyed=True) == []


def test_list_flags_instances_missing_from_the_ledger_and_vanished_ones(fake_vast, boxes, tiny_job):
    fake_vast.box_factory = None
    from abfleet.fleet.providers.vast import VastProvider
    from abfleet.settings import settings

    vast = VastProvider(settings().vast, backoff=0.01)
    stray = vast.create(
        vast.offers(
            __import__("abfleet.fleet.providers.base", fromlist=["x"]).Requirements(
                "RTX_3090", 1, 20, 30
            )
        )[0],
        __import__("abfleet.fleet.providers.base", fromlist=["x"]).CreateSpec(
            "someone-else", "img", 30
        ),
    )
    ledger = Ledger()
    key = ledger.begin_create("vast", "abfleet:gone", "r", {"id": "1"})
    ledger.finish_create(key, "4242")
    rows = {r["id"]: r for r in json.loads(abfleet("list", "--json").stdout)}
    assert rows[stray.id]["in_ledger"] is False and rows[stray.id]["note"].startswith(
        "NOT IN LEDGER"
    )
    assert rows["4242"]["note"].startswith("vanished")
    text = abfleet("list").stdout
    assert "bills but abfleet did not create it" in text


def test_launch_through_the_ssh_provider_with_shell_metacharacters(
    ssh_config, ssh_key, boxes, tmp_path, tiny_model_dir
):
    """A model folder, a job folder and a system prompt that would each create a file if any
    shell ever ran them: the run completes and no file appears (here, on the box, in its home)."""
    box = boxes("meta")
    evil = "m$(touch PWNED1)';touch PWNED2;`touch PWNED3`\"&& touch PWNED4"
    model = tmp_path / evil
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    job = write_job(tmp_path / "job $(touch PWNED5)", str(model), n_trials=2)
    job.write_text(
        job.read_text().replace(
            'name = "tiny"', 'name = "tiny"\nsystem_prompt = "$(touch PWNED6) `touch PWNED7`"'
        )
    )
    proc = abfleet(
        "launch",
        str(job),
        "--provider",
        "ssh",
        "--host",
        f"root@127.0.0.1:{box.port}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    status = wait_for_state(box.root)
    assert status["state"] == "done"
    assert list(tmp_path.rglob("PWNED*")) == []  # the boxes' workspaces and homes are in tmp_path
    [record] = Ledger().instances()  # the ssh provider registered the machine in the ledger
    assert (record.provider, record.instance_id) == ("ssh", f"127.0.0.1:{box.port}")

    # The layer everything goes through: an argument comes back exactly as it was sent.
    remote = SshRemote(
        SshTarget("127.0.0.1", box.port, "root", known_hosts_file("ssh", "meta"), str(ssh_key))
    )
    try:
        out = remote.run(["printf", "%s", evil]).stdout
        in_home = remote.run(["ls", "-a"]).stdout
    finally:
        remote.close()
    assert out == evil and "PWNED" not in in_home and list(tmp_path.rglob("PWNED*")) == []


def test_disk_below_the_sizing_figure_is_refused_before_anything_is_created(fake_vast, tiny_job):
    proc = abfleet("launch", str(tiny_job), "--yes", "--disk", "10")
    assert proc.returncode == 2
    assert "--disk 10 GB is below the 30 GB" in proc.stderr
    assert fake_vast.instances == {}


def test_a_box_without_enough_free_disk_does_not_start_the_job(
    ssh_config, boxes, tmp_path, tiny_model_dir
):
    """A model whose weights claim ~100B parameters: the box's real free disk is too small."""
    box = boxes("small-disk")
    model = tmp_path / "huge"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (model / f.name).write_bytes(f.read_bytes())
    header = json.dumps(
        {"w": {"dtype": "BF16", "shape": [100_000, 1_000_000], "data_offsets": [0, 0]}}
    ).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    job = write_job(tmp_path / "job", str(model))
    proc = abfleet("launch", str(job), "--provider", "ssh", "--host", f"root@127.0.0.1:{box.port}")
    assert proc.returncode == 2, proc.stderr
    assert "GB free" in proc.stderr and "this job needs 405.0 GB" in proc.stderr  # 2 x 200 GB + 5
    assert not list(box.root.rglob("worker-0.pid")) and not list(box.root.rglob("model-src"))


def test_unreachable_ssh_fails_clearly_within_its_timeout(ssh_config, tiny_job, tmp_path):
    from sshbox import free_port

    closed = free_port()
    proc = abfleet(
        "launch", str(tiny_job), "--provider", "ssh", "--host", f"root@127.0.0.1:{closed}"
    )
    assert proc.returncode == 1
    assert f"cannot reach root@127.0.0.1:{closed}" in proc.stderr
    # A port that accepts but never speaks (a hung box): the configured timeout, then one line.
    import socket

    from conftest import write_config

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    write_config(
        ssh_config.parent, Path(os.environ.get("HOME", "/root")) / "nokey", connect_timeout_s=2
    )
    started = time.monotonic()
    try:
        proc = abfleet(
            "launch",
            str(tiny_job),
            "--provider",
            "ssh",
            "--host",
            f"root@127.0.0.1:{port}",
            timeout=60,
        )
    finally:
        silent.close()
    assert proc.returncode == 1 and "no SSH greeting within 2 s" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 20


def test_a_key_the_box_does_not_accept_is_explained(ssh_config, boxes, tiny_job, tmp_path):
    from conftest import write_config
    from sshbox import make_keypair

    box = boxes("wrong-key")
    other = make_keypair(tmp_path / "other-keys")
    write_config(ssh_config.parent, other)
    proc = abfleet(
        "launch", str(tiny_job), "--provider", "ssh", "--host", f"root@127.0.0.1:{box.port}"
    )
    assert proc.returncode == 1
    assert "rejected your key" in proc.stderr and "not attached to this instance" in proc.stderr
    other.chmod(0o644)
    proc = abfleet(
        "launch", str(tiny_job), "--provider", "ssh", "--host", f"root@127.0.0.1:{box.port}"
    )
    assert "too open: chmod 600" in proc.stderr


def test_unknown_instance_id_and_bad_vast_key(fake_vast, tiny_model_dir):
    proc = abfleet("setup", "424242")
    assert proc.returncode == 2 and "unknown instance 424242" in proc.stderr
    proc = abfleet("offers", str(tiny_model_dir), env={"VAST_API_KEY": "wrong"})
    assert proc.returncode == 1 and "Vast.ai rejected the API key" in proc.stderr
    proc = abfleet("offers", str(tiny_model_dir), "--max-price", "0.05")
    assert proc.returncode == 1 and "dph_total<=0.05" in proc.stderr
    proc = abfleet("offers", str(tiny_model_dir))
    disk = fake_vast.calls("POST", "/api/v0/bundles/")[-1]["allocated_storage"]
    price = fake_vast.price(fake_vast.offers[0], disk)
    assert proc.returncode == 0 and f"{price:.3f}" in proc.stdout
