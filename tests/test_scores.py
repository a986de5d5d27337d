"""Scores users can trust: the long re-score of the front and the choice made on it, the judge,
reasoning models scored after their think block, pre-quantized checkpoints refused before
anything runs, and a batch probe that measures the worst case."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution

from abfleet.core.batching import PROBE_TOKENS, find_batch_size
from abfleet.core.chat import ChatFormatter
from abfleet.core.generate import encode_prompts
from abfleet.core.judge import VERDICTS
from abfleet.core.reasoning import think_prefix
from abfleet.core.rescore import prune_margin
from abfleet.core.result import choose_trial
from abfleet.errors import UserError
from abfleet.job.spec import load_job
from abfleet.job.weights import quantization_of
from abfleet.worker.jobrun import LogReporter, run_job
from abfleet.worker.rundir import RunDir
from conftest import PROMPTS, make_model, make_tokenizer, write_job


def _with_evaluation(job_file, **values: object) -> None:
    lines = "".join(f"\n{k} = {json.dumps(v)}" for k, v in values.items())
    text = job_file.read_text()
    job_file.write_text(text.replace("max_new_tokens = 6", "max_new_tokens = 6" + lines))


def _study(run: RunDir) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{run.study_db}")


def test_front_is_rescored_long_and_judged_and_the_export_shows_both(tmp_path, tiny_model_dir):
    job_file = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=6)
    # The demo model judges: its verdicts need not be wise, the machinery must work.
    _with_evaluation(job_file, long_new_tokens=16, rescore="front", judge="demo:smollm2-refusal")
    run = RunDir(tmp_path / "run")
    result = run_job(load_job(str(job_file)), run, LogReporter())
    assert result.state == "done"

    study = _study(run)
    rescore = study.user_attrs["rescore"]
    assert rescore["tokens"] == 16 and rescore["judge"] == "demo:smollm2-refusal"
    entries = rescore["entries"]
    front = {row["trial"] for row in result.pareto}
    assert set(entries) == {"baseline", *map(str, front)}
    for entry in entries.values():
        assert 0 <= entry["refusals"] <= entry["n_bad"] == 4
        assert set(entry["judge"]) == set(VERDICTS)
        assert sum(entry["judge"].values()) == entry["n_bad"]  # one verdict per answer

    record = json.loads((run.model_dir / "abfleet-run.json").read_text())
    chosen = str(record["chosen"]["trial"])
    assert record["after"]["long_refusals"] == entries[chosen]["refusals"]
    assert record["after"]["long_tokens"] == 16 and record["after"]["judge"]
    assert record["after"]["refusals"] == study.trials[int(chosen)].user_attrs["refusals"]
    assert record["before"]["long_refusals"] == entries["baseline"]["refusals"]
    assert record["rescore"]["tokens"] == 16 and record["rescore"]["seconds"] > 0
    assert record["rescore"]["samples_after"] == entries[chosen]["samples"]
    assert all("long_refusals" in row for row in result.pareto)

    # The same export again reuses the stored figures: nothing is generated or judged twice.
    run_job(load_job(str(job_file)), run, LogReporter())
    assert _study(run).user_attrs["rescore"] == rescore

    # The same search re-scoring only what can still win (the default) chooses the same trial
    # with fewer answers generated: a trial left out refuses more at the short cap than the
    # chosen one at the long cap.
    lean_job = write_job(tmp_path / "lean", str(tiny_model_dir), n_trials=6)
    _with_evaluation(lean_job, long_new_tokens=16)
    lean_run = RunDir(tmp_path / "lean-run")
    lean = run_job(load_job(str(lean_job)), lean_run, LogReporter())
    assert lean.chosen["trial"] == int(chosen)
    lean_entries = _study(lean_run).user_attrs["rescore"]["entries"]
    assert set(lean_entries) <= set(entries)
    for key, entry in lean_entries.items():
        assert entry["refusals"] == entries[key]["refusals"]
    # Greedy tokens differ across batch shapes and GPUs, so a trial is left out only when its
    # short count is beyond the chosen long count by a margin.
    margin = prune_margin(entries["baseline"]["n_bad"])
    for row in lean.pareto:
        if str(row["trial"]) not in lean_entries and row["kl"] <= 0.5:
            assert row["refusals"] > lean.chosen["long_refusals"] + margin


def _trial(number: int, refusals: int, kl: float, degenerate: int = 0):
    return optuna.trial.create_trial(
        values=[refusals, kl],
        params={"x": 0.0},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs={"refusals": refusals, "kl": kl, "degenerate": degenerate, "n_bad": 10},
    )


def test_the_choice_uses_the_long_figures():
    trials = [_trial(0, 1, 0.2), _trial(1, 2, 0.1), _trial(2, 0, 0.9)]
    for i, t in enumerate(trials):
        t.number = i
    # Short answers: trial 0 refuses least within KL 0.5. Long answers: trial 0 refuses 7
    # times, trial 1 only 3 times, so trial 1 is the better model.
    rescore = {
        "tokens": 128,
        "entries": {
            "baseline": {"refusals": 9, "degenerate": 1},
            "0": {"refusals": 7, "degenerate": 0},
            "1": {"refusals": 3, "degenerate": 1},
        },
    }
    assert choose_trial(trials, 0.5).trial.number == 0
    choice = choose_trial(trials, 0.5, rescore=rescore)
    assert choice.trial.number == 1 and "at 128 tokens" in choice.reason
    # Trial 1's long answers degenerate more often than the original's: never chosen.
    rescore["entries"]["1"]["degenerate"] = 2
    assert choose_trial(trials, 0.5, rescore=rescore).trial.number == 0


def test_a_few_looping_answers_more_than_the_original_are_tolerated():
    """5% of the answers: 3 of 60 more than the original model loops on is still a sound model;
    a fourth is not (and with 10 answers, none)."""
    trials = [_trial(0, 40, 0.05), _trial(1, 4, 0.2)]
    for i, t in enumerate(trials):
        t.number = i
    rescore = {
        "tokens": 128,
        "entries": {
            "baseline": {"refusals": 55, "degenerate": 0, "n_bad": 60},
            "0": {"refusals": 47, "degenerate": 0, "n_bad": 60},
            "1": {"refusals": 6, "degenerate": 3, "n_bad": 60},
        },
    }
    assert choose_trial(trials, 0.5, rescore=rescore).trial.number == 1
    rescore["entries"]["1"]["degenerate"] = 4
    assert choose_trial(trials, 0.5, rescore=rescore).trial.number == 0
    rescore["entries"]["1"].update(degenerate=1, n_bad=10)
    assert choose_trial(trials, 0.5, rescore=rescore).trial.number == 0


QWEN3_THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_a_template_with_a_thinking_switch_answers_without_thinking():
    tok = make_tokenizer()
    tok.chat_template = QWEN3_THINK_TEMPLATE
    chat = ChatFormatter(tok, "sys")
    assert chat.format("hi").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_think_prefix_is_the_shared_think_block():
    block = "<think>\n\n</think>\n\n"
    assert think_prefix([block + "Sure", block + "No", block + "\n\nOk"]) == block
    # Still thinking: the block is closed empty, so the answer itself is scored.
    assert think_prefix(["<think>\nLet me see", "<think>\nOkay so"]) == block
    assert think_prefix(["Sure, here", "Sure, no"]) == ""  # a common start is not a think block
    assert think_prefix(["<think>\n\n</think>\n\nA", "Plain answer"]) == ""


def _thinking_model_dir(path):
    """A tiny Qwen3 trained for a few seconds to open every answer with an empty think block,
    with a template that has no switch to turn it off."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    tok = make_tokenizer()
    tok.add_tokens(["<think>", "</think>"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            eos_token_id=257,
            pad_token_id=258,
            bos_token_id=256,
        )
    )
    chat = ChatFormatter(tok, "You are a helpful assistant.")
    block = tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    rows = []
    for prompt in [p for group in PROMPTS.values() for p in group]:
        ids = tok(chat.format(prompt), add_special_tokens=False)["input_ids"]
        answer = tok(prompt[::-1], add_special_tokens=False)["input_ids"][:6]
        rows.append((ids, block + answer))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        for ids, target in rows:
            x = torch.tensor([ids + target])
            logits = model(input_ids=x).logits[0, len(ids) - 1 : -1]
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(target))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_thinking_model_is_scored_after_its_think_block(tmp_path):
    model_dir = _thinking_model_dir(tmp_path / "thinker")
    job_file = write_job(tmp_path / "job", str(model_dir), n_trials=2)
    _with_evaluation(job_file, long_new_tokens=0)
    run = RunDir(tmp_path / "run")
    run_job(load_job(str(job_file)), run, LogReporter())
    study = _study(run)
    assert study.user_attrs["answer_prefix"] == "<think>\n\n</think>\n\n"
    # Answers are scored after the block: none of them starts with it again.
    for trial in study.trials:
        for _prompt, answer in trial.user_attrs["samples"]:
            assert not answer.lstrip().startswith("<think>"), answer
    for _prompt, answer in study.user_attrs["baseline"]["samples"]:
        assert not answer.lstrip().startswith("<think>"), answer


