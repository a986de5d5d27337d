"""Load a model for abliteration: a Hugging Face directory, a hub id, a GGUF file, or the demo.

Every way in ends with the same checks: the dtype is the first of the job's list that loads and
passes a one-token smoke test, and the architecture has the projections that abliteration edits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from abfleet import precision
from abfleet.errors import UserError
from abfleet.job.source import (
    DEFAULT_DTYPES,
    ModelSource,
    judge_source,
    materialize,
    resolve_source,
)
from abfleet.job.weights import check_editable, check_judge

__all__ = [
    "DEFAULT_DTYPES",
    "LoadedModel",
    "ModelSource",
    "load_model",
    "materialize",
    "resolve_source",
]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    dtype: str
    dtype_reason: str = ""  # why this dtype (see abfleet.precision)
    fell_back: bool = False  # an earlier dtype of the plan failed to load or to answer


def _load_kwargs(source: ModelSource) -> tuple[str, dict[str, Any]]:
    if source.kind == "gguf":
        from transformers import GgufConfig

        # Dense weights: abliteration edits matrices in place, which GGUF blocks cannot take.
        return source.location, {
            "gguf_file": source.gguf_file,
            "quantization_config": GgufConfig(dequantize=True),
        }
    return source.location, {}


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    location, kwargs = _load_kwargs(source)
    kwargs.pop("quantization_config", None)
    try:
        tok = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load the tokenizer of {source.display}: {_first_line(exc)}"
        ) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_architecture(source: ModelSource, editable: bool = True) -> Any:
    """Load only the config and fail early on an architecture transformers or abliteration lacks.
    editable=False (a judge, never edited) lets a pre-quantized checkpoint through."""
    from transformers import AutoConfig

    location, kwargs = _load_kwargs(source)
    kwargs.pop("quantization_config", None)
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
    except (KeyError, ValueError) as exc:
        raise UserError(
            f"unsupported architecture in {source.display}: {_first_line(exc)}"
        ) from exc
    except OSError as exc:
        raise UserError(f"cannot read the config of {source.display}: {_first_line(exc)}") from exc
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if editable:
        check_editable(config.to_dict(), source.display)

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(
            f"unsupported architecture {config.model_type!r} in {source.display}: "
            "abliteration needs a decoder-only causal language model"
        )
    return config


def check_judge_here(spec: str) -> None:
    """The job's judge checked where it will run (this machine), before anything is searched:
    its architecture, and a pre-quantized judge's loader. A built judge (the demo) is plain."""
    source = judge_source(spec)
    if source is None or source.kind == "built":
        return
    config = check_architecture(source, editable=False)
    check_judge(config.to_dict(), source.display, on_box=False, has_gpu=torch.cuda.is_available())


def load_model(
    source: ModelSource,
    dtypes: tuple[str, ...] = DEFAULT_DTYPES,
    device_map: str | None = "auto",
    tokenizer: Any = None,
    for_ablation: bool = True,
    quantization: str = "none",
) -> LoadedModel:
    """Load with the first dtype that works; a dtype that fails to load or to answer is skipped.

    `auto` is the dtype this device computes fast and correctly (abfleet.precision), then its
    fallbacks; any other dtype in the list is tried as given.

    for_ablation=False (a judge) skips the check that abliteration can edit the architecture.
    quantization "bnb-8bit" / "bnb-4bit" holds the weights in bitsandbytes' formats (the dtype
    is then that of everything else, and the 4-bit matmuls' compute dtype)."""
    from transformers import AutoModelForCausalLM

    from abfleet.core.ablation import find_targets

    check_architecture(source, editable=for_ablation)
    tok = tokenizer or load_tokenizer(source)
    location, kwargs = _load_kwargs(source)
    if quantization != "none" and source.kind == "gguf":
        raise UserError(
            f"{source.display} is a GGUF file: quantized search needs the model's safetensors "
            "(the export merges the edit into them); use its Hugging Face directory or hub id"
        )
    use_map = device_map if (device_map and torch.cuda.is_available()) else None
    errors = []
    for name, why in precision.plan(dtypes):
        dtype: Any = getattr(torch, name)
        if quantization != "none":
            kwargs["quantization_config"] = _bnb_config(quantization, dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=dtype, device_map=use_map, **kwargs
            )
        except Exception as exc:
            if type(exc).__name__ == "SafetensorError":
                raise UserError(
                    f"the weights of {source.display} are unreadable: {_first_line(exc)}"
                ) from exc
            errors.append(f"{name}: {_first_line(exc)}")
            log.warning("loading %s as %s failed: %s", source.display, name, _first_line(exc))
            continue
        detach_quantizer(model)
        prepare_for_inference(model)
        problem = smoke_test(model, tok)
        if problem is None:
            if for_ablation:
                find_targets(
                    model
                )  # raises UserError on an architecture without editable projections
            actual = str(next(model.parameters()).dtype).removeprefix("torch.")
            reason = why if not errors else f"{why}; tried first: {'; '.join(errors)}"
            log.info("loaded %s as %s: %s", source.display, actual, reason)
            return LoadedModel(model, tok, source, actual, reason, bool(errors))
        errors.append(f"{name}: {problem}")
        log.warning("%s as %s failed the smoke test: %s", source.display, name, problem)
        del model
    raise UserError(f"could not load {source.display} with any dtype ({'; '.join(errors)})")


def _bnb_config(quantization: str, dtype: Any) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise UserError(
            f"quantization {quantization} needs bitsandbytes: pip install 'bitsandbytes>=0.48'"
        ) from exc
    if quantization == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    if not torch.cuda.is_available() and compute != torch.float32:
        compute = torch.float32  # CPU kernels: half-precision compute is slower, not faster
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
    )


def prepare_for_inference(model: Any) -> None:
    """Eval mode, no gradients, and a contiguous input for the output head.

    With logits_to_keep=1 the head sees a strided slice (last token of each row); torch's
    matmul then expands the whole vocabulary matrix once per row, which made a forward pass
    on CPU 10x slower than its arithmetic.
    """
    model.eval()
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_abfleet_contiguous", False):
        head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
        head._abfleet_contiguous = True


def detach_quantizer(model: Any) -> None:
    """Forget GGUF's loader after dequantizing, so the model saves as plain safetensors."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and method == "gguf":  # QuantizationMethod is a str enum
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False


@torch.inference_mode()
def smoke_test(model: Any, tokenizer: Any) -> str | None:
    """Generate one token; return what went wrong, or None."""
    from abfleet.core.generate import model_device

    try:
        ids = tokenizer("Hello", return_tensors="pt", add_special_tokens=True)["input_ids"]
        out = model(input_ids=ids.to(model_device(model)), logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
    except (RuntimeError, ValueError, TypeError) as exc:
        return _first_line(exc)
    if not torch.isfinite(logits).all():
        return "non-finite logits"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
