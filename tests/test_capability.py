"""The capability check (lm-evaluation-harness) on a finished run of the tiny model: tasks
defined in tests/lmeval_tasks (YAML + local JSONL: multiple choice and generation), run on the
original and on the export; one task whose data cannot be had."""

from __future__ import annotations

import json

from abfleet.core.capability import headline


def test_the_figures_land_in_the_record_the_card_and_the_summary(finished_run):
    run, result = finished_run
    record = json.loads((run.model_dir / "abfleet-run.json").read_text())
    table = record["benchmarks"]
    assert set(table) == {"abfleet_capitals", "abfleet_sums"}
    assert table["abfleet_capitals"]["metric"] == "acc"
    assert table["abfleet_sums"]["metric"] == "exact_match"
    for row in table.values():
        assert row["n"] == 12  # benchmark_limit
        assert 0.0 <= row["before"] <= 1.0 and 0.0 <= row["after"] <= 1.0
        assert abs(row["diff"] - (row["after"] - row["before"])) < 1e-12
    assert record["benchmark_seconds"] > 0
    assert any("benchmark abfleet_missing could not run" in w for w in record["warnings"])
    assert result.benchmarks == table
    card = (run.model_dir / "README.md").read_text()
    assert "## Capability (lm-evaluation-harness)" in card
    assert "| abfleet_capitals | acc |" in card and "| abfleet_sums | exact_match |" in card
    assert "abfleet_missing could not run" in card  # under Warnings


def test_headline_prefers_the_normalized_accuracy_and_skips_stderr():
    results = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6}
    assert headline(results) == ("acc_norm", 0.6)
    assert headline({"exact_match,strip": 0.25, "exact_match_stderr,strip": 0.1}) == (
        "exact_match",
        0.25,
    )


def test_size_counts_the_check_and_a_bad_task_folder_is_one_line(tmp_path, tiny_model_dir):
    from conftest import write_job
    from test_launch import abfleet

    job = write_job(tmp_path / "job", str(tiny_model_dir))
    job.write_text(
        job.read_text().replace("[evaluation]\n", "[evaluation]\nbenchmark = ['gsm8k']\n")
    )
    sized = abfleet("size", str(tiny_model_dir), "--job", str(job))
    said = " ".join(sized.stdout.split())
    assert sized.returncode == 0 and "capability check: gsm8k (100 examples each)" in said
    assert "counted in the budget" in said

    bad = abfleet(
        "run",
        str(job),
        "--benchmark",
        "x",
        "--benchmark-tasks",
        str(tmp_path / "nowhere"),
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "is not a folder of lm-eval task YAML files" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
