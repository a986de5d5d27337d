"""Operating a run through the CLI on the fake provider: snapshot, progress, watch, backup,
resume, download and the guarded stop/destroy."""

from __future__ import annotations

import json
import os
import sys
import time

import pexpect
import pytest

from abfleet.fleet.ledger import Ledger
from abfleet.ops.monitor import Session, Target
from abfleet.ops.watch import Watcher
from conftest import write_job
from test_launch import abfleet, wait_for_state


def launched(fake_vast, boxes, job, wait=("done",)):
    proc = abfleet("launch", str(job), "--yes")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    [box] = boxes.made
    [iid] = [str(i) for i in fake_vast.instances]
    if wait:
        assert wait_for_state(box.root, wanted=wait)["state"] in wait
    return box, iid


def typed(args, answer, timeout=120):
    """Run abfleet in a pseudo-terminal and answer its typed-id question."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "abfleet", *args],
        env=dict(os.environ),
        timeout=timeout,
        encoding="utf-8",
    )
    child.expect("type the instance id")
    child.sendline(answer)
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.before


@pytest.fixture
def tiny_job(tmp_path, tiny_model_dir):
    return write_job(tmp_path / "job", str(tiny_model_dir), n_trials=4)


def test_progress_snapshot_and_backup(fake_vast, boxes, tiny_job):
    _box, iid = launched(fake_vast, boxes, tiny_job)
    proc = abfleet("progress", iid, "--json")
    assert proc.returncode == 0, proc.stderr
    snap = json.loads(proc.stdout)
    assert (
        snap["state"] == "done" and snap["trials"]["complete"] == 4 and snap["trials"]["total"] == 4
    )
    assert snap["baseline"]["n_bad"] == 4
    best = snap["pareto"][0]
    assert set(best) >= {"trial", "refusals", "n_bad", "kl"} and best["n_bad"] == 4
    assert (
        isinstance(best["refusals"], int)
        and snap["output"]["exported"]
        and snap["workers"][0]["state"] == "done"
    )
    assert snap["disk"]["free_gb"] > 0 and snap["log_tail"]
    [run] = Ledger().runs()
    backup = json.loads((__import__("pathlib").Path(run.local_dir) / "backup.json").read_text())
    assert (
        backup["complete"] == 4
        and (__import__("pathlib").Path(run.local_dir) / "logs" / "worker-0.log").is_file()
    )
    text = abfleet("progress", iid)
    assert "Pareto front" in text.stdout and "/4" in text.stdout
    status = json.loads(abfleet("status", iid, "--json").stdout)
    assert status["instance"]["state"] == "running" and status["run"]["state"] == "done"
    logs = json.loads(abfleet("logs", iid, "--json").stdout)
    assert any("phase done" in line for line in logs["lines"])

    # The dashboard renders once without a terminal, for scripts and tests.
    proc = abfleet("watch", iid, "--once")
    assert proc.returncode == 0, proc.stderr
    for text in ("state done", "4/4 trials", "Pareto front", "cost so far", "workers", "log"):
        assert text in proc.stdout, text

    # A snapshot is one SSH round trip.
    ledger = Ledger()
    [rec] = ledger.instances()
    session = Session(Target(rec, ledger.runs()[0]))
    calls = []
    real = session.remote.run
    session.remote.run = lambda argv, **kw: calls.append(argv) or real(argv, **kw)  # type: ignore[method-assign]
    snap = session.snapshot()
    session.close()
    assert len(calls) == 1 and snap["state"] == "done"


def test_watch_reconnects_and_stop_is_guarded(fake_vast, boxes, tmp_path, tiny_model_dir):
    from rich.console import Console

    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=100_000)
    box, iid = launched(fake_vast, boxes, job, wait=("searching",))
    ledger = Ledger()
    [rec] = ledger.instances()
    watcher = Watcher(ledger, Target(rec, ledger.runs()[0]), backup=True)

    def screen() -> str:
        console = Console(width=120, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(watcher.view())
        return console.export_text()

    watcher.refresh()
    first = screen()
    assert "state searching" in first and "STALE" not in first
    box.kill()
    watcher.next_try = 0
    watcher.refresh()  # the connection is gone: no exception, the view says so
    assert "STALE" in screen() and "state searching" in screen()
    box.start()
    deadline = time.monotonic() + 60
    while "STALE" in screen() and time.monotonic() < deadline:
        watcher.next_try = 0
        watcher.refresh()
        time.sleep(0.5)
    assert "STALE" not in screen()
    watcher.close()
    # The worker kept running meanwhile: a watch never touches it.
    assert (
        json.loads(abfleet("progress", iid, "--json", "--no-backup").stdout)["state"] == "searching"
    )


def test_guard_rails_for_destroy(fake_vast, boxes, tiny_job, tmp_path):
    _, iid = launched(fake_vast, boxes, tiny_job)
    ledger = Ledger()

    def unchanged():
        assert int(iid) in fake_vast.instances
        assert [r.state for r in ledger.instances()] == ["active"]

    # No terminal and no --yes: refused.
    proc = abfleet("destroy", iid, "--force")
    assert proc.returncode == 3 and "no terminal" in proc.stderr
    unchanged()
    # The model is not downloaded: refused, even with --yes.
    proc = abfleet("destroy", iid, "--yes")
    assert proc.returncode == 2 and "not downloaded and verified" in proc.stderr
    assert "instance " + iid in proc.stdout and "$/h" in proc.stdout
    unchanged()
    # Download, then a wrong id typed at the prompt changes nothing.
    # (to the default runs/<run>/model, under a scratch working directory)
    assert abfleet("download", iid, cwd=tmp_path).returncode == 0
    assert any(tmp_path.glob("runs/*/model/MANIFEST.sha256"))
    code, out = typed(["destroy", iid], "12345")
    assert code == 3 and "nothing was changed" in out
    unchanged()
    # The right id: destroyed, gone from the provider, and the ledger says so.
    code, out = typed(["destroy", iid], iid)
    assert code == 0, out
    assert int(iid) not in fake_vast.instances
    assert [(r.instance_id, r.state) for r in ledger.instances(include_destroyed=True)] == [
        (iid, "destroyed")
    ]


def test_resume_continues_the_trial_count_here_and_on_a_new_box(
    fake_vast, boxes, tiny_job, tmp_path
):
    _, iid = launched(fake_vast, boxes, tiny_job)
    assert abfleet("backup", iid).returncode == 0
    proc = abfleet("download", iid, "--to", str(tmp_path / "got"), "--then-destroy", "--yes")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "verified" in proc.stdout and (tmp_path / "got" / "model.safetensors").is_file()
    assert int(iid) not in fake_vast.instances  # destroyed only after every file was verified
    [run] = Ledger().runs()
    assert run.verified and run.downloaded_at

    here = abfleet("resume", run.name, "--here", "--trials", "6", cwd=tmp_path)
    assert here.returncode == 0, here.stderr + here.stdout
    import optuna

    study = optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{tmp_path / 'runs' / run.name / 'study.db'}"
    )
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4, 5]

    new_box = abfleet("resume", run.name, "--trials", "7", "--yes")
    assert new_box.returncode == 0, new_box.stderr + new_box.stdout
    second = boxes.made[-1]
    assert wait_for_state(second.root)["state"] == "done"
    [db] = second.root.glob("runs/*/study.db")
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 7
    assert [t.number for t in study.trials][:4] == [0, 1, 2, 3]


def test_commands_fail_with_non_zero_exit_codes(fake_vast, tiny_job):
    for args in (
        ["progress"],
        ["watch", "--once"],
        ["download"],
        ["destroy", "--yes"],
        ["stop", "--yes"],
        ["logs"],
        ["resume", "no-such-run"],
    ):
        proc = abfleet(*args)
        assert proc.returncode != 0 and proc.stderr.startswith("error: "), args
