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
