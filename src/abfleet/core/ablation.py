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

During the search the edit is not written into the weights: the Ablator applies it as a delta on
the touched modules' outputs (see Ablator), so a reset is free and exact. orthogonalize_ is the
same edit written into a tensor, for the export's merge.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from abfleet.core import unedited
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
    if isinstance(owner, torch.nn.Linear):  # out_features: a quantized weight is packed
        return [0] if attr == "weight" and owner.out_features == d_model else []
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


@dataclass
class _Site:
    """One module whose output is edited: its weight target and, if any, its bias target."""

    module: Any
    layer: int
    component: str
    weight: Target
    bias: Target | None
    hooked: bool
    row_norms: torch.Tensor | None = None  # norm-preserving: |row| per residual coordinate


@dataclass
class _Edit:
    v: torch.Tensor
    w: float
    # Norm-preserving only: out = s * (y - b) - c * (x . p) + b'
    s: torch.Tensor | None = None
    c: torch.Tensor | None = None
    p: torch.Tensor | None = None
    scaled: torch.Tensor = field(init=False)  # -w v, what the plain delta adds per unit of v.y

    def __post_init__(self) -> None:
        self.scaled = -self.w * self.v


class Ablator:
    """Applies a trial's ablation as a delta on the outputs of the touched modules.

    Base weights are never written: editing W into (I - w v v^T) W makes the module output
    y = Wx + b into (I - w v v^T) y, a rank-1 correction applied by a forward hook (and a
    diagonal scale plus a rank-1 term when rows keep their norms). A reset forgets the edits,
    so no copy of the touched matrices is kept and quantized weights can be ablated too.

    Fused expert tensors with norm preservation are the exception: each expert's rows are
    rescaled differently and the experts' module only returns their weighted sum, so those are
    edited in place and restored from a copy (on copy_device, default the weight's device).
    """

    def __init__(
        self, model: Any, norm_preserving: bool = False, copy_device: str | None = None
    ) -> None:
        self.model = model
        self.norm_preserving = norm_preserving
        self.targets = find_targets(model)
        self.n_layers = len(decoder_layers(model))
        self._sites = self._group(model)
        self._active: dict[int, _Edit] = {}
        self._originals = {
            id(s.weight.param): [
                t.param.detach().to(copy_device or t.param.device, copy=True)
                for t in (s.weight, s.bias)
                if t is not None
            ]
            for s in self._sites
            if not s.hooked
        }
        self._dirty: set[int] = set()
        self._handles = [
            s.module.register_forward_hook(self._hook(index))
            for index, s in enumerate(self._sites)
            if s.hooked
        ]
        # Prefills reuse what the layers below the first edited one computed in earlier trials.
        self.unedited = unedited.attach(model, decoder_layers(model))

    def _group(self, model: Any) -> list[_Site]:
        layers = decoder_layers(model)
        biases = {(t.layer, t.name.rpartition(".")[0]): t for t in self.targets if t.is_bias}
        sites = []
        for t in self.targets:
            if t.is_bias:
                continue
            path = t.name.rpartition(".")[0]
            module, _ = _owner(layers[t.layer], t.name)
            bias = biases.get((t.layer, path))
            hooked = not self.norm_preserving or t.param.dim() == 2
            sites.append(_Site(module, t.layer, t.component, t, bias, hooked))
            if hooked and self.norm_preserving:
                sites[-1].row_norms = _row_norms(t.param, t.out_axis)
        return sites

    @property
    def copy_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._originals.values() for t in ts)

    def close(self) -> None:
        """Detach the hooks and restore the weights: the model is as it was loaded."""
        self.reset()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        unedited.release(self.model, self.unedited)
        self.unedited = None

    def reset(self) -> None:
        self._active.clear()
        with torch.no_grad():
            for site in self._sites:
                if not site.hooked and site.layer in self._dirty:
                    originals = self._originals[id(site.weight.param)]
                    for t, original in zip((site.weight, site.bias), originals, strict=False):
                        if t is not None:
                            t.param.data.copy_(original)
        self._dirty.clear()
        if self.unedited is not None:
            self.unedited.edited_from(self.n_layers)

    def edits(
        self, params: AblationParams, directions: torch.Tensor
    ) -> list[tuple[Target, torch.Tensor, float]]:
        """Every touched tensor with its direction and weight under these parameters."""
        found = []
        for target in self.targets:
            w = layer_weight(target.layer, params.component(target.component))
            if w is None or w == 0.0:
                continue
            found.append((target, direction_for_layer(directions, params, target.layer), w))
        return found

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
            for index, site in enumerate(self._sites):
                w = weights[site.component][site.layer]
                if w is None or w == 0.0:
                    continue
                v = direction_for_layer(directions, params, site.layer).float()
                if not site.hooked:
                    for t in (site.weight, site.bias):
                        if t is not None:
                            orthogonalize_(t.param, v, w, t.out_axis, True, t.is_bias)
                    self._dirty.add(site.layer)
                    continue
                v = v.to(site.weight.param.device)
                edit = _Edit(v, w)
                if site.row_norms is not None:
                    _norm_preserving_edit(site, edit)
                self._active[index] = edit
        if self.unedited is not None:
            touched = [self._sites[i].layer for i in self._active] + list(self._dirty)
            self.unedited.edited_from(min(touched, default=self.n_layers))
        return weights

    def detach(self) -> None:
        """Close, and let go of the model (for freeing it): this Ablator is not used again."""
        self.close()
        self.model = None
        self._sites.clear()
        self._originals.clear()
        self.targets = []

    def merge(self, params: AblationParams, directions: torch.Tensor) -> None:
        """Write the trial into the weights themselves and drop the hooks (for saving the model
        from memory when its source files cannot be merged shard by shard)."""
        self.close()
        with torch.no_grad():
            for target, v, w in self.edits(params, directions):
                orthogonalize_(
                    target.param, v, w, target.out_axis, self.norm_preserving, target.is_bias
                )

    def _hook(self, index: int) -> Any:
        site = self._sites[index]

        def hook(_module: Any, args: tuple[Any, ...], output: Any) -> Any:
            edit = self._active.get(index)
            if edit is None:
                return None
            y = output[0] if isinstance(output, tuple) else output
            if edit.s is None:  # y - w v (v . y) in float32, rounded once, written in place
                work = y.float()
                y.copy_(work.addcmul_((work @ edit.v).unsqueeze(-1), edit.scaled))
                return None
            assert edit.c is not None and edit.p is not None
            work, x = y.float(), args[0].float()
            bias = site.bias.param.float() if site.bias is not None else None
            if bias is not None:
                work = work - bias
            work = work * edit.s - (x @ edit.p).unsqueeze(-1) * edit.c
            if bias is not None:
                work = work + bias - edit.w * (bias @ edit.v) * edit.v
            new = work.to(y.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook


def _standard_rows(weight: torch.Tensor, out_axis: int) -> torch.Tensor:
    """A 2-D weight as (d_model, d_in): row i is what input features write to coordinate i."""
    return weight if out_axis == 0 else weight.t()


def _dense(param: torch.Tensor) -> torch.Tensor:
    """The weight as numbers, dequantized when bitsandbytes holds it packed."""
    state = getattr(param, "quant_state", None)
    if state is not None:  # bnb 4-bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(param.data, state)
    scale = getattr(param, "SCB", None)
    if scale is not None and param.dtype == torch.int8:  # bnb 8-bit: int8 rows x absmax / 127
        return param.data.float() * (scale.float().unsqueeze(1) / 127.0)
    return param.data


def _row_norms(param: torch.Tensor, out_axis: int) -> torch.Tensor:
    rows = _standard_rows(_dense(param), out_axis)
    return torch.cat([chunk.float().norm(dim=-1) for chunk in rows.split(4096)])


def _norm_preserving_edit(site: _Site, edit: _Edit) -> None:
    """The hook's terms for the published norm-preserving edit of a 2-D weight W (d, d_in):
    unit rows U = W / r are edited to U - w v p^T with p = U^T v, then each row is scaled back
    to its norm r, so W' = diag(s) W - w diag(s r) v p^T with s = 1 / |edited unit row|."""
    assert site.row_norms is not None
    rows = _standard_rows(_dense(site.weight.param), site.weight.out_axis)
    r = site.row_norms.clamp_min(1e-12)
    u = edit.v / r
    p = torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], 4096):  # float32 one slab at a time, not the matrix
        p += rows[start : start + 4096].float().t() @ u[start : start + 4096]
    q = torch.cat([chunk.float() @ p for chunk in rows.split(4096)]) / r
    unit = (site.row_norms > 0).float()
    length = (unit - 2 * edit.w * edit.v * q + (edit.w * edit.v) ** 2 * (p @ p)).clamp_min(0)
    s = 1.0 / length.sqrt().clamp_min(1e-12)
    edit.s, edit.p, edit.c = s, p, edit.w * s * site.row_norms * edit.v
