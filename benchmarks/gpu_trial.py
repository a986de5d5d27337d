"""Seconds per trial, decode speed and peak GPU memory on a CUDA GPU, for models of published
shapes with random bf16 weights (the hub is not reachable where GPUs are lent).

    python benchmarks/gpu_trial.py                          # Llama-3.1-8B shape
    python benchmarks/gpu_trial.py --shape qwen2.5-32b      # needs ~70 GB
    python benchmarks/gpu_trial.py --shape qwen2.5-72b --layers 20   # first 20 of 80 layers
    python benchmarks/gpu_trial.py --quantization bnb-4bit  # saved, reloaded through bitsandbytes

Shapes come from benchmarks/configs/<shape>/config.json. A trial is what the search runs:
apply a trial's ablation (deltas on the outputs), KL of the first answer token on 60 harmless
prompts, 30-token greedy answers to 60 harmful ones (random weights never hit a refusal marker,
so every answer runs to the cap: the worst case), reset. The bandwidth bound is the time the
decode steps need at the card's bandwidth if each step reads every weight once:
bytes of weights x decode steps / bandwidth. --layers truncates the depth (memory); the figures
are then also scaled to the full depth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

BANDWIDTH_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}


def card_bandwidth(name: str) -> float:
    return next((v for k, v in BANDWIDTH_TBPS.items() if k in name), 3.35)


def build(shape: str, layers: int | None, quantization: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from abfleet.core.model import ModelSource, load_model
    from conftest import make_tokenizer

    config = AutoConfig.from_pretrained(ROOT / "benchmarks" / "configs" / shape)
    full_layers = config.num_hidden_layers
    if layers:
        config.num_hidden_layers = layers
    tok = make_tokenizer()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if quantization == "none":
        return model.eval(), tok, full_layers
    folder = Path("/tmp/gpu_trial_model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    loaded = load_model(
        ModelSource("dir", str(folder)), ("bfloat16",), "auto", quantization=quantization
    )
    return loaded.model, tok, full_layers


def main() -> None:
    import torch

    from abfleet.core.ablation import AblationParams, Ablator, ComponentParams
    from abfleet.core.chat import ChatFormatter
    from abfleet.core.evaluate import Evaluator
    from abfleet.core.markers import MarkerMatcher
    from abfleet.job.spec import load_job

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--quantization", default="none", choices=("none", "bnb-8bit", "bnb-4bit"))
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_trial.py needs a CUDA GPU")

    started = time.monotonic()
    model, tok, full_layers = build(args.shape, args.layers, args.quantization)
    build_s = time.monotonic() - started
    if tok.chat_template is None:
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    chat = ChatFormatter(tok, None)
    job = load_job("refusal")
    prompts = job.load_all_prompts()
    evaluator = Evaluator(
        model,
        chat,
        prompts["good_eval"],
        prompts["bad_eval"],
        MarkerMatcher(job.spec.markers),
        args.tokens,
        args.batch_size,
    )
    ablator = Ablator(model)
    n = ablator.n_layers
    d = torch.randn(n + 1, model.config.hidden_size)
    directions = d / d.norm(dim=-1, keepdim=True)
    torch.cuda.reset_peak_memory_stats()
    seconds, decode = [], []
    for i in range(args.trials):
        comp = ComponentParams(1.0 + 0.1 * i, n * 0.6, 0.3, n / 3)
        params = AblationParams("global", n * 0.6, comp, comp)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ablator.apply(params, directions)
        kl = evaluator.kl()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        answers = evaluator.answers()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        ablator.reset()
        seconds.append(time.perf_counter() - t0)
        decode.append(t2 - t1)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    steps = args.tokens * -(-len(prompts["bad_eval"]) // args.batch_size)
    bound = weights_bytes * steps / (card_bandwidth(torch.cuda.get_device_name(0)) * 1e12)
    tokens = len(answers) * args.tokens
    result = {
        "device": torch.cuda.get_device_name(0),
        "shape": args.shape,
        "layers": n,
        "full_layers": full_layers,
        "quantization": args.quantization,
        "build_s": round(build_s, 1),
        "median_s_per_trial": round(statistics.median(seconds), 3),
        "median_generation_s": round(statistics.median(decode), 3),
        "decode_tokens_per_s": round(tokens / statistics.median(decode)),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "weights_gib": round(weights_bytes / 2**30, 2),
        "bandwidth_bound_generation_s": round(bound, 3),
        "last_kl": round(kl, 4),
    }
    if n != full_layers:
        scale = full_layers / n
        result["scaled_to_full_depth_s_per_trial"] = round(result["median_s_per_trial"] * scale, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
