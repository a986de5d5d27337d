"""The money paths of a rented box, end to end: real workers on real sshd boxes rented from the
fake Vast.ai API, each scenario ending with the fake's own meter showing the box stopped or
destroyed, and what it billed at its full rate after the work ended.

With ABFLEET_BILLING_TABLE=FILE, each scenario appends a row (what the user saw, $ billed
after the work ended) to FILE: the table of the guardian's closing note.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abfleet.fleet.ledger import Ledger
from abfleet.worker.rundir import FINAL_STATES
from conftest import write_config, write_job
from test_launch import abfleet, wait_for_state

MARGIN_S = 20  # the guardian looks every 0.5 s here; boots, SSH and a loaded CI machine add up


def _guardian(root: Path) -> dict:
    try:
        return json.loads((root / "guardian.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait(check, timeout: float = 240, every: float = 0.3, fake=None, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fake is not None:
            fake.advance()
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what or check}")


def _stopped_at(fake, iid: int) -> float | None:
    ends = [at for at, i, state in fake.billing if i == iid and state in ("stopped", "destroyed")]
    return ends[-1] if ends and not fake.gpu_billing(iid) else None


def _work_ended(root: Path) -> float:
    """When the last worker of the box reached its final state (its status file says)."""
    ends = []
    for path in root.rglob("status-*.json"):
        status = json.loads(path.read_text())
        if status.get("state") in FINAL_STATES:
            ends.append(status["updated_at"])
    return max(ends)


def _after_work(fake, iid: int, since: float) -> tuple[float, float]:
    """(seconds, $) the instance billed its full rate after `since`, by the fake's meter."""
    seconds = fake.gpu_seconds_after(iid, since)
    return seconds, seconds * fake.rates[iid] / 3600


def _table(scenario: str, saw: str, seconds: float, usd: float, limit: str) -> None:
    out = os.environ.get("ABFLEET_BILLING_TABLE")
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(f"| {scenario} | {saw} | {seconds:.1f} s, {usd:.5f} $ | {limit} |\n")


def _launch(job: Path, *flags: str) -> int:
    proc = abfleet("launch", str(job), "--yes", *flags)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return int(Ledger().instances()[-1].instance_id or 0)


def _searching(root: Path, trials: int = 3) -> dict:
    def ready():
        for path in root.rglob("status-0.json"):
            status = json.loads(path.read_text())
            if status.get("state") == "searching" and status.get("trials_here", 0) >= trials:
                return status
        return None

    return _wait(ready, what="the search under way")


def _study(root: Path) -> sqlite3.Connection:
    [db] = root.glob("runs/*/study.db")
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def _complete_numbers(root: Path) -> set[int]:
    with _study(root) as db:
        rows = db.execute("SELECT number FROM trials WHERE state = 'COMPLETE'").fetchall()
    return {n for (n,) in rows}


def test_a_stop_answered_429_six_times_is_retried_and_shown_until_the_box_stops(
    meter, boxes, tmp_path, tiny_model_dir
):
    fake = meter
    # Every stop of an instance answers 429 (asking for 3 s) six times: the box's own too.
    fake.inject(
        "PUT",
        r"/api/v0/instances/\d+/$",
        429,
        {"success": False, "error": "rate_limited"},
        times=6,
        headers={"Retry-After": "3"},
    )
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)
    iid = _launch(job, "--stop-after", "1s")
    root = boxes.made[0].root
    _wait(lambda: _guardian(root).get("phase") == "failing", what="a failing self-stop")
    status = abfleet("status", str(iid), env={"COLUMNS": "250"})
    out = " ".join(status.stdout.split())
    assert status.returncode == 1, status.stdout + status.stderr
    assert "self-stop failing since" in out and "the provider answered 429" in out
    assert f"`abfleet stop {iid}`" in out
    listed = abfleet("list", env={"COLUMNS": "250"})
    assert "self-stop failing since" in " ".join(listed.stdout.split())
    stopped = _wait(lambda: _stopped_at(fake, iid), fake=fake, what="the stop")
    assert len(fake.calls("PUT", rf"/api/v0/instances/{iid}/$")) == 7
    ended = _work_ended(root)
    seconds, usd = _after_work(fake, iid, ended)
    assert seconds <= 1 + 6 * 3 + MARGIN_S  # grace, six waits of Retry-After, a margin
    assert stopped - ended >= 1 + 5 * 3  # it did wait as asked, not hammer the API
    # The stop that went through killed the guardian with the box: its record ends at the 6th.
    events = " ".join(t for _, t in _guardian(root)["events"])
    assert "attempt 6, next in 3 s" in events
    _table(
        "stop answered 429 six times",
        "`status` exit 1: self-stop failing since HH:MM: 429, with `abfleet stop ID`; `list` note",
        seconds,
        usd,
        "grace 1 s",
    )