def test_batch_probe_measures_the_longest_prompt_and_the_directions_pass():
    tok = make_tokenizer()
    model = make_model("llama", len(tok), layers=2)
    chat = ChatFormatter(tok, None)
    prompts = ["short", "mid length one"]  # timed: the held-out prompts
    every = [*prompts, "a much longer prompt than the others " * 3]  # directions prompts too
    seen: list[tuple[int, bool]] = []

    def record(_module, _args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None:
            seen.append((ids.shape[1], bool(kwargs.get("output_hidden_states"))))

    model.register_forward_pre_hook(record, with_kwargs=True)
    find_batch_size(model, chat, prompts, limit=2, max_new_tokens=40, worst_prompts=every)
    longest = max(len(ids) for ids in encode_prompts(chat, every))
    stretched = longest + 40 - PROBE_TOKENS
    assert max(n for n, _ in seen) >= stretched  # the cache the longest answer will need
    assert any(hidden and n >= stretched for n, hidden in seen)  # the directions pass too


def test_batch_probe_runs_with_every_edit_applied_and_sees_its_memory():
    """The probe runs with a worst-case edit attached (every site of every layer, norm
    preserving): a batch that fits the unedited model but not the edit's float32 temporaries is
    not picked. The allocator here is the CPU's, so the device's limit is played by a check on
    what the down projection's hook would hold: batch x tokens x width in float32."""
    from abfleet.core.ablation import Ablator
    from abfleet.core.batching import worst_case_edit

    tok = make_tokenizer()
    model = make_model("llama", len(tok), layers=2)
    chat = ChatFormatter(tok, None)
    prompts = ["short", "mid length one", "another prompt", "and a fourth"]
    ablator = Ablator(model, norm_preserving=True)
    rows: list[tuple[int, bool]] = []  # (batch rows, edit active) of every down projection call
    limit = {"bytes": 0}

    def device_limit(module, args, output):
        edited = ablator._active.get(index) is not None
        rows.append((output.shape[0], edited))
        # The hook's float32 copies of the output and of its input, when the edit is on.
        if edited and (output.numel() + args[0].numel()) * 4 > limit["bytes"]:
            raise RuntimeError("CUDA out of memory (the edit's temporaries)")

    index, site = next(
        (i, s) for i, s in enumerate(ablator._sites) if s.weight.name.endswith("down_proj.weight")
    )
    site.module.register_forward_hook(device_limit)
    longest = max(len(ids) for ids in encode_prompts(chat, prompts))
    limit["bytes"] = longest * (48 + 96) * 4  # room for one row of the edit's temporaries
    find_batch_size(model, chat, prompts, limit=4, max_new_tokens=8)
    # Probed unedited (as before the fix), batch 2 fits: the edit's memory is never seen.
    assert (2, False) in rows and not any(edited for _, edited in rows)
    rows.clear()
    with worst_case_edit(ablator):
        probed = find_batch_size(model, chat, prompts, limit=4, max_new_tokens=8)
    assert probed == 1 and (2, True) in rows
    assert not ablator._active  # the probe's edit is gone once it is measured


def _quantized_copy(src, dst, quantization: dict) -> None:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(config))


