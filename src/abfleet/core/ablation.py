"""Orthogonalize the matrices that write into the residual stream against a direction.

For a unit direction v and weight w, a matrix W whose output lives in the residual stream
becomes W - w * v (v^T W): at w = 1 the layer can no longer write along v. Touched per decoder
layer: the attention output projection and the MLP down projection (every expert's, for MoE).

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
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        found = {c: 0 for c in COMPONENTS}
        for name, param in layer.named_parameters():
            component = (
                "attn" if _ATTN_OUT.search(name) else "mlp" if _MLP_OUT.search(name) else None
            )
            if component is None:
                continue
            axis = _output_axis(param, d_model)
            if axis is None:
                log.debug(
                    "skipping %s of shape %s: no axis of size %d", name, tuple(param.shape), d_model
                )
                continue
            targets.append(Target(index, component, name, param, axis))
            found[component] += 1
        if not all(found.values()):
            missing = " and ".join(c for c, n in found.items() if not n)
            raise UserError(
                f"unsupported architecture {type(model).__name__}: layer {index} has no {missing} "
                "output projection that abliteration can edit"
            )
    return targets


def _output_axis(param: torch.Tensor, d_model: int) -> int | None:
    # nn.Linear stores (out, in); fused experts store (experts, out, in) or (experts, in, out).
    if param.dim() == 2 and param.shape[0] == d_model:
        return 0
    if param.dim() == 3:
        if param.shape[1] == d_model:
            return 1
        if param.shape[2] == d_model:
            return 2
    return None


def orthogonalize_(
    weight: torch.Tensor, v: torch.Tensor, w: float, out_axis: int, norm_preserving: bool
) -> None:
    """In place: weight <- (I - w v v^T) applied along out_axis. Math in float32."""
    work = weight.data.float()
    vv = v.to(device=work.device, dtype=torch.float32)
    moved = work.movedim(out_axis, -2)  # (..., d_model, d_in)
    if norm_preserving:
        norms = moved.norm(dim=-2, keepdim=True)
    proj = torch.einsum("d,...di->...i", vv, moved)
    moved = moved - w * torch.einsum("d,...i->...di", vv, proj)
    if norm_preserving:
        # Keep the length of what each input feature writes into the residual stream.
        moved = moved * (norms / moved.norm(dim=-2, keepdim=True).clamp_min(1e-12))
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
                orthogonalize_(target.param, v, w, target.out_axis, self.norm_preserving)
                self._dirty.add(target.layer)
        return weights