def _done_and_stopped(fake, iid: int, root: Path) -> list[str]:
    """The run ends and the box stops itself; the guardian's events."""
    assert wait_for_state(root, timeout=300)["state"] == "done"
    _wait(lambda: _stopped_at(fake, iid), fake=fake, what="the stop")
    return [t for _, t in _guardian(root)["events"]]


def _billed_within_grace(fake, iid: int, root: Path, scenario: str, saw: str) -> None:
    seconds, usd = _after_work(fake, iid, _work_ended(root))
    assert seconds <= 1 + MARGIN_S
    _table(scenario, saw, seconds, usd, "grace 1 s")


def test_a_lead_worker_killed_mid_search_is_restarted_and_the_box_stops(
    meter, boxes, tmp_path, tiny_model_dir
):
    fake = meter
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=30)
    iid = _launch(job, "--stop-after", "1s")
    root = boxes.made[0].root
    status = _searching(root)
    before = _complete_numbers(root)
    os.kill(status["pid"], signal.SIGKILL)  # as the kernel's OOM killer would
    events = " ".join(_done_and_stopped(fake, iid, root))
    after = _complete_numbers(root)
    assert before <= after and len(after) == 30  # no completed trial lost, the run finished
    assert "worker 0 was gone (searching); started again" in events
    _billed_within_grace(
        fake,
        iid,
        root,
        "lead worker SIGKILLed mid-search",
        "worker restarted by the guardian; run done (30/30), box stopped",
    )


def test_a_hung_worker_is_killed_its_trial_rerun_and_the_box_stops(
    meter, boxes, ssh_key, isolated_home, tmp_path, tiny_model_dir
):
    fake = meter
    write_config(isolated_home / "config", ssh_key, fake.url, guard={"hang_s": 6})
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=20)
    iid = _launch(job, "--stop-after", "1s")
    root = boxes.made[0].root
    status = _searching(root)
    os.kill(status["pid"], signal.SIGSTOP)  # hung: alive, its heartbeat thread stopped too
    events = " ".join(_done_and_stopped(fake, iid, root))
    assert "made no progress for" in events and "started again" in events
    with _study(root) as db:
        states = dict(db.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
    assert states.get("COMPLETE") == 20 and "RUNNING" not in states
    _billed_within_grace(
        fake,
        iid,
        root,
        "worker hung (SIGSTOP) mid-trial",
        "killed after 6 s without progress, restarted, trial re-run; run done, box stopped",
    )


def test_a_container_restart_mid_search_continues_the_run_and_stops_the_box(
    meter, boxes, tmp_path, tiny_model_dir
):
    fake = meter
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=30)
    iid = _launch(job, "--stop-after", "1s")
    root = boxes.made[0].root
    _searching(root)
    before = _complete_numbers(root)
    fake.restart(iid)  # every process of the box dies; it boots again and reruns onstart
    _wait(lambda: fake.instances[iid]["actual_status"] == "running", fake=fake, what="boot")
    events = _done_and_stopped(fake, iid, root)
    after = _complete_numbers(root)
    assert before <= after and len(after) == 30
    assert sum("guardian started" in t for t in events) == 2
    assert any("worker 0 was gone" in t and "started again" in t for t in events)
    _billed_within_grace(
        fake,
        iid,
        root,
        "container restarted mid-search",
        f"onstart re-armed the guardian, which restarted the worker; {len(before)} trials kept, "
        "run done (30/30), box stopped",
    )


@pytest.mark.parametrize("stop_after", ["1h", "0"])
def test_the_budget_stops_a_box_whose_work_is_over_grace_or_not(
    meter, boxes, tmp_path, tiny_model_dir, stop_after
):
    fake = meter
    created = abfleet("create", str(tiny_model_dir), "--yes")
    assert created.returncode == 0, created.stderr + created.stdout
    [iid] = list(fake.instances)
    assert abfleet("setup", str(iid)).returncode == 0
    [rec] = Ledger().instances()
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)
    budget = rec.price_per_hour * 50 / 3600  # 50 s from the submit: after the work is over
    submitted = time.time()
    sub = abfleet(
        "submit", str(iid), str(job), "--budget", f"{budget:.8f}", "--stop-after", stop_after
    )
    assert sub.returncode == 0, sub.stderr + sub.stdout
    root = boxes.made[0].root
    assert wait_for_state(root, timeout=120)["state"] == "done"
    ended = _work_ended(root)
    assert ended - submitted < 45, "the run must end before its budget for this test"
    phase = _wait(lambda: _guardian(root).get("phase"), what="the guardian")
    assert phase in ("grace", "kept", "working")
    stopped = _wait(lambda: _stopped_at(fake, iid), fake=fake, what="the stop")
    # The budget counted from this submit (not the box's create): it stops at 50 s, not later.
    assert 50 - 2 <= stopped - submitted <= 50 + MARGIN_S
    [record] = [json.loads(p.read_text()) for p in root.rglob("box-stop.json")]
    assert record["why"] == "budget reached"
    seconds, usd = _after_work(fake, iid, ended)
    _table(
        f"budget reached after the work ended, --stop-after {stop_after}",
        "box stopped at the budget (`status`: budget reached)",
        seconds,
        usd,
        "the budget (50 s after submit)",
    )


