"""Interruptible boxes, end to end: rented at a bid from the fake Vast.ai API (which answers
bids as Vast does), outbid mid-search (the container's processes die, its disk stays and bills),
and back when the bid wins (the container restarts and reruns its onstart)."""

from __future__ import annotations

import json
import time

from abfleet.fleet.ledger import Ledger
from conftest import write_job
from fakevast import make_offer
from test_box_guardian import _complete_numbers, _launch, _stopped_at, _two_boxes, _wait
from test_launch import abfleet, wait_for_state


def _asks(fake) -> list[dict]:
    return fake.calls("PUT", r"^/api/v0/asks/\d+/$")


def _running(fake, iid: int) -> bool:
    fake.advance()
    return fake.instances[iid]["actual_status"] == "running"


def test_offers_show_both_prices_and_a_bid_below_the_minimum_rents_nothing(
    fake_vast, tiny_model_dir
):
    fake = fake_vast
    shown = abfleet("offers", str(tiny_model_dir), "--interruptible", "--json")
    assert shown.returncode == 0, shown.stderr
    [bid_search] = [b for b in fake.calls("POST", "bundles") if b.get("type") == "bid"]
    assert bid_search["allocated_storage"] > 0
    offers = json.loads(shown.stdout)
    first = offers[0]
    source = next(o for o in fake.offers if str(o["id"]) == first["id"])
    disk = first["storage_per_hour"]
    assert first["min_bid"] == source["min_bid"]
    assert first["bid"] == round(source["min_bid"] * 1.1, 4)  # the default margin, 10 %
    assert abs(first["price_per_hour"] - (first["bid"] + disk)) < 1e-6
    assert first["on_demand_per_hour"] > first["price_per_hour"]  # the on-demand search's price
    prices = [o["interruptible_per_hour"] for o in offers]
    assert prices == sorted(prices)

    table = abfleet(
        "offers",
        str(tiny_model_dir),
        "--interruptible",
        "--bid-margin",
        "0",
        env={"COLUMNS": "200"},
    )
    assert table.returncode == 0 and "on demand" in table.stdout and "paused" in table.stdout
    row = next(line for line in table.stdout.splitlines() if first["id"] in line)
    assert f"{source['min_bid']:.4f}" in row  # margin 0: the bid is the minimum

    low = abfleet("create", str(tiny_model_dir), "--interruptible", "--bid", "0.01", "--yes")
    assert low.returncode == 2
    assert "below offer" in low.stderr and "minimum bid" in low.stderr
    assert "Traceback" not in low.stderr
    assert _asks(fake) == [] and fake.instances == {}

    alone = abfleet("create", str(tiny_model_dir), "--bid", "0.2", "--yes")
    assert alone.returncode == 2 and "--interruptible" in alone.stderr


def test_an_interruptible_run_paused_twice_keeps_every_trial_and_meters_the_pauses_at_disk_rate(
    meter, boxes, tmp_path, tiny_model_dir
):
    fake = meter
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=14)
    iid = _launch(job, "--interruptible", "--stop-after", "1s")
    [ask] = _asks(fake)
    inst = fake.instances[iid]
    assert inst["is_bid"] and ask["price"] == round(inst["min_bid"] * 1.1, 4)
    [rec] = Ledger().instances()
    assert abs(rec.price_per_hour - inst["dph_total"]) < 1e-6  # what it bills running at the bid
    root = boxes.made[0].root
    kept: set[int] = set()
    paused_s = released = 0.0
    for pause in (1, 2):
        _wait(
            lambda n=3 * pause: len(_complete_numbers(root)) >= n,
            what=f"trials before pause {pause}",
        )
        fake.outbid(iid)
        outbid_at = time.time()
        kept = _complete_numbers(root)
        listed = abfleet("list", "--json")
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert row["state"] == "outbid" and row["billing"] == "stopped"
        assert row["note"].startswith("OUTBID since") and (
            f"pause {pause}" in row["note"] or pause == 1
        )
        assert abs(row["rate_now"] - rec.storage_per_hour) < 1e-9  # its disk only
        status = abfleet("status", str(iid))
        said = " ".join(status.stdout.split())
        assert "outbid" in said and "goes on when the bid wins again" in said
        # A download cannot wake a paused box: it says why instead of waiting on it.
        got = abfleet("download", str(iid), "--to", str(tmp_path / "got"))
        assert got.returncode == 2 and "outbid" in got.stderr
        time.sleep(6)
        fake.release(iid)
        released = time.time()
        paused_s += released - outbid_at
        _wait(lambda: _running(fake, iid), what="the box back")
        [back] = json.loads(abfleet("list", "--json").stdout)
        assert back["state"] == "running" and not back["note"].startswith("OUTBID")
    assert wait_for_state(root, timeout=300)["state"] == "done"
    _wait(lambda: _stopped_at(fake, iid), fake=fake, what="the stop")
    done = _complete_numbers(root)
    assert kept <= done and len(done) == 14  # nothing completed before a pause was lost
    # Each comeback reran the onstart, which re-armed the guardian (it restarted the worker).
    assert len([b for b in boxes.made if b.root == root]) == 3
    started = float((root / "container-started").read_text())
    assert started >= released
    assert json.loads((root / "guardian.json").read_text())["started_at"] >= started
    # The budget's meter (the guardian's) counted the pauses at the disk's rate: it agrees with
    # the provider's own bill, which is well below the running rate for the whole time.
    [meter_file] = root.rglob("meter.json")
    metered = json.loads(meter_file.read_text())
    rate, disk = inst["dph_total"], rec.storage_per_hour
    billed = fake.billed_usd(iid, rate, disk, until=metered["at"])
    saved = paused_s * (rate - disk) / 3600
    assert abs(metered["spent_usd"] - billed) < 0.3 * saved, (metered, billed, saved)


