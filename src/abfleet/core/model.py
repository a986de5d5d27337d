"""Load a model for abliteration: a Hugging Face directory, a hub id, a GGUF file, or the demo.

Every way in ends with the same checks: the dtype is the first of the job's list that loads and
passes a one-token smoke test, and the architecture has the projections that abliteration edits.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from abfleet.errors import UserError

log = logging.getLogger(__name__)

DEMO_PREFIX = "demo:"
DEMO_MODELS = ("smollm2-refusal",)
DEFAULT_DTYPES = ("auto", "bfloat16", "float16", "float32")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from, decided without loading anything."""

    kind: str  # "dir", "gguf", "hub" or "demo"
    location: str  # directory, hub id or demo name
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        if self.kind == "gguf":
            return str(Path(self.location) / (self.gguf_file or ""))
        if self.kind == "demo":
            return DEMO_PREFIX + self.location
        return self.location

    @property
    def is_local(self) -> bool:
        return self.kind in ("dir", "gguf")


def resolve_source(spec: str) -> ModelSource:
    """Classify a model argument, failing with one clear line on paths that cannot work."""
    spec = spec.strip()
    if not spec:
        raise UserError("no model given: pass --model or set model in the job file")
    if spec.startswith(DEMO_PREFIX):
        name = spec[len(DEMO_PREFIX) :]
        if name not in DEMO_MODELS:
            raise UserError(
                f"unknown demo model {name!r}: the demo models are {', '.join(DEMO_MODELS)}"
            )
        return ModelSource("demo", name)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(
                f"{path} is a file but not a .gguf: pass a model directory, a .gguf or a hub id"
            )
        return ModelSource("gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        return ModelSource("dir", str(path.resolve())) if _check_dir(path) else _gguf_in_dir(path)
    looks_like_path = (
        spec.startswith((".", "/", "~")) or spec.count("/") != 1 or path.suffix == ".gguf"
    )
    if looks_like_path or not _HUB_ID.match(spec):
        raise UserError(
            f"model path {spec} does not exist: pass a model directory, a .gguf file or a hub id"
        )
    return ModelSource("hub", spec)


def _check_dir(path: Path) -> bool:
    """True for a Hugging Face model directory with weights; False if it only holds a GGUF."""
    has_weights = any(any(path.glob(g)) for g in _WEIGHT_GLOBS)
    if (path / "config.json").is_file():
        if not has_weights:
            raise UserError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
        return True
    if any(path.glob("*.gguf")):
        return False
    raise UserError(f"{path} is not a model directory: no config.json, weights or .gguf file in it")


def _gguf_in_dir(path: Path) -> ModelSource:
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise UserError(f"{path} holds several .gguf files ({names}): pass the one to use")
    return ModelSource("gguf", str(path.resolve()), files[0].name)


def materialize(source: ModelSource, progress: Any = None) -> ModelSource:
    """Turn a demo source into the local directory it is built in (building it if needed)."""
    if source.kind != "demo":
        return source
    from abfleet.demo.refusal_tune import ensure_demo_model

    return ModelSource("dir", str(ensure_demo_model(progress=progress)))


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    dtype: str


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


def check_architecture(source: ModelSource) -> Any:
    """Load only the config and fail early on an architecture transformers or abliteration lacks."""
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

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(
            f"unsupported architecture {config.model_type!r} in {source.display}: "
            "abliteration needs a decoder-only causal language model"
        )
    return config


def load_model(
    source: ModelSource,
    dtypes: tuple[str, ...] = DEFAULT_DTYPES,
    device_map: str | None = "auto",
    tokenizer: Any = None,
) -> LoadedModel:
    """Load with the first dtype that works; a dtype that fails to load or to answer is skipped."""
    from transformers import AutoModelForCausalLM

    from abfleet.core.ablation import find_targets

    check_architecture(source)
    tok = tokenizer or load_tokenizer(source)
    location, kwargs = _load_kwargs(source)
    use_map = device_map if (device_map and torch.cuda.is_available()) else None
    errors = []
    for name in dtypes:
        dtype: Any = name if name == "auto" else getattr(torch, name)
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
            find_targets(model)  # raises UserError on an architecture without editable projections
            actual = str(next(model.parameters()).dtype).removeprefix("torch.")
            log.info("loaded %s as %s (asked %s)", source.display, actual, name)
            return LoadedModel(model, tok, source, actual)
        errors.append(f"{name}: {problem}")
        log.warning("%s as %s failed the smoke test: %s", source.display, name, problem)
        del model
    raise UserError(f"could not load {source.display} with any dtype ({'; '.join(errors)})")


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
