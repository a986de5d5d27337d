"""From a model to disk, GPU memory and the cheapest GPU type and count that fits it.

Parameters come from the safetensors metadata when it is there (exact), else from config.json
(dense, MoE, and vision towers of multimodal models). Each figure carries a one-line reason, so a
user can see why abfleet asks for 200 GB and not 100.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from abfleet import precision
from abfleet.errors import UserError
from abfleet.job.source import ModelSource
from abfleet.job.spec import Job
from abfleet.job.weights import check_editable, check_judge
from abfleet.resources import resource_path
from abfleet.settings import SizingSettings, settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GB = 1e9
DTYPE_BYTES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "I8": 1,
    "U8": 1,
}
# Rough time estimate: a trial is memory-bound decoding plus compute-bound prefill. Real runs
# reach a fraction of that floor; 0.1 is deliberately pessimistic (a budget should not be
# exceeded by an optimistic guess). The live ETA replaces it once trials run.
TIME_EFFICIENCY = 0.1


# Bytes per weight of the linear layers as bitsandbytes holds them: int8 plus a float32 scale per
# row (8-bit); NF4 nibbles plus a float32 absmax per block of 64 (4-bit, no double quantization).
QUANT_BYTES = {"none": 2.0, "bnb-8bit": 1.0, "bnb-4bit": 0.5 + 4 / 64}
# bitsandbytes' kernels decode slower than bf16 at the same batch (dequantization per matmul):
# assumed factors on the bf16 estimate until measured on a GPU (the live ETA replaces them).
QUANT_SLOWDOWN = {"none": 1.0, "bnb-8bit": 2.5, "bnb-4bit": 1.3}
QUANTIZATIONS = tuple(QUANT_BYTES)
# Host RAM on the box: Python, torch and CUDA's host side, plus one shard being read.
HOST_BASE_GB = 8.0
# What the layers below a trial's first edited one computed, kept in host memory for the next
# trials' prefills (core.unedited.MAX_BYTES: 1 GiB).
UNEDITED_STORE_GB = 1.07
DEFAULT_SHARD_GB = 5.0  # transformers' default max_shard_size when the shards are not at hand


@dataclass
class Shape:
    """What sizing needs to know of a model."""

    params: int
    touched_params: int  # attention out + MLP down projections (what the ablation edits)
    layers: int
    hidden: int
    vocab: int
    kv_heads: int
    head_dim: int
    experts: int
    source: str  # how params were counted
    embedding_params: int = 0  # embeddings and head: never quantized
    largest_touched: int = 0  # the largest edited tensor (a fused expert tensor counts whole)
    largest_linear: int = 0  # the largest 2-D weight a quantized matmul dequantizes
    expert_touched: int = 0  # touched params inside fused expert tensors
    largest_shard_gb: float = 0.0  # 0: unknown


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def shape_from_config(config: dict[str, Any], exact_params: int | None = None) -> Shape:
    c = _text_config(config)
    try:
        hidden = int(c["hidden_size"])
        layers = int(c["num_hidden_layers"])
        vocab = int(c["vocab_size"])
        heads = int(c["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"config.json lacks {exc} needed to size the model") from None
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    inter = int(c.get("intermediate_size") or 4 * hidden)
    experts = int(
        c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts") or 0
    )
    expert_inter = int(c.get("moe_intermediate_size") or inter)
    shared_inter = int(c.get("shared_expert_intermediate_size") or 0)
    if not shared_inter and c.get("n_shared_experts"):
        shared_inter = int(c["n_shared_experts"]) * expert_inter
    dense_layers = int(c.get("first_k_dense_replace") or 0)
    tied = bool(config.get("tie_word_embeddings", c.get("tie_word_embeddings", True)))

    q_out = heads * head_dim
    kv_out = kv_heads * head_dim
    attn = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    if c.get("attention_bias") or c.get("model_type") in ("qwen2", "qwen2_moe"):
        attn += q_out + 2 * kv_out
    dense_mlp = 3 * hidden * inter
    total = 0
    touched = 0
    for layer in range(layers):
        total += attn + 2 * hidden
        touched += q_out * hidden
        if experts and layer >= dense_layers:
            total += experts * 3 * hidden * expert_inter + hidden * experts
            touched += experts * expert_inter * hidden
            if shared_inter:
                total += 3 * hidden * shared_inter + hidden
                touched += shared_inter * hidden
        else:
            total += dense_mlp
            touched += inter * hidden
    embeddings = vocab * hidden * (1 if tied else 2)
    total += embeddings + hidden
    total += _vision_params(config, hidden)
    source = "config.json"
    if exact_params:
        total, source = exact_params, "safetensors metadata"
    largest_touched = max(hidden * inter, hidden * q_out, experts * expert_inter * hidden)
    expert_touched = experts * expert_inter * hidden * (layers - dense_layers) if experts else 0
    return Shape(
        total,
        touched,
        layers,
        hidden,
        vocab,
        kv_heads,
        head_dim,
        experts,
        source,
        embedding_params=embeddings,
        largest_touched=largest_touched,
        largest_linear=hidden * max(inter, q_out, 2 * expert_inter),
        expert_touched=expert_touched,
    )


def _vision_params(config: dict[str, Any], text_hidden: int) -> int:
    """A ViT/SigLIP-style vision tower and its projector (weights that load, never ablated)."""
    v = config.get("vision_config")
    if not isinstance(v, dict) or "hidden_size" not in v:
        return 0
    h = int(v["hidden_size"])
    inter = int(v.get("intermediate_size") or 4 * h)
    layers = int(v.get("num_hidden_layers") or 0)
    patch = int(v.get("patch_size") or 14)
    image = int(v.get("image_size") or 224)
    per_layer = 4 * h * h + 4 * h + 2 * h * inter + inter + h + 4 * h
    embeddings = 3 * patch * patch * h + h + (image // patch) ** 2 * h
    return layers * per_layer + embeddings + 2 * h + h * text_hidden + h


# ---------------------------------------------------------------------------------------------
# Where the numbers come from


def _safetensors_params(paths: list[Path]) -> int | None:
    """Exact parameter count from safetensors headers (8-byte length + JSON), no weights read."""
    total = 0
    for path in paths:
        try:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (OSError, struct.error, ValueError):
            return None
        for name, info in header.items():
            if name != "__metadata__":
                total += math.prod(info["shape"])
    return total or None


def shape_for(model: str) -> tuple[Shape, str]:
    """(shape, label) for a local directory, a .gguf file, the demo model or a hub id. A
    directory that holds only config.json is sized from it: users size before downloading."""
    from abfleet.job.source import materialize, resolve_source

    path = Path(model).expanduser()
    weights = ("*.safetensors", "*.bin", "*.gguf")
    if (path / "config.json").is_file() and not any(any(path.glob(g)) for g in weights):
        return shape_from_config(_editable_config(path)), f"{path} (config.json only)"
    return shape_for_source(materialize(resolve_source(model)))


def _editable_config(path: Path) -> dict[str, Any]:
    """A local folder's config.json, refused if it describes a pre-quantized checkpoint."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path / 'config.json'}: {exc}") from None
    check_editable(config, str(path))
    return config


