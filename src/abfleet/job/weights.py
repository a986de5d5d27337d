"""Which checkpoints abliteration can edit: refused before anything is rented or loaded.

A pre-quantized checkpoint (FP8, MXFP4, GPTQ, AWQ, bitsandbytes, ...) stores packed integers or
low-precision floats with separate scales; editing those tensors as if they were the weights
would produce a wrong model without a word. Only GGUF is dequantized on load (into the job's
dtype), so it is accepted. No torch here: the controller calls this from `size` and `launch`.
"""

from __future__ import annotations

from typing import Any

from abfleet.errors import UserError

# quant_method (config.json's quantization_config) -> how users name the format.
_NAMES = {
    "fp8": "FP8",
    "fbgemm_fp8": "FP8",
    "mxfp4": "MXFP4",
    "gptq": "GPTQ",
    "awq": "AWQ",
    "bitsandbytes": "bitsandbytes",
    "compressed-tensors": "compressed-tensors",
    "hqq": "HQQ",
    "eetq": "EETQ",
    "aqlm": "AQLM",
    "quanto": "Quanto",
    "torchao": "torchao",
    "bitnet": "BitNet",
    "higgs": "HIGGS",
    "vptq": "VPTQ",
    "spqr": "SpQR",
    "fp_quant": "FP-Quant",
}


def quantization_of(config: dict[str, Any]) -> str | None:
    """The checkpoint's quantization format as users name it, or None for plain weights."""
    for cfg in (config, config.get("text_config") or {}):
        q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if not isinstance(q, dict):
            continue
        method = str(q.get("quant_method") or "").lower()
        if method == "gguf":
            continue
        if not method and (q.get("load_in_4bit") or q.get("load_in_8bit")):
            method = "bitsandbytes"
        if method:
            return _NAMES.get(method, method)
    return None


def check_editable(config: dict[str, Any], display: str) -> None:
    """Refuse a pre-quantized checkpoint with one line that names the format and what to do."""
    fmt = quantization_of(config)
    if fmt is None:
        return
    raise UserError(
        f"{display} is a pre-quantized {fmt} checkpoint: abliteration edits full-precision "
        "weights and would corrupt these; use the bf16/fp16 checkpoint of the same model "
        "(its base repository)"
    )


# A judge is never edited, so a pre-quantized one is welcome where something can load it:
# bitsandbytes ships with abfleet; other formats need a package abfleet does not install (on a
# box it is never there) or kernels only a CUDA GPU has. format -> (pip package, module, GPU).
_JUDGE_LOADERS: dict[str, tuple[str | None, str | None, bool]] = {
    "bitsandbytes": (None, None, False),
    "FP8": (None, None, True),
    "MXFP4": (None, None, True),
    "AWQ": ("autoawq", "awq", True),
    "GPTQ": ("gptqmodel", "gptqmodel", True),
    "compressed-tensors": ("compressed-tensors", "compressed_tensors", False),
    "HQQ": ("hqq", "hqq", False),
    "EETQ": ("eetq", "eetq", True),
    "AQLM": ("aqlm", "aqlm", False),
    "Quanto": ("optimum-quanto", "optimum.quanto", False),
    "torchao": ("torchao", "torchao", False),
    "VPTQ": ("vptq", "vptq", True),
    "SpQR": ("spqr_quant", "spqr_quant", True),
    "HIGGS": ("flute-kernel", "flute", True),
    "FP-Quant": ("fp_quant", "fp_quant", True),
}


def check_judge(config: dict[str, Any], display: str, on_box: bool, has_gpu: bool) -> None:
    """Refuse, before anything is rented or searched, a judge that will not load where it runs:
    on a rented box (on_box: a CUDA GPU, abfleet's own packages) or here."""
    fmt = quantization_of(config)
    if fmt is None:
        return
    package, module, needs_gpu = _JUDGE_LOADERS.get(fmt, (fmt.lower(), fmt.lower(), True))
    instead = "use its bf16/fp16 checkpoint, or a bitsandbytes-quantized one"
    missing = ""
    if package is not None and on_box:
        missing = f"loads only with {package}, which abfleet does not install on a box"
    elif package is not None and not _importable(module or package):
        missing = f"loads only with {package}, which is not installed here"
        instead = f"pip install {package}, or {instead}"
    elif needs_gpu and not on_box and not has_gpu:
        missing = "needs a CUDA GPU for its kernels and this machine has none"
        instead = f"run on a box (abfleet launch), or {instead}"
    if missing:
        raise UserError(
            f"judge {display} is a pre-quantized {fmt} checkpoint, which {missing}: {instead}"
        )


def _importable(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False
