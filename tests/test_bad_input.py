"""Bad input through the CLI: one clear line on stderr, exit code 2, no traceback, nothing left."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from abfleet.cli import main
from conftest import write_job


def run_cli(args, capsys):
    capsys.readouterr()  # drop what fixtures printed (progress bars of save_pretrained)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def job(tmp_path, tiny_model_dir):
    return write_job(tmp_path / "job", str(tiny_model_dir))


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def test_missing_model_path(job, out, capsys):
    code, _, err = run_cli(
        ["run", str(job), "--model", "/nonexistent/model-dir", "--output", str(out)], capsys
    )
    assert_one_line_error(code, err, "/nonexistent/model-dir", "does not exist")
    assert not out.exists()


def test_directory_without_weights(job, out, tmp_path, capsys):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run_cli(["run", str(job), "--model", str(empty), "--output", str(out)], capsys)
    assert_one_line_error(code, err, "no weights")
    assert not out.exists()


@pytest.mark.parametrize("model_type", ["vit", "no_such_architecture"])
def test_unsupported_architecture(job, out, tmp_path, capsys, model_type):
    model = tmp_path / model_type
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": model_type}))
    (model / "model.safetensors").write_bytes(b"\0" * 16)
    code, _, err = run_cli(["run", str(job), "--model", str(model), "--output", str(out)], capsys)
    assert_one_line_error(code, err, "unsupported architecture")
    assert not out.exists()


def test_causal_model_without_editable_projections(job, out, tmp_path, capsys):
    """BERT loads as a causal LM but has no o_proj/down_proj: refused after loading, and the
    run folder the command had created is removed again."""
    from transformers import BertConfig, BertLMHeadModel

    from conftest import make_tokenizer

    tok = make_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        is_decoder=True,
    )
    model_dir = tmp_path / "bert"
    BertLMHeadModel(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    code, _, err = run_cli(
        ["run", str(job), "--model", str(model_dir), "--output", str(out)], capsys
    )
    assert_one_line_error(code, err, "unsupported architecture", "BertLMHeadModel")
    assert not out.exists()


def test_unreadable_weights(job, out, tmp_path, capsys):
    model = tmp_path / "corrupt"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"\0" * 16)
    code, _, err = run_cli(["run", str(job), "--model", str(model), "--output", str(out)], capsys)
    assert code == 2 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_prompt_file(job, out, capsys, content):
    (job.parent / "bad_eval.txt").write_text(content)
    code, _, err = run_cli(["run", str(job), "--output", str(out)], capsys)
    assert_one_line_error(code, err, "bad_eval.txt", "empty")
    assert not out.exists()


def test_missing_prompt_file(job, out, capsys):
    (job.parent / "good.txt").unlink()
    code, _, err = run_cli(["run", str(job), "--output", str(out)], capsys)
    assert_one_line_error(code, err, "good.txt", "does not exist")
    assert not out.exists()


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (lambda t: t + "\nsurprise = 1\n", ("unknown key", "surprise")),
        (
            lambda t: t.replace("[search]\n", "[search]\ncolour = 'red'\n"),
            ("unknown key", "search.colour"),
        ),
        (
            lambda t: t.replace("n_trials = 3", 'n_trials = "three"'),
            ("search.n_trials", "expected an integer"),
        ),
        (
            lambda t: t.replace('markers = ["a", "e"]', 'markers = "a"'),
            ("markers", "expected a list"),
        ),
        (lambda t: t.replace("n_trials = 3", "n_trials = 0"), ("search.n_trials",)),
        (lambda t: t + "\n[search\n", ("not valid TOML",)),
    ],
)
def test_bad_toml(job, out, capsys, edit, needles):
    job.write_text(edit(job.read_text()))
    code, _, err = run_cli(["run", str(job), "--output", str(out)], capsys)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_unknown_storage_scheme(job, out, capsys):
    code, _, err = run_cli(
        ["run", str(job), "--storage", "mongodb://db/x", "--output", str(out)], capsys
    )
    assert_one_line_error(code, err, "--storage", "unknown storage scheme 'mongodb'")
    assert not out.exists()


@pytest.mark.parametrize("trials", ["0", "-5"])
def test_trials_must_be_positive(job, out, capsys, trials):
    code, _, err = run_cli(["run", str(job), "--trials", trials, "--output", str(out)], capsys)
    assert_one_line_error(code, err, "--trials", "greater than or equal to 1")
    assert not out.exists()


def test_output_directory_not_writable(job, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli(["run", str(job), "--output", str(blocker / "run")], capsys)
    assert_one_line_error(code, err, "not writable")
    code, _, err = run_cli(["run", str(job), "--output", "/proc/abfleet-run"], capsys)
    assert_one_line_error(code, err, "not writable")
    assert not (blocker / "run").exists()


def test_unknown_job_and_flag(capsys):
    code, _, err = run_cli(["run", "no-such-job"], capsys)
    assert_one_line_error(code, err, "no-such-job", "does not exist")
    code, _, err = run_cli(["run", "--no-such-flag"], capsys)
    assert_one_line_error(code, err, "--no-such-flag")


def test_real_process_prints_one_line_and_exits_2(job, tmp_path):
    """The same through a real process: what a script calling abfleet sees."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "abfleet",
            "run",
            str(job),
            "--model",
            "/nope/x",
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert not (tmp_path / "o").exists()
