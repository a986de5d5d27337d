"""The box's guardian on its own: a box folder on this machine, workers that are real processes
(a stand-in `abfleet` that runs until killed, or dies at once), and the fake Vast.ai API as the
provider its stop goes to, with the instance-scoped key."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from abfleet.worker.guardian import (
    BUDGET_MARK,
    GUARD_FILE,
    LEASE_FILE,
    Guardian,
    launch_file,
)
from abfleet.worker.rundir import RunDir, pid_alive
from abfleet.worker.selfstop import BoxTerms
from fakevast import FakeVast

FAST = {
    "poll_s": 0.1,
    "hang_s": 1.0,
    "lease_s": 1.0,
    "budget_window_s": 0.6,
    "retry_first_s": 0.05,
    "retry_max_s": 0.2,
}


@pytest.fixture
def fake():
    server = FakeVast().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_process_left(tmp_path):
    """Whatever a test started from its box folder ends with it, passed or failed."""
    yield
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any(str(tmp_path) in part for part in proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _instance(fake: FakeVast, offer: int = 101) -> dict:
    status, answer = fake._create(
        offer,
        {k: "x" for k in ("client_id", "image", "label", "onstart", "runtype")}
        | {"env": {}, "disk": 10},
    )
    assert status == 200, answer
    inst = fake.instances[answer["new_contract"]]
    inst.update(actual_status="running", intended_status="running")
    return inst


def _box(
    tmp_path: Path, fake: FakeVast, inst: dict, worker: str, **terms: object
) -> tuple[Path, RunDir, dict]:
    """A box folder with one run of one worker (started here, as launch-worker.sh does)."""
    root = tmp_path / "box"
    (root / "venv" / "bin").mkdir(parents=True)
    stand_in = root / "venv" / "bin" / "abfleet"
    stand_in.write_text(worker)
    stand_in.chmod(0o755)
    run = RunDir(root / "runs" / "r1")
    run.path.mkdir(parents=True)
    url = f"{fake.url}/api/v0/instances/{inst['id']}/"
    box_terms = BoxTerms(
        instance_id=str(inst["id"]),
        rate_per_hour=3600.0,
        storage_per_hour=36.0,
        billing_since=time.time(),
        requests={
            "stop": {"method": "PUT", "url": url, "json": {"state": "stopped"}},
            "destroy": {"method": "DELETE", "url": url},
            "key_env": "CONTAINER_API_KEY",
        },
        guard=FAST,
        **terms,
    )
    (run.path / ".env").write_text("".join(f"{k}='{v}'\n" for k, v in box_terms.to_env().items()))
    launch_file(run, 0).write_text("\n")
    env = {"CONTAINER_API_KEY": inst["_api_key"], "PATH": os.environ["PATH"]}
    return root, run, env


def _start(run: RunDir, root: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(root / "venv" / "bin" / "abfleet"), "worker", "run"], start_new_session=True
    )
    run.pid_file(0).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 10
    while not pid_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the child has exec'd: before, its command line is pytest's
    return proc


def _until(guard: Guardian, check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        guard.step()
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(json.dumps(guard.state, indent=1))


RUNS_UNTIL_KILLED = "#!/bin/bash\nwhile true; do sleep 0.1; done\n"
DIES_AT_ONCE = "#!/bin/bash\nexit 3\n"


def test_a_refused_stop_is_retried_with_backoff_and_shown_until_it_goes_through(tmp_path, fake):
    inst = _instance(fake)
    root, run, env = _box(tmp_path, fake, inst, DIES_AT_ONCE, stop_after_s=0.2)
    (run.status_file(0)).write_text(json.dumps({"state": "done"}))
    fake.inject("PUT", rf"/instances/{inst['id']}/$", 429, {"success": False}, times=6)
    guard = Guardian(root, environ=env)
    _until(guard, lambda: guard.state.get("phase") == "failing")
    seen = json.loads((root / GUARD_FILE).read_text())
    assert seen["last_error"] == "the provider answered 429" and seen["attempts"] == 1
    _until(guard, lambda: guard.state.get("phase") == "done")
    assert inst["actual_status"] == "stopped"
    puts = fake.calls("PUT", rf"/instances/{inst['id']}/$")
    assert len(puts) == 7 and [m for m, *_ in fake.scoped_calls] == ["PUT"]
    done = json.loads((root / GUARD_FILE).read_text())
    assert "failing_since" not in done and "after 7 attempt(s)" in done["events"][-1][1]
    assert json.loads((run.path / "box-stop.json").read_text())["action"] == "stop"


def test_a_worker_that_dies_unfinished_is_restarted_twice_then_the_box_stops(tmp_path, fake):
    inst = _instance(fake)
    root, run, env = _box(tmp_path, fake, inst, DIES_AT_ONCE, stop_after_s=0.1)
    run.pid_file(0).write_text("999999\n")  # found dead at the guardian's start
    guard = Guardian(root, environ=env)
    _until(guard, lambda: guard.state.get("phase") == "done")
    texts = [t for _, t in guard.state["events"]]
    restarts = [t for t in texts if "started again" in t]
    # One restart for the worker found dead, then two more after crashes: then it gives up.
    assert len(restarts) == 3, texts
    assert inst["actual_status"] == "stopped"


def test_a_hung_worker_is_killed_and_started_again(tmp_path, fake):
    inst = _instance(fake)
    root, run, env = _box(tmp_path, fake, inst, RUNS_UNTIL_KILLED)
    proc = _start(run, root)
    started = time.time() - 5  # a trial running 5 s, where none took over 0.1 s
    run.status_file(0).write_text(
        json.dumps(
            {
                "pid": proc.pid,
                "state": "searching",
                "current_trial": 7,
                "current_trial_started": started,
                "slowest_trial_s": 0.1,
                "updated_at": started,
            }
        )
    )
    guard = Guardian(root, environ=env)
    assert proc.poll() is None, proc.returncode
    guard.step()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert any("no progress for" in t for _, t in guard.state["events"])
    guard.step()  # dead, unfinished: started again
    new_pid = int(run.pid_file(0).read_text())
    assert new_pid != proc.pid and guard.state["phase"] == "working"
    os.killpg(new_pid, signal.SIGKILL)


def test_the_budget_ends_the_workers_within_its_window_and_stops_the_box_without_grace(
    tmp_path, fake
):
    inst = _instance(fake)
    # 1 $ a second; a budget of 1 $; a grace period of an hour that the budget overrides.
    root, run, env = _box(
        tmp_path, fake, inst, RUNS_UNTIL_KILLED, budget_usd=1.0, stop_after_s=3600
    )
    proc = _start(run, root)
    run.status_file(0).write_text(json.dumps({"pid": proc.pid, "state": "loading"}))
    guard = Guardian(root, environ=env)
    _until(guard, lambda: (run.path / BUDGET_MARK).is_file(), timeout=5)
    mark = json.loads((run.path / BUDGET_MARK).read_text())
    assert mark["spent_usd"] >= 1.0
    guard.step()
    assert proc.poll() is None  # the workers get their window to export
    _until(guard, lambda: guard.state.get("phase") == "done", timeout=10)
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert guard.state["why"] == "budget reached" and inst["actual_status"] == "stopped"
    assert time.time() - mark["at"] < 5  # window, not the hour of grace


def test_a_lease_holds_the_box_up_and_a_stale_one_does_not(tmp_path, fake):
    inst = _instance(fake)
    root, run, env = _box(tmp_path, fake, inst, DIES_AT_ONCE, stop_after_s=0.1)
    run.status_file(0).write_text(json.dumps({"state": "done"}))
    guard = Guardian(root, environ=env)
    guard.started_at -= 100  # a guardian up for a while: no start-up hold
    (root / LEASE_FILE).write_text(json.dumps({"until": time.time() + 1.5, "at": time.time()}))
    guard.step()
    assert guard.state["phase"] == "lease" and inst["actual_status"] == "running"
    _until(guard, lambda: guard.state.get("phase") == "done", timeout=5)
    assert time.time() >= guard.state["acts_at"]

    # A lease from before this boot (the box stopped with it in place) holds nothing.
    inst["actual_status"] = "running"
    (root / LEASE_FILE).write_text(json.dumps({"until": time.time() + 3600, "at": 1.0}))
    again = Guardian(root, environ=env)
    again.started_at -= 100
    _until(again, lambda: again.state.get("phase") == "done", timeout=5)


def test_an_instance_key_stops_only_its_own_instance(tmp_path, fake):
    mine, other = _instance(fake, 101), _instance(fake, 102)
    root, run, env = _box(tmp_path, fake, other, DIES_AT_ONCE, stop_after_s=0.1)
    run.status_file(0).write_text(json.dumps({"state": "done"}))
    guard = Guardian(root, environ={**env, "CONTAINER_API_KEY": mine["_api_key"]})
    _until(guard, lambda: guard.state.get("phase") == "failing")
    assert guard.state["last_error"] == "the provider answered 404"  # Vast's auth_error
    assert other["actual_status"] == "running" and fake.scoped_calls == []
