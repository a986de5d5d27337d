"""A launch that fails after the create never leaves a box billing unseen.

The fake Vast.ai API creates real sshd boxes; each failure here is a real one (a box whose
Python has no torch, a box that refuses our SSH key). After each, the provider holds no
instance the user did not keep on purpose, and the message says what happened to it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abfleet.fleet.ledger import Ledger
from conftest import write_job
from sshbox import SshBox, free_port, make_keypair
from test_launch import abfleet, wait_for_state


@pytest.fixture
def tiny_job(tmp_path, tiny_model_dir):
    return write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)


def box_factory(tmp_path: Path, key: Path, python: str | None = None):
    """Boxes for the fake API, closed with it (or when their instance is destroyed)."""

    def make(instance_id: int, env: dict[str, str] | None = None) -> SshBox:
        extra = {"python": python} if python else {}
        return SshBox(
            tmp_path / f"box-{instance_id}", free_port(), key, env=env or {}, **extra
        ).start()

    return make


def test_a_box_without_torch_is_destroyed_and_the_user_is_told(
    fake_vast, tmp_path, ssh_key, tiny_job
):
    fake_vast.box_factory = box_factory(tmp_path, ssh_key, python="/usr/bin/python3")
    proc = abfleet("launch", str(tiny_job), "--yes")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [created] = [b["label"] for b in fake_vast.calls("PUT", r"/api/v0/asks/")]
    assert created.startswith("abfleet:tiny-")
    assert fake_vast.instances == {}  # destroyed at the provider: nothing bills
    [record] = Ledger().instances(include_destroyed=True)
    assert record.state == "destroyed"
    err = " ".join(proc.stderr.split())
    assert "no python with torch on this box" in err
    assert f"instance {record.instance_id} that this command created was destroyed" in err


def test_with_keep_on_failure_the_box_stays_and_its_cost_and_destroy_command_are_shown(
    fake_vast, tmp_path, ssh_key, tiny_job
):
    fake_vast.box_factory = box_factory(tmp_path, ssh_key, python="/usr/bin/python3")
    proc = abfleet("launch", str(tiny_job), "--yes", "--keep-on-failure")
    assert proc.returncode == 1
    [iid] = [str(i) for i in fake_vast.instances]
    price = fake_vast.instances[int(iid)]["dph_total"]
    err = " ".join(proc.stderr.split())
    assert f"instance {iid} is kept (--keep-on-failure) and bills {price:.3f} $/h" in err
    assert f"`abfleet destroy {iid}`" in err
    [record] = Ledger().instances()
    assert record.instance_id == iid and record.state == "active"


def test_a_box_that_refuses_our_key_is_destroyed_and_the_hint_names_the_instance(
    fake_vast, tmp_path, ssh_key, tiny_job
):
    stranger = make_keypair(tmp_path / "other-keys")  # the box only accepts this one
    fake_vast.box_factory = box_factory(tmp_path, stranger)
    proc = abfleet("launch", str(tiny_job), "--yes")
    assert proc.returncode != 0
    assert fake_vast.instances == {}
    [record] = Ledger().instances(include_destroyed=True)
    err = " ".join(proc.stderr.split())
    assert "rejected your key" in err
    assert f"abfleet attach-key {record.instance_id}" in err and "attach-key ID" not in err
    assert f"instance {record.instance_id} that this command created was destroyed" in err


def test_an_unschedulable_create_is_an_error_with_cancel_unavail_and_nothing_bills(
    fake_vast, boxes, tiny_job
):
    fake_vast.start_failures = 1
    proc = abfleet("launch", str(tiny_job), "--yes")
    assert proc.returncode == 1
    assert [b["cancel_unavail"] for b in fake_vast.calls("PUT", r"/api/v0/asks/")] == [True]
    assert fake_vast.instances == {}
    err = " ".join(proc.stderr.split())
    assert "could not start an instance from offer" in err and "nothing bills" in err
    [record] = Ledger().instances(include_destroyed=True)
    assert record.state == "create-failed"
    assert abfleet("list", "--json").stdout.strip() == "[]"


def test_a_create_answered_success_false_with_an_id_is_destroyed_and_its_key_never_shown(
    fake_vast, boxes, tiny_job
):
    fake_vast.ignore_cancel_unavail = True  # made stopped all the same: it bills its disk
    fake_vast.start_failures = 1
    proc = abfleet("launch", str(tiny_job), "--yes")
    assert proc.returncode == 1
    iid = str(fake_vast._next_id)  # the one instance the fake made
    assert fake_vast.instances == {}
    err = " ".join(proc.stderr.split())
    assert f"Vast.ai created instance {iid}" in err and "did not start it" in err
    assert f"instance {iid} that this command created was destroyed" in err
    assert "instance-secret" not in proc.stdout + proc.stderr
    [record] = Ledger().instances(include_destroyed=True)
    assert (record.instance_id, record.state) == (iid, "destroyed")
    assert abfleet("list", "--json").stdout.strip() == "[]"  # nothing pending, nothing twice


def test_a_kept_success_false_instance_can_be_destroyed_by_its_id(fake_vast, boxes, tiny_job):
    fake_vast.ignore_cancel_unavail = True
    fake_vast.start_failures = 1
    proc = abfleet("launch", str(tiny_job), "--yes", "--keep-on-failure")
    assert proc.returncode == 1
    [iid] = [str(i) for i in fake_vast.instances]
    assert f"`abfleet destroy {iid}`" in " ".join(proc.stderr.split())
    gone = abfleet("destroy", iid, "--yes", "--force")
    assert gone.returncode == 0, gone.stderr
    assert fake_vast.instances == {}


def test_one_429_on_the_create_is_checked_by_label_and_retried(fake_vast, boxes, tiny_model_dir):
    fake_vast.inject("PUT", r"/api/v0/asks/", 429, {"success": False, "error": "rate_limited"})
    proc = abfleet("create", str(tiny_model_dir), "--yes")
    assert proc.returncode == 0, proc.stderr
    assert len(fake_vast.calls("PUT", r"/api/v0/asks/")) == 2
    assert len(fake_vast.instances) == 1
    [record] = Ledger().instances()
    assert record.state == "active" and int(record.instance_id) in fake_vast.instances


def test_a_create_that_stays_rate_limited_blocks_no_later_launch(fake_vast, boxes, tiny_model_dir):
    fake_vast.inject(
        "PUT", r"/api/v0/asks/", 429, {"success": False, "error": "rate_limited"}, times=5
    )
    first = abfleet("create", str(tiny_model_dir), "--yes")
    assert first.returncode == 1
    err = " ".join(first.stderr.split())
    assert "answered 429" in err and "nothing bills" in err and "kept answering" not in err
    assert fake_vast.instances == {}
    [failed] = Ledger().instances(include_destroyed=True)
    assert failed.state == "create-failed"
    again = abfleet("create", str(tiny_model_dir), "--yes")  # at once, not in 10 minutes
    assert again.returncode == 0, again.stderr
    assert len(fake_vast.instances) == 1


def test_list_and_status_settle_a_create_that_got_no_answer(fake_vast, boxes):
    from abfleet.fleet.providers.base import CreateSpec, Requirements
    from abfleet.fleet.providers.vast import VastProvider
    from abfleet.settings import settings

    fake_vast.box_factory = None
    vast = VastProvider(settings().vast, backoff=0.01)
    ledger = Ledger()
    # A create whose answer was lost, though the instance exists ...
    lost = ledger.begin_create("vast", "abfleet:lost-answer", "r1", {"id": "101"})
    made = vast.create(
        vast.offers(Requirements("RTX_3090", 1, 20, 30))[0],
        CreateSpec("abfleet:lost-answer", "img", 30),
    )
    # ... and one that never reached Vast (old enough not to be in flight any more).
    never = ledger.begin_create("vast", "abfleet:never-made", "r2", {"id": "102"})
    ledger.update(never, created_at=1.0)

    listed = abfleet("list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["label"]: r for r in json.loads(listed.stdout)}
    assert rows["abfleet:lost-answer"]["id"] == made.id and rows["abfleet:lost-answer"]["in_ledger"]
    assert rows["abfleet:never-made"]["state"] == "create-failed"
    states = {r.key: r.state for r in Ledger().instances(include_destroyed=True)}
    assert states == {lost: "active", never: "create-failed"}
    again = {r["label"] for r in json.loads(abfleet("list", "--json").stdout)}
    assert again == {"abfleet:lost-answer"}  # shown once, then gone: nothing bills for it
    assert abfleet("status", made.id).returncode == 0


def test_list_without_an_api_key_shows_the_ledger_and_fails(
    fake_vast, boxes, tiny_job, monkeypatch, tmp_path
):
    proc = abfleet("launch", str(tiny_job), "--yes")
    assert proc.returncode == 0, proc.stderr
    [iid] = [str(i) for i in fake_vast.instances]
    monkeypatch.delenv("VAST_API_KEY")
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nohome" / ".config"))
    blind = abfleet("list")
    assert blind.returncode == 1
    assert iid in blind.stdout  # the ledger's row, its id whole
    as_json = abfleet("list", "--json")
    assert as_json.returncode == 1
    [row] = json.loads(as_json.stdout)
    assert (row["id"], row["state"], row["in_ledger"]) == (iid, "unknown", True)
    err = " ".join(blind.stderr.split())
    assert "cannot see vast instances" in err and "no Vast.ai API key" in err
    assert "ledger only" in err


def test_a_storage_password_is_written_to_no_file_of_the_run_or_the_export(
    pg_server, tmp_path, tiny_model_dir
):
    url = pg_server.new_database()
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)
    out = tmp_path / "run"
    proc = abfleet("run", str(job), "--storage", url, "--output", str(out), "--workers", "2")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert (out / "model" / "abfleet-run.json").is_file()
    secret = pg_server.password.encode()
    leaks = [p for p in out.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert leaks == []
    assert 'storage = "env"' in (out / "job.toml").read_text()
    assert pg_server.password not in proc.stdout + proc.stderr


def test_ctrl_c_after_the_create_destroys_the_box(fake_vast, boxes, tiny_job):
    fake_vast.loading_s = 30  # still booting when the user gives up
    proc = subprocess.Popen(
        [sys.executable, "-m", "abfleet", "launch", str(tiny_job), "--yes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not fake_vast.instances and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fake_vast.instances, "the launch never created its instance"
    [iid] = [str(i) for i in fake_vast.instances]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert fake_vast.instances == {}
    err = " ".join(err.split())
    assert "interrupted" in err and f"instance {iid} that this command created was destroyed" in err


def test_watch_status_and_workers_say_what_happened_to_a_finished_then_lost_box(
    fake_vast, boxes, tiny_job
):
    assert abfleet("launch", str(tiny_job), "--yes").returncode == 0
    [box] = boxes.made
    assert wait_for_state(box.root)["state"] == "done"
    [iid] = [str(i) for i in fake_vast.instances]
    assert abfleet("backup", iid).returncode == 0
    shown = abfleet("watch", iid, "--once", "--no-backup")
    assert shown.returncode == 0, shown.stderr
    assert "done" in shown.stdout and "dead" not in shown.stdout  # a worker that finished

    box.kill()  # the box stops answering
    lost = abfleet("watch", iid, "--once", "--no-backup")
    assert lost.returncode == 1 and "the box did not answer" in lost.stderr

    assert abfleet("stop", iid, "--yes", "--force").returncode == 0
    status = abfleet("status", iid)
    assert status.returncode == 0, status.stderr
    [run] = Ledger().runs()
    text = " ".join(status.stdout.split())
    assert "the box is stopped" in text and f"`abfleet resume {run.name}`" in text


def test_after_resume_the_old_box_is_offered_for_destroy_and_no_longer_blocked(
    fake_vast, boxes, tiny_job, tmp_path
):
    assert abfleet("launch", str(tiny_job), "--yes").returncode == 0
    first = boxes.made[0]
    assert wait_for_state(first.root)["state"] == "done"
    [old] = [str(i) for i in fake_vast.instances]
    [run] = Ledger().runs()
    assert abfleet("backup", old).returncode == 0
    assert abfleet("stop", old, "--yes", "--force").returncode == 0  # preempted, say

    resumed = abfleet("resume", run.name, "--trials", "3", "--yes")
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    out = " ".join(resumed.stdout.split())
    assert f"instance {old}, the old box of {run.name}, still bills" in out
    assert f"`abfleet destroy {old}`" in out
    [new] = [str(i) for i in fake_vast.instances if str(i) != old]
    assert Ledger().run(run.name).continued_by is not None

    early = abfleet("destroy", old, "--yes")
    assert early.returncode == 2 and "not downloaded" in early.stderr  # nothing came home yet

    assert wait_for_state(boxes.made[-1].root)["state"] == "done"
    got = abfleet("download", new, "--to", str(tmp_path / "model"))
    assert got.returncode == 0, got.stderr
    gone = abfleet("destroy", old, "--yes")
    assert gone.returncode == 0, gone.stderr + gone.stdout
    assert "continued as run" in gone.stdout
    assert [str(i) for i in fake_vast.instances] == [new]


def test_the_price_confirmed_is_the_price_the_instance_bills(fake_vast, boxes, tiny_job):
    """Vast prices an offer's storage for the disk a search names; abfleet names the disk it
    rents, so the $/h it shows is what the instance then costs."""
    proc = abfleet("launch", str(tiny_job), "--yes", "--disk", "200")
    assert proc.returncode == 0, proc.stderr
    [inst] = fake_vast.instances.values()
    shown = " ".join(proc.stdout.split())
    assert inst["disk_space"] == 200.0
    assert f"disk 200 GB, {inst['dph_total']:.3f} $/h" in shown
    assert inst["dph_total"] > fake_vast.offers[0]["dph_total"] + 0.03  # 200 GB is not 5 GB


def test_the_users_key_reaches_a_box_that_accepts_only_keys_given_through_the_api(
    fake_vast, boxes, tiny_job, ssh_key
):
    fake_vast.api_keys_only = True  # the key handed to the box's sshd is not enough, as on Vast
    proc = abfleet("launch", str(tiny_job), "--yes")
    assert proc.returncode == 0, proc.stderr
    ours = " ".join(Path(f"{ssh_key}.pub").read_text().split()[:2])
    assert [c["ssh_key"] for c in fake_vast.calls("POST", r"/api/v0/instances/\d+/ssh/")] == [ours]
    [box] = boxes.made
    assert (box.directory / "authorized_keys").read_text().split("\n")[:1] == [ours]


def test_in_that_mode_a_box_given_no_key_refuses_us(fake_vast, boxes):
    """The control for the test above: without the API call, the box takes no key."""
    from abfleet.fleet.providers.base import CreateSpec, Requirements
    from abfleet.fleet.providers.vast import VastProvider
    from abfleet.settings import settings

    fake_vast.api_keys_only = True
    vast = VastProvider(settings().vast, backoff=0.01)
    inst = vast.create(
        vast.offers(Requirements("RTX_3090", 1, 20, 30))[0], CreateSpec("abfleet:nokey", "img", 30)
    )
    deadline = time.monotonic() + 30
    while not vast.get(inst.id).ssh_ready and time.monotonic() < deadline:
        time.sleep(0.2)
    [box] = boxes.made
    assert (box.directory / "authorized_keys").read_text() == ""
    proc = subprocess.run(
        [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-i",
            str(box.authorized_key),
            "-p",
            str(box.port),
            "root@127.0.0.1",
            "true",
        ],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode != 0
