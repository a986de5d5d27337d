"""The compute dtype per device (abfleet.precision): the rules on the facts they read, the CPU
probe and its cache, and that loading, the demo build and `run` use what it returns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from abfleet import precision
from abfleet.core.model import ModelSource, load_model
from abfleet.errors import UserError
from conftest import abfleet_env, make_model, make_tokenizer, write_job

AVX2 = precision.CpuVerdict(False, 60.0, 1.2, "AVX2", "probe")
AVX512_BF16 = precision.CpuVerdict(True, 95.0, 240.0, "AVX512", "probe")


def test_an_avx2_cpu_gets_float32_and_is_told_why():
    p = precision.for_cpu(AVX2)
    assert p.chain == ("float32",)
    assert p.reason == "bf16 is 50x slower than float32 on this CPU (AVX2)"


def test_a_cpu_with_native_bf16_gets_bfloat16():
    p = precision.for_cpu(AVX512_BF16)
    assert p.chain == ("bfloat16", "float32")
    assert "native" in p.reason and "2.5x float32's matmul speed" in p.reason


@pytest.mark.parametrize(
    ("capability", "chain"),
    [
        ((7, 0), ("float16", "float32")),  # V100
        ((7, 5), ("float16", "float32")),  # T4, RTX 20xx
        ((8, 0), ("bfloat16", "float32")),  # A100
        ((9, 0), ("bfloat16", "float32")),  # H100/H200
        ((6, 1), ("float32",)),  # Pascal
    ],
)
def test_cuda_dtype_follows_compute_capability(capability, chain):
    p = precision.for_cuda(capability, "GPU X")
    assert p.chain == chain
    assert f"compute capability {capability[0]}.{capability[1]}" in p.reason


def test_forced_verdict_and_a_bad_value(monkeypatch):
    monkeypatch.setenv(precision.FORCE_ENV, "slow")
    verdict = precision.cpu_verdict()
    assert not verdict.native and verdict.source == f"forced by {precision.FORCE_ENV}"
    assert precision.plan(["auto", "bfloat16", "float16", "float32"], "cpu")[0][0] == "float32"
    monkeypatch.setenv(precision.FORCE_ENV, "native")
    assert precision.plan(["auto"], "cpu")[0][0] == "bfloat16"
    monkeypatch.setenv(precision.FORCE_ENV, "maybe")
    with pytest.raises(UserError, match="use native or slow"):
        precision.cpu_verdict()


def test_a_user_given_dtype_list_is_obeyed(monkeypatch):
    monkeypatch.setenv(precision.FORCE_ENV, "slow")
    assert precision.plan(["bfloat16", "float32"], "cpu") == [
        ("bfloat16", "as the job's dtype list asks"),
        ("float32", "as the job's dtype list asks"),
    ]
    # auto's fallbacks come before the rest of the list, and nothing is tried twice.
    monkeypatch.setenv(precision.FORCE_ENV, "native")
    assert [d for d, _ in precision.plan(["auto", "float16", "float32"], "cpu")] == [
        "bfloat16",
        "float32",
        "float16",
    ]


def test_the_probe_measures_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    monkeypatch.setenv("ABFLEET_CACHE_DIR", str(tmp_path / "cache"))
    first = precision.cpu_verdict()
    assert first.source == "probe" and first.float32_gflops > 0 and first.bfloat16_gflops > 0
    assert first.capability == torch.backends.cpu.get_cpu_capability()
    assert first.native == (first.bfloat16_gflops >= 0.8 * first.float32_gflops)
    second = precision.cpu_verdict()
    assert second.source == "cached probe"
    assert (second.native, second.float32_gflops) == (first.native, first.float32_gflops)
    cached = json.loads((tmp_path / "cache" / "cpu-bf16.json").read_text())
    assert len(cached) == 1 and next(iter(cached.values()))["native"] == first.native


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory):
    """A tiny Llama saved in bfloat16, as most checkpoints are."""
    path = tmp_path_factory.mktemp("tiny-bf16")
    tok = make_tokenizer()
    make_model("llama", len(tok)).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize(("verdict", "expected"), [("slow", "float32"), ("native", "bfloat16")])
def test_auto_loads_what_the_resolver_picks(bf16_model_dir, monkeypatch, verdict, expected):
    monkeypatch.setenv(precision.FORCE_ENV, verdict)
    loaded = load_model(ModelSource("dir", str(bf16_model_dir)))
    assert loaded.dtype == expected
    assert next(loaded.model.parameters()).dtype == getattr(torch, expected)
    assert loaded.dtype_reason == precision.resolve("cpu").reason and not loaded.fell_back


def test_a_listed_bfloat16_loads_as_bfloat16_on_a_slow_cpu(bf16_model_dir, monkeypatch):
    monkeypatch.setenv(precision.FORCE_ENV, "slow")
    loaded = load_model(ModelSource("dir", str(bf16_model_dir)), ("bfloat16",))
    assert loaded.dtype == "bfloat16" and loaded.dtype_reason == "as the job's dtype list asks"


def test_float16_that_overflows_falls_back_to_float32(tmp_path):
    """What a GPU without bf16 runs (float16, then float32): logits that overflow float16's
    range fail the smoke test, and float32 loads, saying why."""
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)  # logits far beyond float16's 65504
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(ModelSource("dir", str(tmp_path)), precision.for_cuda((7, 5)).chain)
    assert loaded.dtype == "float32" and loaded.fell_back
    assert "float16: non-finite logits" in loaded.dtype_reason


def test_the_demo_build_is_keyed_by_the_dtype_it_trains_in(monkeypatch, tmp_path):
    from abfleet.demo import refusal_tune
    from abfleet.job.source import model_identity

    monkeypatch.setenv("ABFLEET_CACHE_DIR", str(tmp_path))
    found = {}
    for verdict in ("slow", "native"):
        monkeypatch.setenv(precision.FORCE_ENV, verdict)
        found[verdict] = (
            refusal_tune.build_dtype(),
            refusal_tune.cached_model_dir().name,
            model_identity("demo:smollm2-refusal"),
        )
    assert found["slow"][0] == "float32" and found["native"][0] == "bfloat16"
    assert found["slow"][1].endswith("-float32") and found["native"][1].endswith("-bfloat16")
    assert found["slow"][2] != found["native"][2]  # a study of one is not resumed on the other


@pytest.mark.parametrize("verdict", ["slow", "native"])
def test_run_uses_the_resolver_and_says_so(tmp_path, bf16_model_dir, verdict):
    job = write_job(tmp_path / "job", str(bf16_model_dir), n_trials=1)
    text = job.read_text().replace('dtypes = ["float32"]', 'dtypes = ["auto"]')
    job.write_text(text)
    out = tmp_path / "run"
    env = abfleet_env(**{precision.FORCE_ENV: verdict})
    proc = subprocess.run(
        [sys.executable, "-m", "abfleet", "run", str(job), "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout[-2000:]
    expected = "float32" if verdict == "slow" else "bfloat16"
    reason = f"{precision.FORCE_ENV}={verdict}"
    assert f"dtype {expected}: " in proc.stdout and reason in proc.stdout
    record = json.loads((out / "model" / "abfleet-run.json").read_text())
    assert record["model"]["dtype"] == expected and reason in record["model"]["dtype_reason"]
    status = json.loads((out / "status-0.json").read_text())
    assert status["dtype"] == expected and reason in status["dtype_reason"]
