"""Ablation on tiny real models (dense and MoE): the math, the kernel, and exact reset."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from abfleet.core.ablation import (
    AblationParams,
    Ablator,
    ComponentParams,
    find_targets,
    global_direction,
    layer_weight,
    orthogonalize_,
)
from abfleet.errors import UserError
from conftest import make_model

KINDS = ["llama", "qwen2", "qwen2_moe", "mixtral"]


def random_directions(model, seed=0):
    n = len(model.model.layers) + 1
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, model.config.hidden_size, generator=g)
    return d / d.norm(dim=-1, keepdim=True)


def everywhere(weight: float) -> AblationParams:
    """Weight `weight` on every layer, for both components, per-layer directions."""
    comp = ComponentParams(
        max_weight=weight, max_weight_position=0.0, min_weight=weight, min_weight_distance=100.0
    )
    return AblationParams("per_layer", 0.0, comp, comp)


@pytest.mark.parametrize("kind", KINDS)
def test_targets_cover_attention_and_mlp_including_experts(kind, tokenizer):
    model = make_model(kind, len(tokenizer))
    targets = find_targets(model)
    names = {t.name for t in targets if t.layer == 0}
    assert any("o_proj" in n for n in names)
    if kind in ("qwen2_moe", "mixtral"):
        assert "mlp.experts.down_proj" in names
        expert = next(t for t in targets if t.name == "mlp.experts.down_proj")
        assert expert.param.dim() == 3 and expert.out_axis == 1
    if kind == "qwen2_moe":
        assert "mlp.shared_expert.down_proj.weight" in names
    if kind in ("llama", "qwen2"):
        assert "mlp.down_proj.weight" in names
    assert {t.layer for t in targets} == set(range(len(model.model.layers)))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", KINDS)
def test_weight_one_writes_nothing_along_the_direction(kind, tokenizer):
    """Merged into the weights (the export): no touched matrix has a part along v."""
    model = make_model(kind, len(tokenizer))
    original = copy.deepcopy(model.state_dict())
    directions = random_directions(model)
    ablator = Ablator(model)
    ablator.merge(everywhere(1.0), directions)
    for t in ablator.targets:
        v = directions[t.layer + 1]
        moved = t.param.detach().float().movedim(t.out_axis, -2)  # (..., d_model, d_in)
        along = torch.einsum("d,...di->...i", v, moved)
        scale = moved.abs().max()
        assert along.abs().max() < 1e-5 * scale, t.name
        if t.is_bias:
            continue
        # And the ablation did something: the original wrote along v.
        key = next(k for k, p in model.named_parameters() if p is t.param)
        orig = original[key].float().movedim(t.out_axis, -2)
        assert torch.einsum("d,...di->...i", v, orig).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_reset_restores_the_model_bit_for_bit(kind, tokenizer):
    model = make_model(kind, len(tokenizer))
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    clean = _logits(model, ids)
    ablator = Ablator(model)
    directions = random_directions(model, seed=3)
    for params in (
        everywhere(1.3),
        everywhere(0.4),
        AblationParams(
            "global", 1.7, ComponentParams(1.1, 2.0, 0.2, 1.5), ComponentParams(0.7, 3.0, 0.1, 2.0)
        ),
    ):
        ablator.apply(params, directions)
        assert not torch.equal(_logits(model, ids), clean)
        ablator.reset()
        assert torch.equal(_logits(model, ids), clean)
        for key, value in model.state_dict().items():
            assert torch.equal(before[key], value), key
    assert ablator.copy_bytes == 0  # the deltas keep no copy of any matrix


def test_reset_is_exact_in_bfloat16_with_norm_preserving_experts(tokenizer):
    """Fused experts with norm preservation are the one in-place edit: restored from a copy."""
    model = make_model("mixtral", len(tokenizer)).to(torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    ablator = Ablator(model, norm_preserving=True, copy_device="cpu")
    assert ablator.copy_bytes > 0
    ablator.apply(everywhere(0.9), random_directions(model))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    ablator.reset()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layer_weight_matches_hand_computed_values():
    comp = ComponentParams(
        max_weight=1.2, max_weight_position=10.0, min_weight=0.3, min_weight_distance=4.0
    )
    # d = |i - 10|; w = 1.2 + (d / 4) * (0.3 - 1.2); untouched beyond d = 4
    expected = {
        10: 1.2,
        11: 0.975,
        12: 0.75,
        13: 0.525,
        14: 0.3,
        8: 0.75,
        6: 0.3,
        15: None,
        5: None,
    }
    for layer, want in expected.items():
        got = layer_weight(layer, comp)
        assert (got is None) if want is None else got == pytest.approx(want), layer
    fractional = ComponentParams(1.0, 7.5, 0.0, 2.5)
    assert layer_weight(9, fractional) == pytest.approx(1.0 - 1.5 / 2.5)
    assert layer_weight(10, fractional) == pytest.approx(0.0)
    assert layer_weight(4, fractional) is None


def test_global_direction_interpolates_between_layers():
    d = torch.eye(6)
    v = global_direction(d, 2.25)  # between rows 3 and 4 (row 0 is the embeddings)
    expected = torch.lerp(d[3], d[4], 0.25)
    assert torch.allclose(v, expected / expected.norm())
    assert torch.allclose(global_direction(d, 1.0), d[2])


def test_orthogonalize_matches_the_formula():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 4, generator=g)
    v = torch.randn(6, generator=g)
    v = v / v.norm()
    expected = w - 0.7 * torch.outer(v, v @ w)
    actual = w.clone()
    orthogonalize_(actual, v, 0.7, 0, norm_preserving=False)
    assert torch.allclose(actual, expected, atol=1e-6)


def test_norm_preserving_matches_a_hand_computed_example():
    # W = diag(2, 1) (rows: residual coordinates), v = (1, 1)/sqrt(2), weight 1.
    # Unit rows: I. I - v v^T = [[.5, -.5], [-.5, .5]]; each row renormalized to length 1:
    # [[1, -1], [-1, 1]]/sqrt(2); scaled back to the original row norms 2 and 1:
    # [[sqrt2, -sqrt2], [-1/sqrt2, 1/sqrt2]].
    r2 = math.sqrt(2.0)
    w = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([1.0, 1.0]) / r2
    out = w.clone()
    orthogonalize_(out, v, 1.0, 0, norm_preserving=True)
    expected = torch.tensor([[r2, -r2], [-1 / r2, 1 / r2]])
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.norm(dim=1), w.norm(dim=1), atol=1e-6)  # row norms kept
    # The plain edit of the same matrix differs: [[1, -.5], [-1, .5]] (row norms change).
    plain = w.clone()
    orthogonalize_(plain, v, 1.0, 0, norm_preserving=False)
    assert torch.allclose(plain, torch.tensor([[1.0, -0.5], [-1.0, 0.5]]), atol=1e-6)
    # Fused experts store the output on another axis: the same edit, expert by expert.
    fused = torch.stack([w.T, 3 * w.T])  # (experts, d_in, d_model): out axis 2
    orthogonalize_(fused, v, 1.0, 2, norm_preserving=True)
    assert torch.allclose(fused[0], expected.T, atol=1e-6)
    assert torch.allclose(fused[1], 3 * expected.T, atol=1e-5)


def test_untouched_layers_stay_untouched(tokenizer):
    model = make_model("llama", len(tokenizer), layers=6)
    ids = torch.randint(0, 200, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = model(input_ids=ids, output_hidden_states=True).hidden_states
    comp = ComponentParams(1.0, 5.0, 1.0, 1.0)  # only layers 4 and 5
    Ablator(model).apply(AblationParams("per_layer", 0.0, comp, comp), random_directions(model))
    with torch.no_grad():
        ablated = model(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is layer i's output
    same = [i for i in range(6) if torch.equal(clean[i + 1], ablated[i + 1])]
    assert same == [0, 1, 2, 3]


def test_architecture_without_projections_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UserError, match="unsupported architecture"):
        find_targets(model)


def test_a_second_editor_of_a_model_switches_layer_reuse_off(tokenizer):
    """Reusing the unedited layers relies on knowing where the edits start; with two Ablators
    on one model nobody does, so neither reuses anything (and a new one stays off)."""
    from abfleet.core.generate import make_batches, prefill

    model = make_model("llama", len(tokenizer))
    first = Ablator(model)
    assert first.unedited is not None and first.unedited.enabled
    batch = make_batches([[5, 6, 7, 8]], 1, 0, torch.device("cpu"))[0]
    with torch.no_grad():
        prefill(model, batch)
    assert first.unedited.bytes > 0  # the unedited model's layers were kept
    second = Ablator(model)
    assert second.unedited is None and not first.unedited.enabled and first.unedited.bytes == 0
    second.apply(everywhere(1.0), random_directions(model))
    skipped = first.unedited.skipped
    with torch.no_grad():
        prefill(model, batch)
    assert first.unedited.skipped == skipped
    first.close()
    second.close()
    assert Ablator(model).unedited is None
