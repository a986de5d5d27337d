"""Sizing against config.json files written from published architecture figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from abfleet.fleet.sizing import plan, shape_from_config

LLAMA_31_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
LLAMA_31_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
QWEN25_32B = {
    "model_type": "qwen2",
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
MISTRAL_7B_V03 = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32768,
    "tie_word_embeddings": False,
}
MIXTRAL_8X7B = {
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
}
GEMMA3_12B = {
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text",
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "vocab_size": 262208,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 896,
    },
}
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "tie_word_embeddings": False,
}

# Parameter counts published on the models' pages (safetensors totals).
PUBLISHED = [
    ("Llama-3.1-8B", LLAMA_31_8B, 8_030_261_248),
    ("Llama-3.1-70B", LLAMA_31_70B, 70_553_706_496),
    ("Qwen2.5-32B", QWEN25_32B, 32_763_876_352),
    ("Mistral-7B-v0.3", MISTRAL_7B_V03, 7_248_023_552),
    ("Mixtral-8x7B", MIXTRAL_8X7B, 46_702_792_704),
    ("Gemma-3-12B", GEMMA3_12B, 12_187_325_040),
    ("Qwen3-30B-A3B", QWEN3_30B_A3B, 30_532_122_624),
]


@pytest.mark.parametrize(("name", "config", "published"), PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_parameter_count_within_two_percent_of_published(name, config, published):
    shape = shape_from_config(config)
    assert abs(shape.params - published) / published < 0.02, (name, shape.params)


def test_disk_follows_formula_and_field_minimums():
    small = plan(shape_from_config(LLAMA_31_8B), "llama-8b")
    assert small.disk_gb == 60  # 2 x 16.1 GB + 20 = 52.1 -> rounded up to 60
    big = plan(shape_from_config(QWEN25_32B), "qwen-32b")
    assert big.disk_gb == 200  # 2 x 65.5 + 20 = 151 -> raised to the 32B minimum
    huge = plan(shape_from_config(LLAMA_31_70B), "llama-70b")
    assert huge.disk_gb == 310  # 2 x 141.1 + 20 = 302.2 -> 310 (above the 300 minimum)
    assert any("field minimum" in r for r in big.reasons)


def test_the_choice_is_the_lowest_estimated_job_cost_that_fits():
    for config in (LLAMA_31_8B, QWEN25_32B, LLAMA_31_70B, MIXTRAL_8X7B, GEMMA3_12B):
        p = plan(shape_from_config(config), "m")
        chosen = next(c for c in p.candidates if c["gpu"] == p.gpu and c["count"] == p.gpu_count)
        # A GPU without bf16 (float16 can overflow) only when asked for with --gpu.
        with_bf16 = [c for c in p.candidates if c["gpu"] != "Tesla_V100"]
        assert chosen["est_job_cost"] == min(c["est_job_cost"] for c in with_bf16)
        usable = p.gpu_count * p.gpu_memory_each_gb * 0.9
        resident = p.gpu_memory_gb - (p.memory_parts["reset copy"] if p.reset_copy == "cpu" else 0)
        assert resident <= usable
        assert all(len(r.splitlines()) == 1 for r in p.reasons)
    # With the ablation as deltas there is no reset copy: an 8B model on one 24 GB card, a 32B
    # model on one 80 GB card (at a halved batch), a 70B in bf16 on two large cards, in 8 bits
    # on one H200 and in 4 bits on one 80 GB card.
    p8 = plan(shape_from_config(LLAMA_31_8B), "llama-8b")
    assert (p8.gpu_count, p8.gpu_memory_each_gb, p8.reset_copy) == (1, 24, "device")
    assert "reset copy" not in p8.memory_parts and p8.memory_parts["deltas"] < 0.01
    p32 = plan(shape_from_config(QWEN25_32B), "qwen-32b")
    assert any(c["count"] == 1 and c["gpu"] in ("H100_SXM", "A100_SXM4") for c in p32.candidates)
    p70 = plan(shape_from_config(LLAMA_31_70B), "llama-70b")
    assert p70.gpu_count * p70.gpu_memory_each_gb >= 160
    eight, four = p70.by_quantization["bnb-8bit"], p70.by_quantization["bnb-4bit"]
    assert (eight["count"], eight["gpu"]) == (1, "H200")
    assert four["count"] == 1 and four["gpu_memory_gb"] < 72  # 90% of an 80 GB card
    q4 = plan(shape_from_config(LLAMA_31_70B), "llama-70b", quantization="bnb-4bit")
    assert q4.memory_parts["weights"] < 0.32 * p70.memory_parts["weights"]  # head stays bf16
    assert "dequantize scratch" in q4.memory_parts and q4.disk_gb == p70.disk_gb  # export: bf16
    moe = plan(shape_from_config(MIXTRAL_8X7B), "mixtral")
    assert moe.memory_parts["weights"] > 93  # all experts count: 46.7B params in bf16


def test_host_ram_is_one_shard_not_the_model():
    p70 = plan(shape_from_config(LLAMA_31_70B), "llama-70b")
    # 8 runtime + 1.07 unedited layers kept + 5 (a default shard) + 3 x float32 of the
    # 8192 x 28672 down_proj = 16.9 -> 17
    assert p70.host_ram_gb == 17
    assert any(r.startswith("host RAM: 17 GB") for r in p70.reasons)


def test_host_ram_counts_the_unedited_layer_store_as_the_box_caps_it():
    from abfleet.core import unedited
    from abfleet.fleet import sizing

    assert round(unedited.MAX_BYTES / 1e9, 2) == sizing.UNEDITED_STORE_GB


def test_norm_preserving_experts_keep_a_reset_copy():
    plain = plan(shape_from_config(MIXTRAL_8X7B), "mixtral")
    kept = plan(shape_from_config(MIXTRAL_8X7B), "mixtral", norm_preserving=True)
    assert "reset copy" not in plain.memory_parts
    assert kept.memory_parts["reset copy"] == pytest.approx(32 * 8 * 14336 * 4096 * 2 / 1e9, 1e-3)
    dense = plan(shape_from_config(LLAMA_31_8B), "llama", norm_preserving=True)
    assert "reset copy" not in dense.memory_parts  # 2-D weights keep their norms as deltas


def test_touched_params_count_only_the_edited_matrices():
    shape = shape_from_config(LLAMA_31_8B)
    per_layer = 4096 * 4096 + 14336 * 4096  # o_proj + down_proj
    assert shape.touched_params == 32 * per_layer
    moe = shape_from_config(MIXTRAL_8X7B)
    assert moe.touched_params == 32 * (4096 * 4096 + 8 * 14336 * 4096)


def test_size_command_json_on_a_local_directory(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "abfleet", "size", str(tiny_model_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    # Exact count from the safetensors header of the tiny model.
    from safetensors.torch import load_file

    exact = sum(t.numel() for t in load_file(tiny_model_dir / "model.safetensors").values())
    assert data["params"] == exact and data["params_source"] == "safetensors metadata"
    assert data["disk_gb"] >= 20 and data["gpu"] is not None


def test_size_command_text_output_explains_every_figure(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "abfleet", "size", str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("parameters", "weights", "disk", "GPU memory", "GPU", "rounded up"):
        assert word in proc.stdout


def test_a_chosen_gpu_is_used_when_it_holds_the_model_and_refused_with_the_reason_otherwise():
    from abfleet.errors import UserError
    from abfleet.fleet.sizing import with_gpu

    p70 = plan(shape_from_config(LLAMA_31_70B), "llama-70b")
    four = with_gpu(p70, "H200x4")
    assert (four.gpu, four.gpu_count) == ("H200", 4)
    assert four.reasons[-1] == "GPU: 4x H200, as chosen with --gpu (fits at batch 64)"
    fewest = with_gpu(p70, "h200")  # no count: the fewest that hold it
    assert (fewest.gpu, fewest.gpu_count, fewest.reset_copy) == ("H200", 2, "device")
    with pytest.raises(
        UserError, match=r"1x H200 holds 127 GB usable, but this model needs 15\d GB;"
    ):
        with_gpu(p70, "H200x1")
    # A card the default batch overflows is taken at a smaller batch, as sizing planned it.
    p32 = plan(shape_from_config(QWEN25_32B), "qwen-32b")
    h100 = with_gpu(p32, "H100_SXM")
    assert h100.gpu_count == 1 and h100.gpu_memory_gb <= 72 and "batch 32" in h100.reasons[-1]
    with pytest.raises(UserError, match=r"1x RTX_4090 holds \d+ GB usable, but this model needs"):
        with_gpu(p70, "RTX_4090x1")
    with pytest.raises(UserError, match="unknown GPU type 'B9000'"):
        with_gpu(p70, "B9000")
    with pytest.raises(UserError, match="boxes come with"):
        with_gpu(p70, "H200x3")


def test_offers_search_the_chosen_gpu_type(fake_vast, tiny_model_dir):
    from test_launch import abfleet

    chosen = abfleet("offers", str(tiny_model_dir), "--gpu", "RTX_4090", "--json")
    assert chosen.returncode == 0, chosen.stderr
    assert {o["gpu_name"] for o in json.loads(chosen.stdout)} == {"RTX 4090"}
    default = abfleet("offers", str(tiny_model_dir), "--json")
    assert {o["gpu_name"] for o in json.loads(default.stdout)} != {"RTX 4090"}


def test_size_of_a_directory_with_only_config_json(tmp_path):
    # A user sizes a 70B before downloading 140 GB: config.json is enough.
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_70B))
    proc = subprocess.run(
        [sys.executable, "-m", "abfleet", "size", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert abs(data["params"] - 70_553_706_496) / 70_553_706_496 < 0.02
    assert data["params_source"] == "config.json" and data["disk_gb"] >= 300


def test_size_json_of_a_72b_config_per_quantization():
    """The shipped Qwen2.5-72B config (config.json only): bf16 needs two large cards, the
    4-bit plan one 80 GB card; the export (disk) stays full precision in both."""
    root = Path(__file__).resolve().parent.parent / "benchmarks" / "configs" / "qwen2.5-72b"

    def size(*extra):
        proc = subprocess.run(
            [sys.executable, "-m", "abfleet", "size", str(root), "--json", *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    full, four = size(), size("--quantization", "bnb-4bit")
    assert full["quantization"] == "none" and full["gpu_count"] == 2
    assert four["quantization"] == "bnb-4bit" and four["gpu_count"] == 1
    assert four["gpu_memory_each_gb"] == 80 and four["disk_gb"] == full["disk_gb"]
    assert full["by_quantization"]["bnb-4bit"]["gpu"] == four["gpu"]
    assert 10 <= full["host_ram_gb"] <= 20


def test_a_gpu_without_bf16_is_planned_at_float16_width_with_a_note_on_speed():
    from abfleet.fleet.sizing import with_gpu

    p8 = plan(shape_from_config(LLAMA_31_8B), "llama-8b")
    assert p8.compute_dtype == "bfloat16" and not any(r.startswith("dtype:") for r in p8.reasons)
    v100 = with_gpu(p8, "Tesla_V100")
    assert v100.compute_dtype == "float16"
    assert "dtype: float16 (Tesla_V100 (compute capability 7.0) has no bf16" in v100.reasons[-2]
    assert v100.reasons[-1].startswith("speed: estimated at its 125 float16 TFLOPS")
    # float16 is bf16's width: the same batch needs the same memory on a card that has bf16.
    by_gpu = {c["gpu"]: c for c in p8.candidates}
    v, r = by_gpu["Tesla_V100"], by_gpu["RTX_5090"]
    assert v["batch"] == r["batch"] and v["gpu_memory_gb"] == r["gpu_memory_gb"]
    assert v100.gpu_memory_gb == v["gpu_memory_gb"]


def test_size_interruptible_costs_the_run_both_ways_at_the_stated_pause_rate():
    from test_launch import abfleet

    config = str(Path(__file__).resolve().parent.parent / "benchmarks" / "configs" / "qwen2.5-32b")
    args = ("size", config, "--interruptible", "--trials", "200", "--json")
    calm = json.loads(abfleet(*args, "--pauses-per-hour", "0").stdout)["cost"]
    # No pauses: the same hours, at half the GPU's price (the disk bills the same).
    assert calm["running_hours"] == calm["work_hours"] and calm["paused_hours"] == 0
    gpu = calm["on_demand_per_hour"] - calm["disk_per_hour"]
    assert abs(calm["bid_per_hour"] - (gpu / 2 + calm["disk_per_hour"])) < 1e-9
    rough = json.loads(abfleet(*args, "--pauses-per-hour", "1", "--pause-minutes", "30").stdout)
    cost = rough["cost"]
    assert cost["running_hours"] > cost["work_hours"]  # reloads and re-run trials
    assert abs(cost["paused_hours"] - cost["pauses"] * 0.5) < 1e-9
    assert abs(cost["pauses"] - cost["running_hours"]) < 1e-9  # one per running hour
    expected = (
        cost["running_hours"] * cost["bid_per_hour"] + cost["paused_hours"] * cost["disk_per_hour"]
    )
    assert abs(cost["interruptible_usd"] - expected) < 1e-9
    assert calm["interruptible_usd"] < cost["interruptible_usd"] < cost["on_demand_usd"]
    text = abfleet("size", config, "--interruptible", "--trials", "200")
    assert "interruptible at 50%" in " ".join(text.stdout.split())