def shape_for_source(source: ModelSource) -> tuple[Shape, str]:
    if source.kind == "dir":
        path = Path(source.location)
        shards = sorted(path.glob("*.safetensors"))
        exact = _safetensors_params(shards)
        shape = shape_from_config(_editable_config(path), exact)
        shape.largest_shard_gb = max((p.stat().st_size for p in shards), default=0) / GB
        return shape, str(path)
    if source.kind == "gguf":
        return _gguf_shape(Path(source.location) / (source.gguf_file or "")), source.display
    return _hub_shape(source.location), source.location


def _gguf_shape(path: Path) -> Shape:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    params = sum(int(t.n_elements) for t in reader.tensors)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")

    def field_int(key: str, default: int = 0) -> int:
        f = reader.fields.get(f"{arch}.{key}")
        return int(f.parts[-1][0]) if f is not None else default

    hidden = field_int("embedding_length")
    layers = field_int("block_count")
    heads = field_int("attention.head_count", 1)
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": field_int("attention.head_count_kv", heads),
        "intermediate_size": field_int("feed_forward_length", 4 * hidden),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data)
        if "tokenizer.ggml.tokens" in reader.fields
        else 32000,
        "num_local_experts": field_int("expert_count"),
    }
    return shape_from_config(config, params)


def _hub_shape(repo: str) -> Shape:
    try:
        from huggingface_hub import get_safetensors_metadata, hf_hub_download

        config = json.loads(Path(hf_hub_download(repo, "config.json")).read_text())
        try:
            meta = get_safetensors_metadata(repo)
            exact = sum(meta.parameter_count.values())
        except Exception:  # noqa: BLE001 - no safetensors metadata: count from the config
            exact = None
    except Exception as exc:
        raise UserError(
            f"cannot read {repo} from the Hugging Face hub ({str(exc).splitlines()[0]}): "
            "check the id and HF_TOKEN, or size a local copy"
        ) from exc
    check_editable(config, repo)
    return shape_from_config(config, exact)


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    price_per_hour: float
    bandwidth_tbps: float
    half_tflops: float
    compute_capability: float
    counts: tuple[int, ...]


