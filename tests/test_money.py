"""Money on screen and on the box: the spend meter, the box's budget, its self-stop and wake-up.

The meter and the box terms are checked on their own first (hand-computed figures); then a real
worker on a real sshd box, rented from the fake Vast.ai API, stops itself once its work is over,
is started again by `download`, and a budget ends a search with its best trial exported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from abfleet.fleet.ledger import Ledger
from abfleet.fleet.plan import parse_duration
from abfleet.fleet.spend import instance_spend
from abfleet.worker.rundir import RunDir
from abfleet.worker.selfstop import BoxTerms, container_value
from conftest import write_job
from test_launch import abfleet, wait_for_state

# -- the meter --------------------------------------------------------------------------------


def _instance(ledger: Ledger, created_at: float, price: float = 3.6, storage: float = 0.36) -> str:
    key = ledger.begin_create(
        "vast", "abfleet:x", None, {"price_per_hour": price, "storage_per_hour": storage}
    )
    ledger.finish_create(key, "77")
    ledger.update(key, created_at=created_at)
    return "77"


def test_spend_is_gpu_while_running_disk_while_stopped_and_ends_at_the_destroy(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    t0 = 1_000_000.0
    iid = _instance(ledger, t0)
    ledger.meter_mark("vast", iid, "stopped", at=t0 + 3600)  # 1 h at 3.6 $/h
    ledger.meter_mark("vast", iid, "stopped", at=t0 + 4000)  # a repeat changes nothing
    ledger.meter_mark("vast", iid, "running", at=t0 + 3 * 3600)  # 2 h at 0.36 $/h
    [rec] = ledger.instances()
    spend = instance_spend(ledger, rec, now=t0 + 3.5 * 3600)  # 0.5 h at 3.6 $/h
    assert spend.usd == pytest.approx(3.6 + 0.72 + 1.8)
    assert (spend.running_s, spend.stopped_s) == (1.5 * 3600, 2 * 3600)
    assert spend.billing == "running" and spend.rate_now == 3.6 and spend.exact

    ledger.mark_destroyed("vast", iid)
    [rec] = ledger.instances(include_destroyed=True)
    ledger.update(rec.key, destroyed_at=t0 + 4 * 3600)
    [rec] = ledger.instances(include_destroyed=True)
    later = instance_spend(ledger, rec, now=t0 + 100 * 3600)  # the meter stopped at the destroy
    assert later.usd == pytest.approx(3.6 + 0.72 + 3.6) and later.billing == "ended"
    assert later.rate_now == 0


def test_a_stop_seen_late_is_an_upper_bound_until_the_box_says_when(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    t0 = 1_000_000.0
    iid = _instance(ledger, t0)
    ledger.meter_mark("vast", iid, "stopped", at=t0 + 2 * 3600, exact=False)  # seen at 2 h
    [rec] = ledger.instances()
    seen = instance_spend(ledger, rec, now=t0 + 2 * 3600)
    assert seen.usd == pytest.approx(7.2) and not seen.exact
    ledger.meter_correct("vast", iid, "stopped", t0 + 3600)  # the box stopped itself at 1 h
    fixed = instance_spend(ledger, rec, now=t0 + 2 * 3600)
    assert fixed.usd == pytest.approx(3.6 + 0.36) and fixed.exact


def test_box_terms_budget_and_the_container_key_from_pid_1(tmp_path):
    terms = BoxTerms(rate_per_hour=36.0, billing_since=1000.0, budget_usd=1.0)
    assert terms.spent(1100.0) == pytest.approx(1.0) and terms.over_budget(1100.0)
    assert not terms.over_budget(1099.0)
    assert not BoxTerms(rate_per_hour=36.0, billing_since=0.0).over_budget()  # no budget
    # Round trip through the env file the controller writes.
    run = RunDir(tmp_path)
    (tmp_path / ".env").write_text(
        "".join(f"{k}='{v}'\n" for k, v in terms.to_env().items()), encoding="utf-8"
    )
    assert BoxTerms.from_env({}, run) == terms
    # An SSH session lacks the container's variables: PID 1's environment has them.
    pid1 = tmp_path / "environ"
    pid1.write_bytes(b"PATH=/bin\0CONTAINER_API_KEY=scoped-123\0CONTAINER_ID=9\0")
    assert container_value("CONTAINER_API_KEY", {}, pid1) == "scoped-123"
    assert container_value("CONTAINER_API_KEY", {"CONTAINER_API_KEY": "own"}, pid1) == "own"
    assert container_value("MISSING", {}, pid1) is None


@pytest.mark.parametrize(
    ("text", "seconds"), [("30m", 1800), ("90s", 90), ("2h", 7200), ("15", 900), ("0", 0)]
)
def test_stop_after_durations(text, seconds):
    assert parse_duration(text) == seconds


# -- on a box ---------------------------------------------------------------------------------


def row_disk(fake, iid: int) -> float:
    return fake.instances[iid]["disk_space"]


def _wait_instance(fake, iid: int, status: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inst = fake.instances.get(iid)
        if (inst is None and status == "gone") or (inst and inst["actual_status"] == status):
            return
        time.sleep(0.5)
    raise AssertionError(f"instance {iid} is not {status}: {fake.instances.get(iid)}")


def test_a_finished_box_stops_itself_and_download_wakes_it_and_puts_it_back(
    fake_vast, boxes, tmp_path, tiny_model_dir
):
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)
    proc = abfleet("launch", str(job), "--yes", "--stop-after", "3s")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    [iid] = list(fake_vast.instances)
    box = boxes.made[0]
    assert wait_for_state(box.root)["state"] == "done"
    _wait_instance(fake_vast, iid, "stopped")
    # The box used the key scoped to it, never the account's (which it does not have).
    assert [(m, b) for m, _, b in fake_vast.scoped_calls] == [("PUT", {"state": "stopped"})]
    [record] = [json.loads(p.read_text()) for p in box.root.rglob("box-stop.json")]
    assert record["action"] == "stop" and record["why"] == "work finished"

    listed = abfleet("list")
    assert listed.returncode == 0, listed.stderr
    assert "spent so far" in listed.stdout and "(0 running, 1 stopped: disk only)" in listed.stdout
    [row] = json.loads(abfleet("list", "--json").stdout)
    disk_rate = fake_vast.instances[iid]["storage_cost"] * row_disk(fake_vast, iid) / 720
    assert row["billing"] == "stopped" and row["rate_now"] == pytest.approx(disk_rate)
    assert row["spent_usd"] > 0 and row["spend_exact"] is False  # seen stopped, not told when
    # watch: the box cannot answer (exit 1), and its meter runs at the disk's rate only.
    watched = abfleet("watch", str(iid), "--once", "--no-backup", env={"COLUMNS": "200"})
    assert watched.returncode == 1 and "(stopped: disk only)" in watched.stdout
    status = abfleet("status", str(iid))
    assert "stopped itself" in status.stdout and f"abfleet download {iid}" in status.stdout

    dest = tmp_path / "got"
    got = abfleet("download", str(iid), "--to", str(dest))
    assert got.returncode == 0, got.stderr + got.stdout
    assert f"instance {iid} is stopped: starting it to download" in got.stdout
    assert "verified" in got.stdout and f"instance {iid} is stopped again" in got.stdout
    assert (dest / "MANIFEST.sha256").is_file()
    assert fake_vast.instances[iid]["actual_status"] == "stopped"
    # The meter now knows when the box really stopped (from its own record).
    ledger = Ledger()
    events = ledger.meter_events("vast", str(iid))
    assert [s for _, s, _ in events] == ["stopped", "running", "stopped"]
    assert events[0][0] == pytest.approx(record["at"]) and events[0][2] is True


def test_a_budget_ends_the_search_exports_the_best_trial_and_stops_the_box(
    fake_vast, boxes, tmp_path, tiny_model_dir
):
    # Up front: a budget below the estimate rents nothing.
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=5000)
    refused = abfleet("launch", str(job), "--yes", "--budget", "0.0001")
    assert refused.returncode != 0 and "is over --budget 0.0001 $" in refused.stderr
    assert "nothing was rented" in refused.stderr and not fake_vast.instances

    # On the box: a search far too long for its budget (on a box created by hand, so no
    # estimate stands in the way) ends by itself, and its best trial is exported.
    created = abfleet("create", str(tiny_model_dir), "--yes")
    assert created.returncode == 0, created.stderr + created.stdout
    [iid] = list(fake_vast.instances)
    assert abfleet("setup", str(iid)).returncode == 0
    [rec] = Ledger().instances()
    budget = rec.price_per_hour * (time.time() - rec.created_at + 40) / 3600  # ~40 s from now
    sub = abfleet("submit", str(iid), str(job), "--budget", f"{budget:.8f}", "--then-destroy")
    assert sub.returncode == 0, sub.stderr + sub.stdout
    box = boxes.made[0]
    status = wait_for_state(box.root, timeout=300)
    assert status["state"] == "done" and status["reason"] == "budget reached"
    assert 1 <= status["trials_here"] < 5000
    _wait_instance(fake_vast, iid, "stopped")
    [model] = box.root.glob("runs/*/model")
    ran = json.loads((model / "abfleet-run.json").read_text())
    assert ran["study"]["ended_by"] == "budget reached"
    [stopped] = [json.loads(p.read_text()) for p in box.root.rglob("box-stop.json")]
    assert stopped["why"] == "budget reached" and stopped["spent_usd"] >= budget

    # --then-destroy at submit: the download wakes the box, verifies, then destroys it.
    got = abfleet("download", str(iid), "--to", str(tmp_path / "got"))
    assert got.returncode == 0, got.stderr + got.stdout
    assert "as chosen at launch" in got.stdout and f"destroyed instance {iid}" in got.stdout
    assert iid not in fake_vast.instances
    assert Path(tmp_path / "got" / "abfleet-run.json").is_file()
