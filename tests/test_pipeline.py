"""The whole local run on a tiny saved model: study, resume, stop, export, and the choice rule."""

from __future__ import annotations

import json
import subprocess

import optuna
import pytest

from abfleet.core import search
from abfleet.core.result import choose_trial, pareto_front
from abfleet.errors import UserError
from abfleet.job import manifest
from abfleet.job.spec import load_job
from abfleet.worker.jobrun import LogReporter, RunOptions, run_job
from abfleet.worker.rundir import RunDir
from conftest import write_job


def study_trials(run: RunDir, name: str = "tiny"):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run.study_db}")
    return study, study.get_trials(deepcopy=False)


def test_run_exports_a_verified_model_and_resume_continues_the_count(tmp_path, tiny_model_dir):
    job_file = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=3)
    run = RunDir(tmp_path / "run")
    result = run_job(load_job(str(job_file)), run, LogReporter())
    assert result.state == "done" and result.complete == 3
    study, trials = study_trials(run)
    assert [t.number for t in trials] == [0, 1, 2]
    t = trials[0]
    assert t.values[0] == t.user_attrs["refusals"] and 0 <= t.user_attrs["refusals"] <= 4
    assert t.user_attrs["n_bad"] == 4 and t.values[1] == pytest.approx(t.user_attrs["kl"])
    assert study.user_attrs["baseline"]["n_bad"] == 4
    entries = manifest.read(run.model_dir)
    assert manifest.verify(run.model_dir, entries) == []
    # The manifest is what `sha256sum -c` reads, as it stands; a changed byte fails it.
    check = subprocess.run(
        ["sha256sum", "-c", manifest.NAME], cwd=run.model_dir, capture_output=True, text=True
    )
    assert check.returncode == 0 and check.stdout.count(": OK") == len(entries), check.stdout
    config = run.model_dir / "config.json"
    original = config.read_bytes()
    config.write_bytes(original.replace(b"{", b"[", 1))
    assert (
        subprocess.run(
            ["sha256sum", "-c", "--quiet", manifest.NAME], cwd=run.model_dir, capture_output=True
        ).returncode
        != 0
    )
    config.write_bytes(original)
    assert {"config.json", "model.safetensors", "abfleet-run.json"} <= {e.path for e in entries}
    record = json.loads((run.model_dir / "abfleet-run.json").read_text())
    assert record["chosen"]["trial"] == result.chosen["trial"]
    assert record["before"]["refusals"] == study.user_attrs["baseline"]["refusals"]

    # Same job, larger budget: the study continues from trial 3 up to 5 in total.
    job = load_job(str(job_file), {"trials": 5})
    result = run_job(job, run, LogReporter())
    _, trials = study_trials(run)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4] and result.trials_here == 2
    # Rerunning at the same budget runs nothing more.
    result = run_job(job, run, LogReporter())
    assert result.trials_here == 0 and len(study_trials(run)[1]) == 5


def test_stop_finishes_the_current_trial_and_stops(tmp_path, tiny_model_dir):
    job_file = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=10)
    run = RunDir(tmp_path / "run")
    started = []

    def should_stop():
        return len(started) >= 1

    class Reporter(LogReporter):
        def trial(self, outcome, complete, total):
            started.append(outcome.number)

    result = run_job(load_job(str(job_file)), run, Reporter(), RunOptions(should_stop=should_stop))
    assert result.state == "stopped"
    _, trials = study_trials(run)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    assert not run.model_dir.exists()
    assert json.loads(run.status_file(0).read_text())["state"] == "stopped"


def test_a_study_from_another_job_is_refused_unless_resume(tmp_path, tiny_model_dir):
    job_file = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=1)
    run = RunDir(tmp_path / "run")
    run_job(load_job(str(job_file)), run, LogReporter())
    (tmp_path / "job" / "bad_eval.txt").write_text("something else entirely\n")
    with pytest.raises(UserError, match="different job spec"):
        run_job(load_job(str(job_file), {"trials": 2}), run, LogReporter())
    result = run_job(
        load_job(str(job_file), {"trials": 2}), run, LogReporter(), RunOptions(resume=True)
    )
    assert result.complete == 2


def test_orphaned_running_trial_is_requeued_with_its_parameters(tmp_path, tiny_model_dir):
    job_file = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)
    run = RunDir(tmp_path / "run")
    run_job(load_job(str(job_file), {"trials": 1}), run, LogReporter())
    study, _ = study_trials(run)
    orphan = study.ask()  # as if a process died mid-trial: RUNNING forever
    search.suggest_params(orphan, 4)
    result = run_job(load_job(str(job_file)), run, LogReporter())
    _, trials = study_trials(run)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 1
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == orphan.number)
    assert retry.params == study.trials[orphan.number].params
    assert result.complete == 2


def test_choice_rule_and_pareto_front():
    def frozen(number, refusals, kl):
        trial = optuna.trial.create_trial(values=[refusals, kl])
        trial.number = number
        return trial

    trials = [
        frozen(0, 50, 0.01),
        frozen(1, 3, 0.7),
        frozen(2, 5, 0.4),
        frozen(3, 5, 0.2),
        frozen(4, 9, 0.3),
    ]
    choice = choose_trial(trials, kl_limit=0.5)
    assert choice.trial.number == 3 and choice.within_limit  # 5 refusals, tie broken by lower KL
    assert choose_trial(trials, 0.5, trial_number=1).trial.number == 1
    with pytest.raises(UserError):
        choose_trial(trials, 0.5, trial_number=42)
    fallback = choose_trial(trials, kl_limit=0.001)
    assert fallback.trial.number == 0 and not fallback.within_limit
    assert [t.number for t in pareto_front(trials)] == [1, 3, 0]

    # Trial 3 wins on refusals and KL, but its answers degenerate more than the original's.
    trials[3].set_user_attr("degenerate", 4)
    trials[2].set_user_attr("degenerate", 1)
    sound = choose_trial(trials, kl_limit=0.5, baseline_degenerate=1)
    assert sound.trial.number == 2
    assert choose_trial(trials, kl_limit=0.5, baseline_degenerate=4).trial.number == 3
    for t in trials:
        t.set_user_attr("degenerate", 9)
    with pytest.raises(UserError, match="degenerates more often than the original"):
        choose_trial(trials, kl_limit=0.5, baseline_degenerate=1)
    assert choose_trial(trials, 0.5, trial_number=3, baseline_degenerate=1).trial.number == 3