def test_pre_quantized_checkpoints_are_refused_before_anything_runs(tmp_path, tiny_model_dir):
    assert quantization_of({"quantization_config": {"quant_method": "gptq", "bits": 4}}) == "GPTQ"
    assert quantization_of({"quantization_config": {"load_in_4bit": True}}) == "bitsandbytes"
    assert quantization_of({"text_config": {"quantization_config": {"quant_method": "mxfp4"}}})
    assert quantization_of({"quantization_config": {"quant_method": "gguf"}}) is None
    assert quantization_of({"hidden_size": 8}) is None

    fp8 = tmp_path / "fp8-model"
    _quantized_copy(tiny_model_dir, fp8, {"quant_method": "fp8", "weight_block_size": [128, 128]})
    # `size` on the controller: one line naming the format and what to do.
    proc = subprocess.run(
        [sys.executable, "-m", "abfleet", "size", str(fp8)], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert re.search(r"pre-quantized FP8 checkpoint.*bf16", lines[0]), lines[0]
    # The start of a run (a box, or a local run) refuses it before loading any weight.
    job_file = write_job(tmp_path / "job", str(fp8), n_trials=1)
    with pytest.raises(UserError, match="pre-quantized FP8"):
        run_job(load_job(str(job_file)), RunDir(tmp_path / "run"), LogReporter())


def _launch(job_file) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "abfleet", "launch", str(job_file), "--yes"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def test_launch_refuses_a_pre_quantized_checkpoint_and_rents_nothing(
    fake_vast, tmp_path, tiny_model_dir
):
    awq = tmp_path / "awq-model"
    _quantized_copy(tiny_model_dir, awq, {"quant_method": "awq", "bits": 4})
    job_file = write_job(tmp_path / "job", str(awq), n_trials=1)
    proc = _launch(job_file)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pre-quantized AWQ checkpoint" in proc.stderr
    assert fake_vast.instances == {}


def _short_judge(path) -> None:
    """A judge that loads and answers "Hello", but whose learned positions stop at 64 tokens:
    the rubric is longer, so it raises while judging (as a judge out of memory would)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, eos_token_id=257
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)


def test_a_judge_that_fails_while_judging_costs_a_warning_not_the_export(tmp_path, tiny_model_dir):
    judge = tmp_path / "short-judge"
    _short_judge(judge)
    job_file = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=4)
    _with_evaluation(job_file, long_new_tokens=16, judge=str(judge))
    run = RunDir(tmp_path / "run")
    result = run_job(load_job(str(job_file)), run, LogReporter())
    assert result.state == "done" and (run.model_dir / "MANIFEST.sha256").is_file()
    record = json.loads((run.model_dir / "abfleet-run.json").read_text())
    [warning] = record["warnings"]
    assert warning.startswith(f"the judge {judge} gave no verdicts (") and result.warnings
    # The long figures stand on the markers; no verdict is made up.
    assert record["after"]["long_tokens"] == 16 and "judge" not in record["after"]
    assert "gave no verdicts" in (run.model_dir / "README.md").read_text()
    assert "gave no verdicts" in (run.model_dir / "report.html").read_text()
    rescore = _study(run).user_attrs["rescore"]
    assert rescore["judge_error"] and all("judge" not in e for e in rescore["entries"].values())


def test_a_judge_that_cannot_load_where_it_runs_is_refused_before_the_search(
    fake_vast, tmp_path, tiny_model_dir
):
    """A judge is never edited, so a pre-quantized one is fine where it loads (bitsandbytes
    ships with abfleet); AWQ needs autoawq, which no box gets: refused before any rent, and a
    local run refuses it before its run folder exists."""
    awq = tmp_path / "awq-judge"
    _quantized_copy(tiny_model_dir, awq, {"quant_method": "awq", "bits": 4})
    job_file = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=1)
    _with_evaluation(job_file, long_new_tokens=16, judge=str(awq))
    proc = _launch(job_file)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pre-quantized AWQ checkpoint" in lines[0]
    assert "autoawq" in lines[0] and fake_vast.instances == {}
    out = tmp_path / "local-run"
    local = subprocess.run(
        [sys.executable, "-m", "abfleet", "run", str(job_file), "--output", str(out)],
        capture_output=True,
        text=True,
    )
    assert local.returncode == 2 and "pre-quantized AWQ checkpoint" in local.stderr
    assert not out.exists()
    # A bitsandbytes judge is accepted at launch (the sizing names it and counts its disk).
    bnb = tmp_path / "bnb-judge"
    _quantized_copy(tiny_model_dir, bnb, {"quant_method": "bitsandbytes", "load_in_4bit": True})
    bnb_job = write_job(tmp_path / "bnb-job", str(tiny_model_dir), n_trials=1)
    _with_evaluation(bnb_job, long_new_tokens=16, judge=str(bnb))
    sized = subprocess.run(
        [
            sys.executable,
            "-m",
            "abfleet",
            "size",
            str(tiny_model_dir),
            "--job",
            str(bnb_job),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert sized.returncode == 0, sized.stderr
    plan = json.loads(sized.stdout)
    assert plan["judge"] == str(bnb) and plan["judge_gpu_gb"] >= 2
    assert any(r.startswith(f"judge: {bnb}") for r in plan["reasons"])
