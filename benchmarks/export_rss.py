"""Peak host RAM of the export: the shard-by-shard merge against the previous whole-model save.

    python benchmarks/export_rss.py                 # the demo model and a random ~1B model
    python benchmarks/export_rss.py --only 1b

Each (model, way) runs in its own process on the CPU. The model is loaded as a run loads it, a
fixed trial is applied, then the peak RSS is reset (/proc/self/clear_refs) and the export runs:
- "whole model" is what the export did before: write the edit into the weights,
  `save_pretrained`, then load the saved model back with `from_pretrained` (no device map)
  and generate once;
- "shard by shard" is `abfleet.core.export.export_model`: merge into the source's shards one
  at a time, release the search model, load the export where the model ran (here: the CPU,
  so the check's load is a whole model; on a GPU box it goes to the GPU).
Printed: the model's size, RSS after loading, and the export's peak RSS above that, for the
merge alone and for the whole export with its check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out" / "export_rss"
PROMPTS = ["Write a haiku about rain.", "How do I bake bread?", "Explain tides.", "Name a color."]


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process, MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def build_random(path: Path) -> None:
    """A Llama-shaped model of about 1B parameters, random bf16 weights, in 400 MB shards."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tokenizer

    tok = make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=20,
        num_attention_heads=32,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="400MB")
    tok.save_pretrained(path)


def child(model_dir: str, way: str, out: str) -> None:
    import torch

    from abfleet.core.ablation import AblationParams, Ablator, ComponentParams
    from abfleet.core.chat import ChatFormatter
    from abfleet.core.export import export_model
    from abfleet.core.model import ModelSource, load_model

    torch.manual_seed(0)
    loaded = load_model(ModelSource("dir", model_dir), ("auto",), None)
    params_b = sum(p.numel() for p in loaded.model.parameters()) / 1e9
    size_gb = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 1e9
    ablator = Ablator(loaded.model)
    n = ablator.n_layers
    d = torch.randn(n + 1, loaded.model.config.hidden_size)
    directions = d / d.norm(dim=-1, keepdim=True)
    comp = ComponentParams(1.0, n / 2, 0.3, n / 2)
    trial = AblationParams("global", n / 2, comp, comp)
    chat = ChatFormatter(loaded.tokenizer, None)
    target = Path(out)
    shutil.rmtree(target, ignore_errors=True)
    rss_loaded, _ = rss_mib()
    reset_peak()
    started = time.monotonic()
    merge_peak = None
    if way == "whole":
        from transformers import AutoModelForCausalLM

        from abfleet.core.generate import greedy_generate

        ablator.merge(trial, directions)
        loaded.model.save_pretrained(target)
        loaded.tokenizer.save_pretrained(target)
        merge_peak = rss_mib()[1]
        back = AutoModelForCausalLM.from_pretrained(target, dtype="auto")
        greedy_generate(back, chat, PROMPTS[:1], 24, 1)
    else:
        import abfleet.core.export as export

        merge = export.merge_shards

        def measured_merge(*args, **kwargs):
            nonlocal merge_peak
            merge(*args, **kwargs)
            merge_peak = rss_mib()[1]

        export.merge_shards = measured_merge

        def release() -> None:
            ablator.detach()
            loaded.model = None

        def reload(folder: Path):
            return load_model(ModelSource("dir", str(folder)), ("auto",), None, for_ablation=False)

        export_model(loaded, ablator, trial, directions, chat, target, {}, PROMPTS, reload, release)
    seconds = time.monotonic() - started
    _, peak = rss_mib()
    print(
        json.dumps(
            {
                "params_b": round(params_b, 3),
                "model_gb": round(size_gb, 2),
                "rss_loaded_mib": round(rss_loaded),
                "merge_peak_above_mib": round((merge_peak or 0) - rss_loaded),
                "export_peak_above_mib": round(peak - rss_loaded),
                "seconds": round(seconds, 1),
            }
        )
    )
    shutil.rmtree(target, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("demo", "1b"))
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "WAY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    models = {}
    if args.only in (None, "demo"):
        from abfleet.job.source import materialize, resolve_source

        models["demo"] = materialize(resolve_source("demo:smollm2-refusal")).location
    if args.only in (None, "1b"):
        path = OUT / "random-1b"
        if not (path / "config.json").exists():
            build_random(path)
        models["random ~1B, bf16, 400 MB shards"] = str(path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for label, model_dir in models.items():
        shards = sorted(Path(model_dir).glob("*.safetensors"))
        biggest = max(p.stat().st_size for p in shards) / 2**20
        print(f"{label}: {model_dir} ({len(shards)} shard(s), largest {biggest:.0f} MiB)")
        for way, name in (("whole", "whole model (before)"), ("shards", "shard by shard (now)")):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", model_dir, way, str(OUT / "export")],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"  {name:22s} model {r['model_gb']:.2f} GB ({r['params_b']}B), loaded RSS "
                f"{r['rss_loaded_mib']} MiB; peak above that: merge/save "
                f"{r['merge_peak_above_mib']} MiB, whole export with its check "
                f"{r['export_peak_above_mib']} MiB; {r['seconds']} s"
            )


if __name__ == "__main__":
    main()