def gpu_catalog() -> list[Gpu]:
    data = tomllib.loads((resource_path("config") / "gpus.toml").read_text(encoding="utf-8"))
    return [Gpu(**{**g, "counts": tuple(g["counts"])}) for g in data["gpu"]]


@dataclass
class Plan:
    model: str
    params: int
    params_source: str
    dtype: str
    weights_gb: float
    disk_gb: int
    free_disk_gb: float  # what the job itself writes on the box: checked before it starts
    gpu_memory_gb: float
    memory_parts: dict[str, float]
    gpu: str | None
    gpu_count: int
    gpu_memory_each_gb: float
    price_per_hour: float | None
    est_seconds_per_trial: float | None
    reset_copy: str = "device"
    reasons: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    quantization: str = "none"
    host_ram_gb: float = 0.0
    # The cheapest fitting option at each quantization (None: nothing in the catalog holds it).
    by_quantization: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    compute_dtype: str = "bfloat16"  # what the search runs in on the chosen GPU
    judge: str = ""  # the judge model, loaded after the search model is released
    judge_gb: float = 0.0  # its weights, on disk and (as loaded) on the GPU
    judge_gpu_gb: float = 0.0  # what it needs on the GPU, alone

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hours_for(self, n_trials: int) -> float | None:
        if self.est_seconds_per_trial is None:
            return None
        return n_trials * self.est_seconds_per_trial / 3600 + setup_hours(self.weights_gb)

    def wrapup_hours(self, rescore_factor: float) -> float | None:
        """After the search: the re-score of the front (about 8 trials at rescore_factor times
        the tokens; 0 without one) and the export (written, then loaded again for its check,
        ~4 s a GB)."""
        if self.est_seconds_per_trial is None:
            return None
        rescore = 8 * self.est_seconds_per_trial * rescore_factor
        return (rescore + 4 * self.weights_gb) / 3600


def benchmark_hours(plan: Plan, n_tasks: int, limit: int) -> float | None:
    """The capability check's time: the original and the export each loaded (~4 s a GB) and
    every task's examples run on both. An example costs about a fiftieth of a trial (a trial
    scores ~100 prompts in batches; an example is a few forward passes or one short
    generation): as rough as the trial estimate it comes from."""
    if not n_tasks:
        return 0.0
    if plan.est_seconds_per_trial is None:
        return None
    per_example = plan.est_seconds_per_trial / 50
    return (2 * 4 * plan.weights_gb + 2 * n_tasks * limit * per_example) / 3600


def setup_hours(weights_gb: float) -> float:
    """Boot, install, download (~100 GB/h on a 200 Mbps+ box), load and directions."""
    return 0.25 + weights_gb / 100


def min_disk_for(params_b: float, cfg: SizingSettings) -> float:
    floor = 0.0
    for threshold, minimum in cfg.min_disk_by_params_b:
        if params_b >= threshold:
            floor = max(floor, minimum)
    return floor