def test_a_pause_past_max_pause_moves_the_run_and_destroys_the_paused_box(
    meter, boxes, tmp_path, tiny_model_dir
):
    fake = meter
    # A second machine at the same price: where the run can move within the confirmed $/h.
    fake.offers.append(make_offer(107, "RTX 3090", 1, 24_576, 0.21))
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=30)
    iid = _launch(job, "--interruptible", "--max-pause", "3s", "--stop-after", "1s")
    root = boxes.made[0].root
    _wait(lambda: len(_complete_numbers(root)) >= 3, what="trials")
    looked = abfleet("watch", str(iid), "--once")  # a look keeps a current backup here
    assert looked.returncode == 0, looked.stderr + looked.stdout
    [old_run] = Ledger().runs()
    fake.outbid(iid)
    paused = abfleet("watch", str(iid), "--once")
    assert paused.returncode == 1 and "OUTBID since" in paused.stdout
    assert "after 0.05 min the run moves" in " ".join(paused.stdout.split())
    time.sleep(3.5)
    moved = abfleet("watch", str(iid), "--once", timeout=400)
    said = " ".join(moved.stdout.split())
    assert moved.returncode == 0, moved.stderr + moved.stdout
    assert "moving it to another box from its backup" in said
    assert f"destroyed instance {iid}, the paused box" in said
    assert iid not in fake.instances
    [new_iid] = [i for i in fake.instances]
    assert fake.instances[new_iid]["is_bid"]  # the same bid policy, on another machine
    assert fake.instances[new_iid]["machine_id"] != 10_000 + 101
    assert (
        fake.instances[new_iid]["dph_total"] <= Ledger().instance("vast", str(iid)).price_per_hour
    )
    runs = {r.name: r for r in Ledger().runs()}
    assert runs[old_run.name].continued_by
    new_run = runs[runs[old_run.name].continued_by]
    record = json.loads(new_run.moved)
    assert record["from_instance"] == str(iid)
    assert record["lost_trials"] == record["last_seen_complete"] - record["backup_complete"] >= 0
    assert 3 <= record["backup_complete"] < 30  # moved mid-search
    status = abfleet("status", str(new_iid))  # while the moved run searches
    assert "moved from instance" in " ".join(status.stdout.split()), status.stdout
    new_root = boxes.made[-1].root
    assert new_root != root
    assert wait_for_state(new_root, timeout=300)["state"] == "done"
    assert len(_complete_numbers(new_root)) == 30
    _wait(lambda: _stopped_at(fake, new_iid), fake=fake, what="the new box's stop")


def test_a_two_box_run_whose_worker_box_pauses_finishes_on_the_head(
    meter, boxes, isolated_home, tmp_path, tiny_model_dir
):
    fake = meter
    ids, _ = _two_boxes(isolated_home, tmp_path, tiny_model_dir, "--interruptible", n_trials=8)
    head_ask, worker_ask = _asks(fake)
    assert head_ask["price"] is None  # the study's box is on demand: it must not pause
    assert worker_ask["price"] is not None
    head_id, worker_id = ids
    assert not fake.instances[head_id]["is_bid"] and fake.instances[worker_id]["is_bid"]
    head, worker = boxes.made[:2]

    def worker_busy():
        for path in worker.root.rglob("status-*.json"):
            if json.loads(path.read_text()).get("trials_here", 0) >= 1:
                return True
        return False

    _wait(worker_busy, what="the worker box's first trial")
    fake.outbid(worker_id)  # never comes back during this test
    final = wait_for_state(head.root, timeout=300)
    assert final["state"] == "done", final
    _wait(lambda: _stopped_at(fake, head_id), fake=fake, what="the head's stop")
    assert fake.instances[worker_id]["actual_status"] == "stopped"
    listed = {r["id"]: r for r in json.loads(abfleet("list", "--json").stdout)}
    assert listed[str(worker_id)]["state"] == "outbid"
