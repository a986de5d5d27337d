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


def test_a_study_continued_at_another_precision_is_refused_even_with_resume(
    tmp_path, tiny_model_dir
):
    """A study searched at float32 and continued at bfloat16 (another device) or quantized would
    reuse directions, baseline and scores of another model: refused with how to start anew."""
    job_file = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=1)
    run = RunDir(tmp_path / "run")
    run_job(load_job(str(job_file)), run, LogReporter())
    study, _ = study_trials(run)
    assert study.user_attrs["precision"] == {"dtype": "float32", "quantization": "none"}
    text = job_file.read_text()
    job_file.write_text(text.replace('dtypes = ["float32"]', 'dtypes = ["bfloat16"]'))
    for options in (RunOptions(), RunOptions(resume=True)):
        with pytest.raises(
            UserError,
            match=r"searched with the model at float32 and this run "
            r"loads it at bfloat16.*--study NAME",
        ):
            run_job(load_job(str(job_file), {"trials": 2}), run, LogReporter(), options)
    assert len(study_trials(run)[1]) == 1  # nothing searched at the other precision
    # Quantization is in the fingerprint: a quantized job is another job spec.
    full = load_job(str(job_file))
    quantized = load_job(str(job_file), {"quantization": "bnb-4bit"})
    prompts = full.load_all_prompts()
    assert full.fingerprint(prompts) != quantized.fingerprint(prompts)


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
    # Every trial within the limit degenerates: the sound trial with the lowest KL, and the
    # reason says why, not "no trial has KL <= limit".
    for n in (0, 2, 3, 4):
        trials[n].set_user_attr("degenerate", 9)
    only_kl = choose_trial(trials, kl_limit=0.5, baseline_degenerate=1)
    assert only_kl.trial.number == 1 and not only_kl.within_limit
    assert "4 trial(s) with KL <= 0.5 degenerate more often" in only_kl.reason
    assert "no trial has KL" not in only_kl.reason and not only_kl.warning
    # Every trial loops once more than allowed: the search still ends with a model (the one
    # that degenerates least, then refuses least), with the true reason and a warning.
    for t in trials:
        t.set_user_attr("degenerate", 2)
        t.set_user_attr("n_bad", 10)
    trials[4].set_user_attr("degenerate", 3)
    looping = choose_trial(trials, kl_limit=0.5, baseline_degenerate=1)
    assert looping.trial.number == 1
    assert looping.reason.startswith("every trial degenerates more often than allowed")
    assert "2 of its 10 answers loop or break" in looping.warning
    assert choose_trial(trials, 0.5, trial_number=3, baseline_degenerate=1).trial.number == 3


def test_a_run_folder_is_removed_on_bad_input_only_before_any_trial(tmp_path, tiny_model_dir):
    """Bad input leaves nothing; a failure after paid trials (an export that fails its check)
    keeps the folder, whose study the next run re-exports from."""
    from abfleet.worker import localrun

    job_file = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=1)
    for trials_ran in (False, True):
        out = tmp_path / f"run-{trials_ran}"
        prepared = localrun.prepare(str(job_file), {"output": str(out)})
        status = {"state": "exporting", **({"last_trial": 0} if trials_ran else {})}
        prepared.run.status_file(0).write_text(json.dumps(status))
        with pytest.raises(UserError), localrun.cleanup_on_bad_input(prepared):
            raise UserError("the exported model does not answer like the searched one")
        assert out.exists() is trials_ran
