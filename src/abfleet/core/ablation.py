"""Orthogonalize the matrices that write into the residual stream against a direction.

For a unit direction v and weight w, a matrix W whose output lives in the residual stream
becomes W - w * v (v^T W): at w = 1 the layer can no longer write along v. Touched per decoder
layer: the attention output projection and the MLP down projection (every expert's, for MoE),
and their biases, which write into the residual stream too (b - w * v (v . b)).

Which axis of a weight is its output is decided by how the module uses it: an nn.Linear computes
x W^T, so its output axis is 0; a weight of any other module (fused experts that compute x @ W,
a Conv1D) with one axis of the model's width uses that axis, and one with two (gpt-oss experts,
where hidden == intermediate) is probed: each candidate is tried on the component's real forward
pass, and the axis after whose edit the component writes nothing along v is the one.

Between trials the originals come back bit for bit from a copy of only the touched matrices,
and only for the layers the previous trial changed, so a reset costs a memory copy, not a reload.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from abfleet.errors import UserError

log = logging.getLogger(__name__)

COMPONENTS = ("attn", "mlp")

# Parameter names (relative to a decoder layer) that write into the residual stream.
_ATTN_OUT = re.compile(
    r"(^|\.)(self_attn|attention|attn|self_attention)\.(o_proj|out_proj|dense|wo)\.weight$"
)
_MLP_OUT = re.compile(
    r"(^|\.)(mlp|block_sparse_moe|feed_forward|moe)\.(.*\.)?"
    r"(down_proj|w2|fc2|dense_4h_to_h|c_proj)(\.weight)?$"
)


@dataclass(frozen=True)
class Target:
    """One editable tensor: the dimension of size d_model is its output axis."""

    layer: int
    component: str
    name: str
    param: torch.nn.Parameter
    out_axis: int
    is_bias: bool = False


@dataclass(frozen=True)
class ComponentParams:
    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float


@dataclass(frozen=True)
class AblationParams:
    direction_scope: str  # "global" or "per_layer"
    direction_index: float
    attn: ComponentParams
    mlp: ComponentParams
    extra: dict[str, Any] = field(default_factory=dict)

    def component(self, name: str) -> ComponentParams:
        return self.attn if name == "attn" else self.mlp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AblationParams:
        return cls(
            direction_scope=data["direction_scope"],
            direction_index=float(data["direction_index"]),
            attn=ComponentParams(**data["attn"]),
            mlp=ComponentParams(**data["mlp"]),
        )


def layer_weight(layer: int, comp: ComponentParams) -> float | None:
    """The kernel: max_weight at max_weight_position, falling linearly to min_weight at
    min_weight_distance layers away; None (layer untouched) beyond that."""
    distance = abs(layer - comp.max_weight_position)
    if distance > comp.min_weight_distance:
        return None
    span = comp.min_weight_distance
    frac = distance / span if span > 0 else 0.0
    return comp.max_weight + frac * (comp.min_weight - comp.max_weight)


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder blocks, wherever the architecture keeps it."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    for owner in (base, getattr(base, "language_model", None), getattr(base, "decoder", None)):
        if owner is None:
            continue
        for name in ("layers", "h", "blocks"):
            layers = getattr(owner, name, None)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
                return layers
    raise UserError(
        f"unsupported architecture {type(model).__name__}: cannot find its list of decoder layers"
    )


def hidden_size(model: Any) -> int:
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    return int(config.hidden_size)


def find_targets(model: Any) -> list[Target]:
    d_model = hidden_size(model)
    targets: list[Target] = []
    probed: dict[tuple[str, tuple[int, ...]], int] = {}  # the same module in every layer
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        found = {c: 0 for c in COMPONENTS}
        here: list[Target] = []
        unknown: list[tuple[str, torch.nn.Parameter, list[int]]] = []
        for name, param in layer.named_parameters():
            component = _component(name)
            if component is None:
                continue
            if param.device.type == "meta":
                raise UserError(
                    f"layer {index}'s {name} is not in memory (offloaded to disk by the device "
                    "map): its ablation would do nothing; rent a GPU that holds the whole model"
                )
            axes = _output_axes(layer, name, param, d_model)
            if not axes:
                log.debug(
                    "skipping %s of shape %s: no axis of size %d", name, tuple(param.shape), d_model
                )
                continue
            if len(axes) > 1:
                unknown.append((name, param, axes))
                continue
            here += _with_bias(layer, index, component, name, param, axes[0])
            found[component] += 1
        for name, param, axes in unknown:
            component = _component(name) or "mlp"
            key = (re.sub(r"\.\d+\.", ".N.", name), tuple(param.shape))
            if key not in probed:
                probed[key] = _probe_axis(layer, component, name, param, axes, here, d_model)
            here += _with_bias(layer, index, component, name, param, probed[key])
            found[component] += 1
        targets += here
        if not all(found.values()):
            missing = " and ".join(c for c, n in found.items() if not n)
            raise UserError(
                f"unsupported architecture {type(model).__name__}: layer {index} has no {missing} "
                "output projection that abliteration can edit"
            )
    return targets


def _component(name: str) -> str | None:
    return "attn" if _ATTN_OUT.search(name) else "mlp" if _MLP_OUT.search(name) else None


def _owner(layer: Any, name: str) -> tuple[Any, str]:
    path, _, attr = name.rpartition(".")
    return (layer.get_submodule(path) if path else layer), attr


def _output_axes(layer: Any, name: str, param: torch.Tensor, d_model: int) -> list[int]:
    """The axes that may be the output: 0 for an nn.Linear (it computes x W^T), else every
    axis of the model's width (never a fused tensor's expert axis)."""
    owner, attr = _owner(layer, name)
    if isinstance(owner, torch.nn.Linear):
        return [0] if attr == "weight" and param.shape[0] == d_model else []
    first = 1 if param.dim() == 3 else 0
    return [a for a in range(first, param.dim()) if param.shape[a] == d_model]


def _with_bias(
    layer: Any, index: int, component: str, name: str, param: Any, axis: int
) -> list[Target]:
    """The weight, and the bias that adds to its output (`bias` of a Linear, `X_bias` beside
    a fused `X`), which writes into the residual stream just the same."""
    found = [Target(index, component, name, param, axis)]
    owner, attr = _owner(layer, name)
    bias_attr = "bias" if attr == "weight" else f"{attr}_bias"
    bias = getattr(owner, bias_attr, None)
    if isinstance(bias, torch.nn.Parameter):
        path = name.rpartition(".")[0]
        bias_name = f"{path}.{bias_attr}" if path else bias_attr
        found.append(Target(index, component, bias_name, bias, bias.dim() - 1, is_bias=True))
    return found


def _component_module(layer: Any, component: str, name: str) -> Any:
    pattern = _ATTN_OUT if component == "attn" else _MLP_OUT
    m = pattern.search(name)
    assert m is not None
    return layer.get_submodule(name[: m.start(2)] + m.group(2))


def _probe_axis(
    layer: Any,
    component: str,
    name: str,
    param: torch.nn.Parameter,
    axes: list[int],
    known: list[Target],
    d_model: int,
) -> int:
    """Try each candidate axis on the component's own forward pass (with every other edit of
    that component in place): the output axis is the one after which nothing is written
    along the direction."""
    module = _component_module(layer, component, name)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(d_model, generator=gen)
    v = v / v.norm()
    x = torch.randn(2, 7, d_model, generator=gen).to(param.device, param.dtype)
    group = [t for t in known if t.component == component]
    scores: dict[int, float] = {}
    for axis in axes:
        trial = [*group, *_with_bias(layer, -1, component, name, param, axis)]
        saved = [t.param.detach().clone() for t in trial]
        try:
            with torch.no_grad():
                for t in trial:
                    orthogonalize_(t.param, v, 1.0, t.out_axis, False, t.is_bias)
                out = module(x)
                out = (out[0] if isinstance(out, tuple) else out).float()
                along = (out @ v.to(out.device)).abs().max()
                scores[axis] = float(along / out.norm(dim=-1).max().clamp_min(1e-12))
        finally:
            with torch.no_grad():
                for t, original in zip(trial, saved, strict=True):
                    t.param.data.copy_(original)
    best = min(scores, key=lambda a: scores[a])
    tolerance = 1e-3 if param.dtype == torch.float32 else 3e-2
    if scores[best] > tolerance:
        raise UserError(
            f"cannot tell which axis of {name} {tuple(param.shape)} writes into the residual "
            f"stream (after each candidate edit the output still has {scores[best]:.2g} of its "
            "norm along the direction): this architecture is not supported"
        )
    log.debug("%s %s: output axis %d (probe %s)", name, tuple(param.shape), best, scores)
    return best


def orthogonalize_(
    weight: torch.Tensor,
    v: torch.Tensor,
    w: float,
    out_axis: int,
    norm_preserving: bool,
    is_bias: bool = False,
) -> None:
    """In place: weight <- (I - w v v^T) applied along out_axis. Math in float32."""
    work = weight.data.float()
    vv = v.to(device=work.device, dtype=torch.float32)
    if is_bias:  # (..., d_model): what it adds to the residual stream loses its part along v
        weight.data.copy_((work - w * (work @ vv).unsqueeze(-1) * vv).to(weight.dtype))
        return
    moved = work.movedim(out_axis, -2)  # (..., d_model, d_in): row i writes coordinate i
    if norm_preserving:
        # Norm-preserving (biprojected) abliteration as published: rows (one per residual
        # coordinate, over the inputs) are normalized, the edit is made on the unit rows,
        # and each row is scaled back to its original length.
        norms = moved.norm(dim=-1, keepdim=True)
        moved = moved / norms.clamp_min(1e-12)
    proj = torch.einsum("d,...di->...i", vv, moved)
    moved = moved - w * torch.einsum("d,...i->...di", vv, proj)
    if norm_preserving:
        moved = moved / moved.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norms
    weight.data.copy_(moved.movedim(-2, out_axis).to(weight.dtype))


def direction_for_layer(
    directions: torch.Tensor, params: AblationParams, layer: int
) -> torch.Tensor:
    """directions has n_layers + 1 rows (row 0: embeddings), each a unit vector."""
    if params.direction_scope == "per_layer":
        return directions[layer + 1]
    return global_direction(directions, params.direction_index)


def global_direction(directions: torch.Tensor, index: float) -> torch.Tensor:
    last = directions.shape[0] - 1
    low = min(math.floor(index) + 1, last)
    high = min(low + 1, last)
    frac = index - math.floor(index)
    v = torch.lerp(directions[low].float(), directions[high].float(), frac)
    return v / v.norm().clamp_min(1e-12)


class Ablator:
    """Applies trial parameters to a model in place and restores it exactly."""

    def __init__(
        self, model: Any, norm_preserving: bool = False, copy_device: str | None = None
    ) -> None:
        self.model = model
        self.norm_preserving = norm_preserving
        self.targets = find_targets(model)
        self.n_layers = len(decoder_layers(model))
        # The copy stays on the weight's device unless told otherwise (e.g. "cpu" when the GPU
        # cannot hold it): a reset is then a device-local memcpy.
        self._originals = {
            id(t.param): t.param.detach().to(copy_device or t.param.device, copy=True)
            for t in self.targets
        }
        self._dirty: set[int] = set()

    @property
    def copy_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._originals.values())

    def reset(self) -> None:
        with torch.no_grad():
            for target in self.targets:
                if target.layer in self._dirty:
                    target.param.data.copy_(self._originals[id(target.param)])
        self._dirty.clear()

    def apply(
        self, params: AblationParams, directions: torch.Tensor
    ) -> dict[str, list[float | None]]:
        """Reset, then ablate; return the weight used per layer and component (None: untouched)."""
        self.reset()
        weights: dict[str, list[float | None]] = {c: [] for c in COMPONENTS}
        for comp in COMPONENTS:
            for layer in range(self.n_layers):
                weights[comp].append(layer_weight(layer, params.component(comp)))
        with torch.no_grad():
            for target in self.targets:
                w = weights[target.component][target.layer]
                if w is None or w == 0.0:
                    continue
                v = direction_for_layer(directions, params, target.layer)
                orthogonalize_(
                    target.param, v, w, target.out_axis, self.norm_preserving, target.is_bias
                )
                self._dirty.add(target.layer)
        return weights