def plan(
    shape: Shape,
    model: str,
    batch_size: int | None = None,
    max_new_tokens: int = 30,
    n_eval: int = 200,
    dtype_bytes: int = 2,
    dtype: str = "bfloat16",
    n_trials: int = 200,
    quantization: str = "none",
    norm_preserving: bool = False,
) -> Plan:
    cfg = settings().sizing
    batch = batch_size or cfg.default_batch_size
    params_b = shape.params / 1e9
    full = shape.params * dtype_bytes / GB  # what is downloaded and exported

    # A batch the user did not fix may be halved (twice) to fit a cheaper card: more decode
    # steps per trial, which the cost estimate counts.
    batches = (batch,) if batch_size else tuple(b for b in (batch, batch // 2, batch // 4) if b)

    def parts_at(q: str, b: int) -> dict[str, float]:
        found = gpu_parts(shape, b, max_new_tokens, n_eval, dtype_bytes, q)
        if norm_preserving and shape.expert_touched:
            # Fused experts keep their norms only by an in-place edit: their originals are copied.
            found["reset copy"] = shape.expert_touched * dtype_bytes / GB
        return found

    # Layers split over several GPUs run one after another (device_map="auto"): more GPUs add
    # memory, not speed. So types are ranked by the estimated cost of the whole job, setup
    # (download, load, directions) included.
    candidates = fitting(
        shape,
        lambda b: parts_at(quantization, b),
        batches,
        full,
        n_eval,
        max_new_tokens,
        n_trials,
        quantization,
    )
    chosen = first_choice(candidates)
    batch = chosen["batch"] if chosen else batch
    parts = parts_at(quantization, batch)
    weights = parts["weights"]
    at = dtype if quantization == "none" else f"{quantization} ({dtype} embeddings and head)"
    reasons = [
        f"parameters: {params_b:.2f}B (from {shape.source})",
        f"weights: {weights:.1f} GB at {at}",
    ]

    disk_formula = 2 * full + cfg.disk_overhead_gb
    floor = min_disk_for(params_b, cfg)
    disk = int(math.ceil(max(disk_formula, floor) / 10.0) * 10)
    why = (
        f"disk: {disk} GB = 2 x {full:.1f} GB {dtype} weights (download, export) "
        f"+ {cfg.disk_overhead_gb:.0f} GB, rounded up"
    )
    if floor > disk_formula:
        why += f" and raised to the field minimum for {params_b:.0f}B ({floor:.0f} GB)"
    reasons.append(why)
    free_needed = round(2 * full + 5, 1)
    host_ram, host_why = host_ram_for(shape)
    reasons.append(f"host RAM: {host_ram:.0f} GB = {host_why}")

    need = sum(parts.values())
    seq = cfg.prompt_tokens + max_new_tokens
    reasons.append(
        f"GPU memory: {need:.1f} GB = "
        + " + ".join(f"{v:.2g} {k}" if v < 0.1 else f"{v:.1f} {k}" for k, v in parts.items())
        + f" (batch {batch}, {seq} tokens)"
    )

    est = chosen["seconds"] if chosen else None
    if chosen:
        g, n = chosen["gpu"], chosen["count"]
        line = (
            f"GPU: {n}x {g.name} ({g.memory_gb:.0f} GB each, ~{chosen['price']:.2f} $/h, "
            f"~{chosen['cost']:.1f} $ for {n_trials} trials): lowest estimated job cost that fits"
        )
        if chosen["copy"] == "cpu":
            line += f", with the {parts['reset copy']:.1f} GB reset copy in host memory"
        dearer = [
            c for c in candidates if c is not chosen and c["gpu"].bandwidth_tbps > g.bandwidth_tbps
        ]
        if dearer:
            c = dearer[0]
            line += f"; {c['count']}x {c['gpu'].name} would be faster but ~{c['cost']:.1f} $ in all"
        reasons.append(line)
        reasons += half_precision_notes(g)
    else:
        reasons.append(f"GPU: nothing in the catalog holds {need:.0f} GB")
    if quantization != "none":
        reasons.append(
            f"speed: x{QUANT_SLOWDOWN[quantization]} on the bf16 estimate for {quantization}'s "
            "kernels (assumed until measured); the export is full precision"
        )
    by_quantization: dict[str, dict[str, Any] | None] = {}
    for q in QUANTIZATIONS:
        best = fitting(
            shape,
            lambda b, q=q: parts_at(q, b),
            batches,
            full,
            n_eval,
            max_new_tokens,
            n_trials,
            q,
        )
        pick = first_choice(best)
        by_quantization[q] = _candidate_dict(pick) if pick else None
    return Plan(
        model=model,
        params=shape.params,
        params_source=shape.source,
        dtype=dtype,
        weights_gb=round(weights, 2),
        disk_gb=disk,
        free_disk_gb=free_needed,
        gpu_memory_gb=round(need, 1),
        memory_parts={k: round(v, 3) for k, v in parts.items()},
        gpu=chosen["gpu"].name if chosen else None,
        gpu_count=chosen["count"] if chosen else 0,
        gpu_memory_each_gb=chosen["gpu"].memory_gb if chosen else 0.0,
        price_per_hour=round(chosen["price"], 2) if chosen else None,
        est_seconds_per_trial=round(est, 1) if est else None,
        reset_copy=chosen["copy"] if chosen else "device",
        reasons=reasons,
        candidates=[_candidate_dict(c) for c in candidates],
        quantization=quantization,
        host_ram_gb=host_ram,
        by_quantization=by_quantization,
        compute_dtype=compute_precision(chosen["gpu"]).dtype if chosen else "bfloat16",
    )


def first_choice(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The cheapest candidate with bf16. A GPU without it (V100, T4) is rented only when asked
    for with --gpu: its float16 can overflow, and the float32 it then falls back to needs twice
    the memory this plan counted."""
    return next((c for c in candidates if compute_precision(c["gpu"]).dtype == "bfloat16"), None)


def compute_precision(gpu: Gpu) -> precision.Precision:
    major = int(gpu.compute_capability)
    minor = round((gpu.compute_capability - major) * 10)
    return precision.for_cuda((major, minor), gpu.name)


def half_precision_notes(gpu: Gpu) -> list[str]:
    """What a GPU without bf16 changes: the dtype (same width, so the memory above holds) and
    what a fall back to float32 would cost."""
    chosen = compute_precision(gpu)
    if chosen.dtype == "bfloat16":
        return []
    return [
        f"dtype: {chosen.dtype} ({chosen.reason}); float16 is bf16's width, so the memory above "
        "holds",
        f"speed: estimated at its {gpu.half_tflops:.0f} float16 TFLOPS; if float16 overflows, "
        "float32 needs twice the weights' memory and runs several times slower",
    ]


def gpu_parts(
    shape: Shape,
    batch: int,
    max_new_tokens: int,
    n_eval: int,
    dtype_bytes: int,
    quantization: str,
) -> dict[str, float]:
    """GPU memory by what uses it, in GB. The ablation is a delta on module outputs: per edited
    module a direction and, when rows keep their norms, three vectors; no copy of any matrix."""
    cfg = settings().sizing
    seq = cfg.prompt_tokens + max_new_tokens
    linear = shape.params - shape.embedding_params
    weight_bytes = shape.embedding_params * dtype_bytes + linear * (
        dtype_bytes if quantization == "none" else QUANT_BYTES[quantization]
    )
    parts = {
        "weights": weight_bytes / GB,
        "deltas": shape.layers * 2 * 4 * shape.hidden * 4 / GB,
        "KV cache": 2
        * shape.layers
        * shape.kv_heads
        * shape.head_dim
        * batch
        * seq
        * dtype_bytes
        / GB,
        "activations": (
            (shape.layers + 1) * batch * cfg.prompt_tokens * shape.hidden * dtype_bytes
            + (batch + n_eval) * shape.vocab * 8
        )
        / GB,
        "CUDA context": cfg.cuda_context_gb,
    }
    if quantization != "none":  # each matmul dequantizes its weight into a scratch matrix
        parts["dequantize scratch"] = 2 * shape.largest_linear * dtype_bytes / GB
    return parts


def host_ram_for(shape: Shape) -> tuple[float, str]:
    """Host RAM the box needs: the load streams shards to the GPU, and the export merges one
    shard at a time (its edited tensors in float32): never the whole model."""
    shard = shape.largest_shard_gb or DEFAULT_SHARD_GB
    merge = 3 * shape.largest_touched * 4 / GB
    total = math.ceil(HOST_BASE_GB + UNEDITED_STORE_GB + shard + merge)
    known = "largest shard" if shape.largest_shard_gb else "a shard (default size)"
    return float(total), (
        f"{HOST_BASE_GB:.0f} GB runtime + {UNEDITED_STORE_GB:.0f} GB of unedited layers' "
        f"outputs kept for the prefills + {shard:.1f} GB {known} + {merge:.1f} GB float32 "
        "merge of the largest edited tensor (the export goes shard by shard)"
    )


def fitting(
    shape: Shape,
    parts_for: Callable[[int], dict[str, float]],
    batches: tuple[int, ...],
    full_gb: float,
    n_eval: int,
    max_new_tokens: int,
    n_trials: int,
    quantization: str,
) -> list[dict[str, Any]]:
    """Per GPU type, the fewest GPUs that hold it (at the largest batch that fits), cheapest
    estimated job first. A reset copy (norm-preserving fused experts only) that is all that
    keeps a card from fitting moves to host memory."""
    usable_fraction = settings().sizing.usable_fraction
    setup_h = setup_hours(full_gb)
    slowdown = QUANT_SLOWDOWN.get(quantization, 1.0)
    candidates = []
    for gpu in gpu_catalog():
        found = None
        for count in gpu.counts:
            for batch in batches:
                parts = parts_for(batch)
                need = sum(parts.values())
                copy_gb = parts.get("reset copy", 0.0)
                usable = count * gpu.memory_gb * usable_fraction
                if need <= usable:
                    found = (count, batch, need, "device")
                elif copy_gb and need - copy_gb <= usable:
                    found = (count, batch, need, "cpu")
                if found:
                    break
            if found:
                break
        if not found:
            continue
        count, batch, need, copy = found
        seconds = slowdown * _seconds_per_trial(shape, full_gb, n_eval, batch, max_new_tokens, gpu)
        price = gpu.price_per_hour * count
        cost = price * (n_trials * seconds / 3600 + setup_h)
        candidates.append(
            {
                "gpu": gpu,
                "count": count,
                "batch": batch,
                "need": need,
                "price": price,
                "seconds": seconds,
                "cost": cost,
                "copy": copy,
            }
        )
    candidates.sort(key=lambda c: (c["cost"], c["price"]))
    return candidates


def _candidate_dict(c: dict[str, Any]) -> dict[str, Any]:
    return {
        "gpu": c["gpu"].name,
        "count": c["count"],
        "batch": c["batch"],
        "gpu_memory_gb": round(c["need"], 1),
        "price_per_hour": round(c["price"], 2),
        "est_job_cost": round(c["cost"], 2),
        "est_seconds_per_trial": round(c["seconds"], 2),
    }


def _seconds_per_trial(
    shape: Shape, weights_gb: float, n_eval: int, batch: int, tokens: int, gpu: Gpu
) -> float:
    """Floor from first principles (every decode step reads all weights; prefill is FLOPs),
    divided by the efficiency real runs reach."""
    half = max(1, n_eval // 2)
    steps = tokens * math.ceil(half / batch)
    decode = steps * weights_gb / (gpu.bandwidth_tbps * 1000)
    prefill = 2 * shape.params * n_eval * 128 / (gpu.half_tflops * 1e12)
    return (decode + prefill) / TIME_EFFICIENCY


def with_gpu(plan: Plan, choice: str) -> Plan:
    """The plan on the GPU type (and count) the user chose with --gpu TYPE[xN], or a refusal
    that says why it cannot hold the model."""
    m = re.fullmatch(r"(.+?)(?:x(\d+))?", choice.strip().replace(" ", "_"))
    if not m or not m[1]:
        raise UserError(f"--gpu {choice!r}: write TYPE or TYPExN, e.g. H100_SXM or RTX_4090x2")
    catalog = {g.name.lower(): g for g in gpu_catalog()}
    gpu = catalog.get(m[1].lower())
    if gpu is None:
        names = ", ".join(sorted(g.name for g in catalog.values()))
        raise UserError(
            f"--gpu {choice}: unknown GPU type {m[1]!r}; config/gpus.toml knows {names}"
        )
    counts = [int(m[2])] if m[2] else list(gpu.counts)
    if m[2] and int(m[2]) not in gpu.counts:
        raise UserError(
            f"--gpu {choice}: {gpu.name} boxes come with {', '.join(map(str, gpu.counts))} GPUs"
        )
    usable = settings().sizing.usable_fraction
    # The plan's candidates hold the fewest GPUs of each type that fit (at the largest batch).
    known = next((c for c in plan.candidates if c["gpu"] == gpu.name), None)
    count = int(m[2]) if m[2] else (known["count"] if known else counts[-1])
    if known is None or count < known["count"]:
        room = count * gpu.memory_gb * usable
        copy = plan.memory_parts.get("reset copy", 0.0)
        lean = plan.gpu_memory_gb - copy
        raise UserError(
            f"--gpu {choice}: {count}x {gpu.name} holds {room:.0f} GB usable, but this model "
            f"needs {lean:.0f} GB"
            + (" even with the reset copy in host memory" if copy else "")
            + f"; `abfleet size` lists what fits ({plan.gpu_count}x {plan.gpu} is the cheapest)"
        )
    room = count * gpu.memory_gb * usable
    chosen = replace(
        plan,
        gpu=gpu.name,
        gpu_count=count,
        gpu_memory_each_gb=gpu.memory_gb,
        gpu_memory_gb=known["gpu_memory_gb"],
        reset_copy="device" if known["gpu_memory_gb"] <= room else "cpu",
        price_per_hour=gpu.price_per_hour * count,
        est_seconds_per_trial=known["est_seconds_per_trial"],
        reasons=[
            *plan.reasons,
            f"GPU: {count}x {gpu.name}, as chosen with --gpu (fits at batch {known['batch']})",
            *half_precision_notes(gpu),
        ],
        compute_dtype=compute_precision(gpu).dtype,
    )
    return check_judge_room(chosen)


def plan_for(
    model: str,
    job_arg: str | None = None,
    batch_size: int | None = None,
    quantization: str | None = None,
) -> Plan:
    """Sizing for `abfleet size`: the job (if any) gives batch size, cap, prompt count,
    quantization and ablation kind."""
    from abfleet.job.spec import load_job

    max_new, n_eval, dtype, n_trials, norm_preserving = 30, 200, "bfloat16", 200, False
    if job_arg:
        job = load_job(job_arg)
        max_new = job.spec.evaluation.max_new_tokens
        batch_size = batch_size or job.spec.model_options.batch_size or None
        prompts = job.load_all_prompts()
        n_eval = len(prompts["bad_eval"]) + len(prompts["good_eval"])
        n_trials = job.spec.search.n_trials
        quantization = quantization or job.spec.model_options.quantization
        norm_preserving = job.spec.ablation.norm_preserving
    shape, label = shape_for(model)
    sized = plan(
        shape,
        label,
        batch_size,
        max_new,
        n_eval,
        2,
        dtype,
        n_trials,
        quantization or "none",
        norm_preserving,
    )
    judge = judge_size(job.spec.evaluation.judge, on_box=True, has_gpu=True) if job_arg else None
    return with_judge(sized, judge) if judge else sized


def plan_for_job(job: Job, prompts: dict[str, list[str]], source: ModelSource) -> Plan:
    """Sizing of a job already loaded, with its model source already resolved (and built), and
    of its judge, checked as a box will load it."""
    shape, label = shape_for_source(source)
    sized = plan(
        shape,
        label,
        job.spec.model_options.batch_size or None,
        job.spec.evaluation.max_new_tokens,
        len(prompts["bad_eval"]) + len(prompts["good_eval"]),
        2,
        "bfloat16",
        job.spec.search.n_trials,
        job.spec.model_options.quantization,
        job.spec.ablation.norm_preserving,
    )
    judge = judge_size(job.spec.evaluation.judge, on_box=True, has_gpu=True)
    return with_judge(sized, judge) if judge else sized


@dataclass(frozen=True)
class JudgeSize:
    display: str
    weights_gb: float  # as stored: a pre-quantized judge stays packed on the GPU too


# What a judge needs on the GPU beyond its weights: one batch of rubric prompts, the CUDA context.
JUDGE_OVERHEAD = 1.2
JUDGE_EXTRA_GB = 2.0


def judge_size(spec: str, on_box: bool, has_gpu: bool) -> JudgeSize | None:
    """The job's judge resolved, checked (a pre-quantized judge must be loadable where it runs:
    it is never edited) and sized, before anything is rented or searched. None without one."""
    from abfleet.job.source import judge_source, materialize

    source = judge_source(spec)
    if source is None:
        return None
    source = materialize(source)
    if source.kind == "hub":
        config, weights_gb = _hub_judge(source.location)
    elif source.kind == "gguf":
        # Dequantized on load, into the job's dtype: about 2 bytes a weight.
        weights_gb = _gguf_shape(Path(source.location) / (source.gguf_file or "")).params * 2 / GB
        config = {}
    else:
        path = Path(source.location)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"judge: cannot read {path / 'config.json'}: {exc}") from None
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        weights_gb = sum(f.stat().st_size for f in files) / GB
    check_judge(config, source.display, on_box, has_gpu)
    return JudgeSize(source.display, round(weights_gb, 2))


def _hub_judge(repo: str) -> tuple[dict[str, Any], float]:
    try:
        from huggingface_hub import get_safetensors_metadata, hf_hub_download

        config = json.loads(Path(hf_hub_download(repo, "config.json")).read_text())
        meta = get_safetensors_metadata(repo)
        weights = sum(n * DTYPE_BYTES.get(dtype, 2) for dtype, n in meta.parameter_count.items())
    except Exception as exc:
        raise UserError(
            f"judge: cannot read {repo} from the Hugging Face hub ({str(exc).splitlines()[0]}): "
            "check the id and HF_TOKEN"
        ) from exc
    return config, weights / GB


def with_judge(sized: Plan, judge: JudgeSize) -> Plan:
    """The plan with the judge's download on the disk, and refused when the box's GPUs cannot
    hold it (it loads alone, once the search model is released)."""
    need = judge.weights_gb * JUDGE_OVERHEAD + JUDGE_EXTRA_GB
    disk = int(math.ceil((sized.disk_gb + judge.weights_gb) / 10.0) * 10)
    return check_judge_room(
        replace(
            sized,
            judge=judge.display,
            judge_gb=judge.weights_gb,
            judge_gpu_gb=round(need, 1),
            disk_gb=disk,
            free_disk_gb=round(sized.free_disk_gb + judge.weights_gb, 1),
            reasons=[
                *sized.reasons,
                f"judge: {judge.display}, {judge.weights_gb:.1f} GB on disk and ~{need:.0f} GB "
                "of GPU memory, loaded after the search model is released (disk above raised "
                "for it)",
            ],
        )
    )


def check_judge_room(sized: Plan) -> Plan:
    room = sized.gpu_count * sized.gpu_memory_each_gb * settings().sizing.usable_fraction
    if sized.judge and sized.gpu and sized.judge_gpu_gb > room:
        raise UserError(
            f"judge {sized.judge} needs ~{sized.judge_gpu_gb:.0f} GB of GPU memory and "
            f"{sized.gpu_count}x {sized.gpu} holds {room:.0f} GB: choose a smaller judge, or a "
            "larger GPU with --gpu"
        )
    return sized
