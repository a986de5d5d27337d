"""SIGTERM (a container stop, `timeout`, a supervisor) ends `abfleet run` within seconds from any
phase, and leaves the study and the demo cache consistent; Ctrl+C outside the search too."""

from __future__ import annotations

import fcntl
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from abfleet.worker.rundir import RunDir
from conftest import abfleet_env, write_job


class Running:
    """`abfleet run` in a subprocess, its stdout read line by line as it comes."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "abfleet", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"never saw {text!r}:\n{''.join(self.lines)[-3000:]}")
            time.sleep(0.05)

    def signal_and_wait(self, signum: int) -> tuple[int, float, str]:
        sent = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(timeout=5)
        assert self.proc.stderr is not None
        return code, time.monotonic() - sent, self.proc.stderr.read()


def test_sigterm_mid_search_ends_at_once_and_the_study_resumes_exactly(tmp_path, tiny_model_dir):
    # Trials of ~1 s (long answers on 8 prompts), so the signal lands inside one.
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=50)
    job.write_text(job.read_text().replace("max_new_tokens = 6", "max_new_tokens = 120"))
    out = tmp_path / "run"
    run = Running(["run", str(job), "--output", str(out)], abfleet_env())
    run.wait_for("[2/50]", timeout=240)
    time.sleep(0.3)
    code, took, stderr = run.signal_and_wait(signal.SIGTERM)
    assert code == 143 and "terminated (SIGTERM)" in stderr, stderr
    assert took < 10, f"SIGTERM took {took:.1f} s"
    assert json.loads(RunDir(out).status_file(0).read_text())["state"] == "stopped"

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{RunDir(out).study_db}")
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states, states
    complete = states.count("COMPLETE")
    for cut in (t for t in trials if t.state.name == "FAIL"):  # the trial the signal cut short
        assert "terminated" in cut.user_attrs["error"]
        retry = next(t for t in trials if t.system_attrs.get("failed_trial") == cut.number)
        assert retry.state.name == "WAITING" and retry.params == cut.params

    # The same command with a budget one above what was complete finishes exactly there.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "abfleet",
            "run",
            str(job),
            "--output",
            str(out),
            "--trials",
            str(complete + 1),
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=abfleet_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr + done.stdout[-2000:]
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states.count("COMPLETE") == complete + 1 and "RUNNING" not in states
    assert (out / "model" / "MANIFEST.sha256").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_the_demo_build_leaves_no_partial_model(tmp_path, signum, code):
    cache = tmp_path / "cache"
    env = abfleet_env(ABFLEET_CACHE_DIR=str(cache))
    run = Running(["run", "--trials", "1", "--output", str(tmp_path / "run")], env)
    run.wait_for("demo build:", timeout=300)
    time.sleep(1)  # inside the build's generation
    got, took, stderr = run.signal_and_wait(signum)
    assert got == code, stderr
    assert took < 15, f"the demo build took {took:.1f} s to stop"
    models = cache / "demo-models"
    assert [p.suffix for p in models.iterdir()] == [".lock"], list(models.iterdir())
    with open(next(models.iterdir())) as lock:  # released: another build may take it at once
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not any(Path(tmp_path / "run").glob("model*"))
