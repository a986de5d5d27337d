"""Where a model comes from (a directory, a .gguf file, a hub id or the demo model), decided
without loading anything and without importing torch."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abfleet.errors import UserError

DEFAULT_DTYPES = ("auto", "bfloat16", "float16", "float32")
DEMO_PREFIX = "demo:"
DEMO_MODELS = ("smollm2-refusal",)
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


def model_identity(spec: str) -> str:
    """What a model *is*, not where it lies: the same weights uploaded to another folder or
    box keep the same identity, so a resumed study still matches its job."""
    import hashlib

    try:
        source = resolve_source(spec)
    except UserError:
        return spec
    if source.kind == "dir":
        path = Path(source.location)
        digest = hashlib.sha256((path / "config.json").read_bytes())
        for weights in sorted(p for g in _WEIGHT_GLOBS for p in path.glob(g)):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        return f"dir:{digest.hexdigest()[:16]}"
    if source.kind == "gguf":
        file = Path(source.location) / (source.gguf_file or "")
        return f"gguf:{file.name}:{file.stat().st_size}"
    if source.kind == "demo":
        from abfleet.demo.refusal_tune import recipe_hash

        return f"demo:{source.location}:{recipe_hash()}"
    return spec


def materialize(source: ModelSource, progress: Any = None) -> ModelSource:
    """Turn a demo source into the local directory it is built in (building it if needed)."""
    if source.kind != "demo":
        return source
    from abfleet.demo.refusal_tune import ensure_demo_model

    return ModelSource("dir", str(ensure_demo_model(progress=progress)))