def _finished_and_stopped(fake, boxes, job: Path, *flags: str) -> tuple[int, Path]:
    iid = _launch(job, "--stop-after", "1s", *flags)
    root = boxes.made[0].root
    assert wait_for_state(root, timeout=300)["state"] == "done"
    _wait(lambda: _stopped_at(fake, iid), fake=fake, what="the self-stop")
    return iid, root


def test_a_controller_killed_during_a_download_leaves_the_box_to_its_lease(
    meter, boxes, tmp_path, tiny_model_dir
):
    fake = meter
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)
    iid, root = _finished_and_stopped(fake, boxes, job)
    proc = subprocess.Popen(
        [sys.executable, "-m", "abfleet", "download", str(iid), "--to", str(tmp_path / "got")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    _wait(lambda: (root / "lease.json").is_file(), every=0.01, fake=fake, what="the lease")
    proc.kill()  # the controller dies mid-download: nothing on this side stops the box
    killed = time.time()
    proc.wait(timeout=30)
    assert fake.gpu_billing(iid)
    lease = json.loads((root / "lease.json").read_text())
    stopped = _wait(lambda: _stopped_at(fake, iid), fake=fake, what="the stop at the lease's end")
    assert stopped >= lease["until"] - 1 and stopped - killed <= 15 + MARGIN_S
    seconds, usd = _after_work(fake, iid, killed)
    _table(
        "controller SIGKILLed during a download of a box it woke",
        "the box stopped itself when the download's lease (15 s here, 10 min by default) ran out",
        seconds,
        usd,
        "the lease (15 s)",
    )

    # Ctrl+C instead: the download itself stops the box again, at once, and says so.
    again = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "abfleet", "download", str(iid), "--to", str(tmp_path / "got2")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    _wait(lambda: _lease_at(root) >= again, every=0.01, fake=fake, what="the new lease")
    proc.send_signal(signal.SIGINT)
    interrupted = time.time()
    out = " ".join(proc.communicate(timeout=120)[0].split())
    assert proc.returncode != 0 and f"instance {iid} is stopped again" in out, out
    assert not fake.gpu_billing(iid)
    seconds, usd = _after_work(fake, iid, interrupted)
    assert seconds < 15  # well before the lease would have run out
    said = re.search(r"instance \d+ is stopped again[^.;]*", out)
    _table("Ctrl+C during a download of a box it woke", said[0] if said else out, seconds, usd, "-")


def _lease_at(root: Path) -> float:
    """When the lease on the box was written (0 without one)."""
    try:
        return float(json.loads((root / "lease.json").read_text())["at"])
    except (OSError, ValueError, KeyError):
        return 0.0


def test_every_download_failure_after_the_wake_stops_the_box_again(
    meter, boxes, tmp_path, tiny_model_dir
):
    fake = meter
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)
    iid, root = _finished_and_stopped(fake, boxes, job)
    dest = tmp_path / "got"

    def attempt(*flags: str) -> str:
        woke = time.time()
        got = abfleet("download", str(iid), "--to", str(dest), *flags)
        assert got.returncode != 0, got.stdout
        out = " ".join((got.stdout + got.stderr).split())
        assert f"instance {iid} is stopped again" in out, out
        assert not fake.gpu_billing(iid)
        seconds, usd = _after_work(fake, iid, woke)
        return out, seconds, usd

    # The study on the box unreadable before any backup: the guard refuses the destroy.
    [db] = root.glob("runs/*/study.db")
    good = db.read_bytes()
    db.write_bytes(b"not a database")
    out, seconds, usd = attempt("--then-destroy", "--yes")
    assert "the study backup failed" in out and "refusing to destroy" in out
    assert "the study was never backed up" in out
    _table("download --then-destroy, backup failed, guard refused", out[-90:], seconds, usd, "-")

    # --then-destroy asked now, with no terminal to confirm on (as a mistyped id): declined.
    db.write_bytes(good)
    out, seconds, usd = attempt("--then-destroy")
    assert "refusing to destroy without confirmation" in out
    assert iid in fake.instances
    _table("download --then-destroy, confirmation refused", out[-90:], seconds, usd, "-")

    # The box comes up but refuses abfleet's SSH key: the wait for it fails.
    fake.api_keys_only = True
    fake.instances[iid]["_keys"] = []
    out, seconds, usd = attempt()
    assert "rejected" in out or "Permission denied" in out or "authentication" in out.lower()
    _table("download, SSH refused right after the wake", out[-90:], seconds, usd, "-")


def _two_boxes(
    isolated_home, tmp_path, tiny_model_dir, *flags: str, env=None, n_trials: int = 6
) -> tuple[list[int], str]:
    """A 2-box launch (Postgres on the first, grace 1 s) with `flags`; (instance ids, output)."""
    from sshbox import free_port

    pg_port = free_port()
    config = isolated_home / "config" / "config.toml"
    config.write_text(
        config.read_text().replace("[vast]\n", f"[vast]\npostgres_port = {pg_port}\n")
    )
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=n_trials)
    proc = abfleet(
        "launch",
        str(job),
        "--instances",
        "2",
        "--storage",
        "head",
        "--yes",
        "--stop-after",
        "1s",
        *flags,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return [int(i) for i in Ledger().runs()[0].instances], " ".join(proc.stdout.split())


def test_two_boxes_with_then_destroy_both_stop_and_the_download_destroys_both(
    meter, boxes, ssh_key, isolated_home, tmp_path, tiny_model_dir
):
    fake = meter
    ids, _ = _two_boxes(isolated_home, tmp_path, tiny_model_dir, "--then-destroy")
    head, other = boxes.made[:2]
    assert wait_for_state(head.root, timeout=300)["state"] == "done"
    for iid in ids:
        _wait(lambda iid=iid: _stopped_at(fake, iid), fake=fake, what=f"{iid} stopped")
    ended = max(_work_ended(head.root), _work_ended(other.root))
    got = abfleet("download", str(ids[0]), "--to", str(tmp_path / "got"))
    assert got.returncode == 0, got.stderr + got.stdout
    for iid in ids:
        assert f"destroyed instance {iid}" in got.stdout
        assert iid not in fake.instances
    assert (tmp_path / "got" / "MANIFEST.sha256").is_file()
    for iid in ids:
        seconds, usd = _after_work(fake, iid, ended)
        _table(
            f"2 boxes, --then-destroy: instance {'head' if iid == ids[0] else 'worker'}",
            "both stopped themselves; `download` woke the head, verified, destroyed both",
            seconds,
            usd,
            "grace 1 s + the download",
        )


def test_two_boxes_pushed_with_then_destroy_destroy_themselves(
    meter, boxes, isolated_home, tmp_path, tiny_model_dir
):
    from fakehub import TOKEN, FakeHub

    fake = meter
    with FakeHub(tmp_path / "hub") as hub:
        # The boxes reach the stand-in Hub; the token goes only through the run's env file.
        made = fake.box_factory
        fake.box_factory = lambda iid, env: made(
            iid, env={**env, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}
        )
        env = {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}
        ids, said = _two_boxes(
            isolated_home,
            tmp_path,
            tiny_model_dir,
            "--then-destroy",
            "--push-to-hub",
            "team/two-boxes",
            env=env,
        )
        # The write token goes only to the box that pushes, and leaves it with the run.
        assert said.count("HF_TOKEN goes to") == 1 and "for the push to team/two-boxes" in said
        head, other = boxes.made[:2]
        assert wait_for_state(head.root, timeout=300)["state"] == "done"
        for iid in ids:
            _wait(lambda iid=iid: iid not in fake.instances, fake=fake, what=f"{iid} destroyed")
        ended = max(_work_ended(head.root), _work_ended(other.root))
        assert "team/two-boxes" in hub.state.repos
        for box in (head, other):
            [env_file] = box.root.glob("runs/*/.env")
            assert TOKEN not in env_file.read_text() and "ABFLEET_BOX_TERMS" in env_file.read_text()
            assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    listed = abfleet("list", "--json")
    assert json.loads(listed.stdout) == []  # both seen gone, as destroyed: nothing bills
    for iid in ids:
        seconds, usd = _after_work(fake, iid, ended)
        assert seconds <= 1 + MARGIN_S + 60  # grace, and the head's wait for the other box
        _table(
            f"2 boxes, --push-to-hub --then-destroy: {'head' if iid == ids[0] else 'worker'}",
            "pushed and verified on the head; each box destroyed itself; `list` empty",
            seconds,
            usd,
            "grace 1 s",
        )
