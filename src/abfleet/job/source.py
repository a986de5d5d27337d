"""Where a model comes from (a directory, a .gguf file, a hub id or a model built here, such as
the demo), decided without loading anything and without importing torch.

Built models are named SCHEME:NAME. Whoever builds them registers under the entry point group
`abfleet.built_models` (the demo does, in pyproject.toml), so this module finds them without
importing their package, which itself needs the core.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from abfleet.errors import UserError

DEFAULT_DTYPES = ("auto", "bfloat16", "float16", "float32")
BUILT_MODELS_GROUP = "abfleet.built_models"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


class BuiltModels(Protocol):
    """Models built on this machine rather than found, named SCHEME:NAME."""

    names: tuple[str, ...]

    def identity(self, name: str) -> str:
        """Changes whenever the build would give other weights."""
        ...

    def build(self, name: str, progress: Any = None) -> Path:
        """The model directory, built first if needed."""
        ...


@functools.cache
def _registered() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=BUILT_MODELS_GROUP)}


def built_models(scheme: str) -> BuiltModels:
    return _registered()[scheme].load()


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from, decided without loading anything."""

    kind: str  # "dir", "gguf", "hub" or "built"
    location: str  # directory, hub id or the built model's name
    gguf_file: str | None = None
    scheme: str = ""  # for "built": who builds it ("demo")

    @property
    def display(self) -> str:
        if self.kind == "gguf":
            return str(Path(self.location) / (self.gguf_file or ""))
        if self.kind == "built":
            return f"{self.scheme}:{self.location}"
        return self.location

    @property
    def is_local(self) -> bool:
        return self.kind in ("dir", "gguf")


def resolve_source(spec: str) -> ModelSource:
    """Classify a model argument, failing with one clear line on paths that cannot work."""
    spec = spec.strip()
    if not spec:
        raise UserError("no model given: pass --model or set model in the job file")
    scheme, colon, name = spec.partition(":")
    if colon and scheme in _registered():
        names = built_models(scheme).names
        if name not in names:
            raise UserError(
                f"unknown {scheme} model {name!r}: the {scheme} models are {', '.join(names)}"
            )
        return ModelSource("built", name, scheme=scheme)
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


def judge_source(judge: str) -> ModelSource | None:
    """The job's judge model (None without one), checked like the model: a typo fails at the
    start, not after hours of search."""
    if not judge.strip():
        return None
    try:
        return resolve_source(judge)
    except UserError as exc:
        raise UserError(f"judge: {exc}") from None


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
    if source.kind == "built":
        return f"{source.display}:{built_models(source.scheme).identity(source.location)}"
    return spec


def materialize(source: ModelSource, progress: Any = None) -> ModelSource:
    """Turn a built source (the demo) into the local directory it is built in."""
    if source.kind != "built":
        return source
    return ModelSource("dir", str(built_models(source.scheme).build(source.location, progress)))
