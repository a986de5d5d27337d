"""Many workers, one study, on a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from abfleet.fleet.ledger import Ledger
from abfleet.job.storage import normalize_url
from conftest import write_job
from test_launch import abfleet, wait_for_state


def slow_job(directory: Path, model: Path, **search: object) -> Path:
    """Markers that never match: every answer runs to the token cap, so a trial lasts long
    enough to be killed in the middle."""
    job = write_job(directory, str(model), heartbeat_interval=1, **search)
    text = (
        job.read_text()
        .replace('markers = ["a", "e"]', 'markers = ["zqzqzq"]')
        .replace("max_new_tokens = 6", "max_new_tokens = 160")
    )
    job.write_text(text)
    (directory / "bad_eval.txt").write_text(
        "\n".join(f"tell me about number {i}" for i in range(16)) + "\n"
    )
    return job


def study_of(url: str, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=normalize_url(url))


def test_three_workers_share_twelve_trials_and_a_killed_trial_is_retried(
    pg_url, tmp_path, tiny_model_dir
):
    job = slow_job(tmp_path / "job", tiny_model_dir, n_trials=12)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "abfleet",
            "run",
            str(job),
            "--workers",
            "3",
            "--storage",
            pg_url,
            "--output",
            str(out),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline:
        for index in (1, 2):
            try:
                status = json.loads((out / f"status-{index}.json").read_text())
            except (OSError, ValueError):
                continue
            if status.get("state") == "searching" and status.get("current_trial") is not None:
                time.sleep(0.25)  # past the parameter writes, into the evaluation
                os.kill(int((out / f"worker-{index}.pid").read_text()), signal.SIGKILL)
                killed = (index, status["current_trial"])
                break
        time.sleep(0.02)
    assert killed is not None, "no secondary worker was ever seen in a trial"
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr + stdout[-2000:]

    trials = study_of(pg_url).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(complete) == 12
    assert len({t.number for t in trials}) == len(trials)
    assert [t.number for t in failed] == [killed[1]]
    retry = [t for t in complete if t.system_attrs.get("failed_trial") == killed[1]]
    # The retry re-runs the same point: every parameter the dead trial had drawn is kept.
    assert len(retry) == 1 and failed[0].params.items() <= retry[0].params.items()
    # No two completed trials evaluated the same point (the constant liar at work).
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 12
    assert {t.user_attrs["worker"].split("/")[-1] for t in complete} >= {"0"}
    assert (out / "model" / "MANIFEST.sha256").is_file()


def test_unreachable_or_wrong_password_fails_before_anything_is_rented(
    fake_vast, pg_server, tiny_job_dir
):
    wrong = pg_server.url(password="not-the-password")
    proc = abfleet("launch", str(tiny_job_dir), "--storage", wrong, "--instances", "2", "--yes")
    assert proc.returncode == 1 and "password authentication failed" in proc.stderr
    assert "not-the-password" not in proc.stderr + proc.stdout
    from sshbox import free_port

    closed = f"postgresql://abfleet:x@127.0.0.1:{free_port()}/abfleet"
    proc = abfleet("launch", str(tiny_job_dir), "--storage", closed, "--instances", "2", "--yes")
    assert proc.returncode == 1 and "cannot open the study storage" in proc.stderr
    assert fake_vast.instances == {} and fake_vast.calls("PUT", r"/api/v0/asks/") == []


def test_sqlite_cannot_be_shared_between_boxes(fake_vast, tiny_job_dir):
    proc = abfleet("launch", str(tiny_job_dir), "--instances", "2", "--yes")
    assert proc.returncode == 2 and "a SQLite study cannot be shared between boxes" in proc.stderr
    assert fake_vast.instances == {}


def test_a_study_of_another_job_spec_is_refused_unless_resume(pg_url, tmp_path, tiny_model_dir):
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)
    first = abfleet("run", str(job), "--storage", pg_url, "--output", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    (tmp_path / "job" / "good_eval.txt").write_text("a different evaluation set\n")
    again = abfleet(
        "run", str(job), "--storage", pg_url, "--output", str(tmp_path / "b"), "--trials", "3"
    )
    assert (
        again.returncode == 2
        and "different job spec" in again.stderr
        and "--resume" in again.stderr
    )
    resumed = abfleet(
        "run",
        str(job),
        "--storage",
        pg_url,
        "--output",
        str(tmp_path / "b"),
        "--trials",
        "3",
        "--resume",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert len([t for t in study_of(pg_url).trials if t.state.name == "COMPLETE"]) == 3


def test_two_boxes_share_a_study_on_a_postgres_started_on_the_first(
    fake_vast, boxes, ssh_key, isolated_home, tmp_path, tiny_model_dir
):
    from conftest import write_config
    from sshbox import free_port

    pg_port = free_port()
    config = isolated_home / "config" / "config.toml"
    write_config(config.parent, ssh_key, fake_vast.url)
    config.write_text(
        config.read_text().replace("[vast]\n", f"[vast]\npostgres_port = {pg_port}\n")
    )
    job = slow_job(tmp_path / "job", tiny_model_dir, n_trials=8)
    proc = abfleet("launch", str(job), "--instances", "2", "--storage", "head", "--yes")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    head, other = boxes.made
    assert wait_for_state(head.root, timeout=300)["state"] == "done"
    # The head's env file has the URL with its password, readable by its owner only.
    [env_file] = head.root.glob("runs/*/.env")
    assert (
        oct(env_file.stat().st_mode & 0o777) == "0o600"
        and "sslmode=verify-ca" in env_file.read_text()
    )
    assert not list(head.root.glob("postgres-init-password"))  # deleted once the server had it
    [job_on_box] = other.root.glob("runs/*/job.toml")
    assert (
        'storage = "env"' in job_on_box.read_text() and "postgresql" not in job_on_box.read_text()
    )

    [run] = Ledger().runs()
    assert len(run.instances) == 2
    snap = json.loads(abfleet("progress", run.instances[0], "--json").stdout)
    assert snap["trials"]["complete"] == 8
    workers = {(w["host"], w["index"]) for w in snap["workers"]}
    assert {index for _, index in workers} == {0, 1}  # one row per worker, across both boxes
    # Both boxes ran trials of the one study, and the counts add up.
    assert [w["trials_here"] > 0 for w in snap["workers"]] == [True, True], snap["workers"]
    assert sum(w["trials_here"] for w in snap["workers"]) == 8


@pytest.fixture
def tiny_job_dir(tmp_path, tiny_model_dir):
    return write_job(tmp_path / "job", str(tiny_model_dir), n_trials=3)


def test_a_postgres_password_from_the_environment_reaches_the_box_only_in_its_env_file(
    pg_server, tmp_path, tiny_model_dir
):
    """`--storage env` + PGPASSWORD: no password in argv or in the job shipped to the box, the
    controller creates the study, and the worker reads the full URL from its 0600 env file."""
    url = pg_server.new_database()
    without_password = url.replace(f":{pg_server.password}@", "@")
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)
    root = tmp_path / "box"
    env = {
        "ABFLEET_STORAGE_URL": without_password,
        "PGPASSWORD": pg_server.password,
        "ABFLEET_REMOTE_ROOT": str(root),
    }
    unset = abfleet(
        "launch", str(job), "--provider", "local", "--storage", "env", "--yes",
        env={"ABFLEET_STORAGE_URL": "", "ABFLEET_REMOTE_ROOT": str(root)},
    )  # fmt: skip
    assert unset.returncode == 2 and "ABFLEET_STORAGE_URL" in unset.stderr
    assert len(unset.stderr.strip().splitlines()) == 1

    proc = abfleet("launch", str(job), "--provider", "local", "--storage", "env", "--yes", env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "process list" not in proc.stderr
    assert wait_for_state(root, timeout=300)["state"] == "done"
    [env_file] = root.glob("runs/*/.env")
    [job_on_box] = root.glob("runs/*/job.toml")
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    assert pg_server.password in env_file.read_text()
    assert pg_server.password not in job_on_box.read_text()
    assert 'storage = "env"' in job_on_box.read_text()
    trials = study_of(url).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]

    # A password on the command line works, with a warning about the process list.
    warned = abfleet(
        "run", str(job), "--storage", url, "--output", str(tmp_path / "again"), "--trials", "2"
    )
    assert warned.returncode == 0 and "process list" in warned.stderr
    assert pg_server.password not in warned.stderr + warned.stdout


def test_submit_and_resume_keep_a_postgres_password_off_the_box_job(
    pg_server, tmp_path, tiny_model_dir
):
    """`submit --storage env` creates the study here and gives the box its URL only in the env
    file; `resume` of that run continues from the local SQLite backup, not the Postgres."""
    url = pg_server.new_database()
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)
    root = tmp_path / "box"
    env = {"ABFLEET_REMOTE_ROOT": str(root), "ABFLEET_STORAGE_URL": url}
    for argv in (
        ("create", str(tiny_model_dir), "--provider", "local", "--yes"),
        ("setup", "local"),
        ("submit", "local", str(job), "--storage", "env"),
    ):
        proc = abfleet(*argv, env=env)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        if argv[0] == "setup":  # it says which Python and torch the box's worker uses
            assert f"uses python {sys.executable}" in proc.stdout.replace("\n", "")
            assert f"torch {torch.__version__}" in proc.stdout.replace("\n", "")
    assert wait_for_state(root, timeout=300)["state"] == "done"
    [job_on_box] = root.glob("runs/*/job.toml")
    assert 'storage = "env"' in job_on_box.read_text()
    assert pg_server.password not in job_on_box.read_text()
    assert len([t for t in study_of(url).trials if t.state.name == "COMPLETE"]) == 2

    head = abfleet("submit", "local", str(job), "--storage", "head", env=env)
    assert head.returncode == 2 and "abfleet launch --storage head" in head.stderr

    [run] = Ledger().runs()
    backup = abfleet("backup", "local", env=env)
    assert backup.returncode == 0, backup.stderr
    resumed = abfleet("resume", run.name, "--here", "--trials", "3", env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "3/3 trials" in resumed.stdout
    # The third trial went to the resumed SQLite study, not to the Postgres one.
    assert len(study_of(url).trials) == 2


def test_a_password_in_the_url_query_reaches_no_file_of_the_run_or_its_export(
    pg_server, tmp_path, tiny_model_dir
):
    """libpq reads `?password=` from a URL's query: it is a password like user:password, kept
    out of job.toml, the status file, abfleet-run.json, the card, the report and the output."""
    url = pg_server.new_database().replace(f":{pg_server.password}@", "@")
    url += f"?password={pg_server.password}&application_name=abfleet-test"
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)
    out = tmp_path / "run"
    proc = abfleet("run", str(job), "--storage", url, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "model" / "abfleet-run.json").is_file()
    assert "process list" in proc.stderr  # the warning about a password in argv
    leaked = [
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and pg_server.password.encode() in p.read_bytes()
    ]
    assert leaked == []
    assert pg_server.password not in proc.stdout + proc.stderr
    record = json.loads((out / "model" / "abfleet-run.json").read_text())
    shown = record["study"]["storage"]
    assert "password=***" in shown and "application_name=abfleet-test" in shown


def test_a_killed_primary_hands_the_export_to_another_worker(pg_url, tmp_path, tiny_model_dir):
    """Worker 0 (the one that exports) is SIGKILLed mid-search: the other worker finishes the
    study, sees the primary gone, and exports; the search was not paid for nothing."""
    job = slow_job(tmp_path / "job", tiny_model_dir, n_trials=6)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "abfleet", "run", str(job), "--workers", "2"),
            *("--storage", pg_url, "--output", str(out)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            status = json.loads((out / "status-0.json").read_text())
        except (OSError, ValueError):
            status = {}
        if status.get("state") == "searching" and status.get("current_trial") is not None:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the primary was never seen in a trial")
    proc.kill()  # worker 0 is this process: SIGKILL, nothing of it runs on
    proc.wait()
    secondary = int((out / "worker-1.pid").read_text())
    try:
        deadline = time.monotonic() + 300
        while not (out / "model" / "MANIFEST.sha256").is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (out / "model" / "MANIFEST.sha256").is_file(), (out / "worker-1.log").read_text()
        for _ in range(100):  # the worker writes its last status, then ends
            if json.loads((out / "status-1.json").read_text()).get("state") == "done":
                break
            time.sleep(0.1)
        record = json.loads((out / "model" / "abfleet-run.json").read_text())
        assert record["study"]["complete"] == 6
        assert json.loads((out / "export.claim").read_text())["worker"] == 1
        log = (out / "worker-1.log").read_text()
        assert "this worker exports instead" in log
        assert json.loads((out / "status-1.json").read_text())["state"] == "done"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(secondary, signal.SIGKILL)
