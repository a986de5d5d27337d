"""Every model family the users rent GPUs for: at weight 1, each ablated module's real forward
pass writes nothing along the direction, and nothing else changes by a single bit.

Tiny models built from each family's transformers config (random float32 weights). gpt-oss has
hidden == intermediate, as gpt-oss-20b/120b do (2880), so its square expert matrices can only
be told apart by how the experts use them, and its biases write into the residual stream.
"""

from __future__ import annotations

import pytest
import torch

from abfleet.core.ablation import AblationParams, Ablator, ComponentParams, decoder_layers

H = 32  # hidden size of every tiny model


def _config(family: str):
    import transformers as tf

    common = dict(
        vocab_size=64,
        hidden_size=H,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if family == "llama":
        return tf.LlamaConfig(intermediate_size=48, **common)
    if family == "qwen2":
        return tf.Qwen2Config(intermediate_size=48, **common)
    if family == "qwen3":
        return tf.Qwen3Config(intermediate_size=48, head_dim=8, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(intermediate_size=48, head_dim=8, **common)
    if family == "gemma3_vlm":  # the language tower of a vision-language model
        vision = dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        return tf.Gemma3Config(
            text_config=dict(intermediate_size=48, head_dim=8, **common),
            vision_config=vision,
            mm_tokens_per_image=4,
        )
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(intermediate_size=48, pad_token_id=0, **common)
    if family == "mixtral":
        return tf.MixtralConfig(
            intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, **common
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=40,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            **common,
        )
    if family == "deepseek_v3":  # a first dense layer, then routed and shared experts
        return tf.DeepseekV3Config(
            intermediate_size=48,
            moe_intermediate_size=24,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            **{**common, "num_key_value_heads": 4},
        )
    if family == "gpt_oss":
        return tf.GptOssConfig(
            intermediate_size=H,  # square experts, as in gpt-oss-20b/120b
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["full_attention"] * 3,
            **common,
        )
    raise ValueError(family)


FAMILIES = [
    "llama",
    "qwen2",
    "qwen3",
    "gemma3",
    "gemma3_vlm",
    "phi3",
    "mixtral",
    "qwen3_moe",
    "deepseek_v3",
    "gpt_oss",
]


def _model(family: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(0)
    cfg = _config(family)
    cls = AutoModelForImageTextToText if family == "gemma3_vlm" else AutoModelForCausalLM
    model = cls.from_config(cfg).float().eval()
    with torch.no_grad():  # the default init leaves biases at zero: give them something to write
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _everywhere() -> AblationParams:
    comp = ComponentParams(1.0, 0.0, 1.0, 100.0)
    return AblationParams("per_layer", 0.0, comp, comp)


def _along(out: torch.Tensor, v: torch.Tensor) -> float:
    """Largest part of any output row along v, relative to the largest row."""
    out = out.float().reshape(-1, out.shape[-1])
    return float((out @ v).abs().max() / out.norm(dim=-1).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_each_ablated_module_writes_nothing_along_the_direction(family):
    model = _model(family)
    layers = decoder_layers(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    directions = torch.randn(len(layers) + 1, H, generator=g)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    ablator = Ablator(model)
    assert {t.layer for t in ablator.targets} == set(range(len(layers)))
    ablator.apply(_everywhere(), directions)

    checked = set()
    for t in ablator.targets:
        v = directions[t.layer + 1]
        layer = layers[t.layer]
        path, _, attr = t.name.rpartition(".")
        owner = layer.get_submodule(path)
        if isinstance(owner, torch.nn.Linear):
            out = owner(torch.randn(5, owner.in_features, generator=g))
        else:  # fused experts: their MLP block routes real tokens through them
            mlp = layer.get_submodule(t.name.split(".")[0])
            out = mlp(torch.randn(2, 6, H, generator=g))
            out = out[0] if isinstance(out, tuple) else out
        # A module with a bias writes the bias too: both are in the forward pass above.
        assert _along(out, v) < 1e-4, (family, t.name, _along(out, v))
        checked.add((t.component, attr))

    touched = {id(t.param) for t in ablator.targets}
    for name, p in model.named_parameters():
        if id(p) not in touched:
            assert torch.equal(p, before[name]), f"{family}: {name} changed"
    if family == "gpt_oss":
        names = {t.name for t in ablator.targets if t.layer == 0}
        assert {
            "mlp.experts.down_proj",
            "mlp.experts.down_proj_bias",
            "self_attn.o_proj.bias",
        } <= names
        expert = next(t for t in ablator.targets if t.name == "mlp.experts.down_proj")
        assert expert.out_axis == 2  # (experts, intermediate, hidden): x @ W

    ablator.reset()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{family}: {name} not restored"


def _some_trial() -> AblationParams:
    """Different weights per layer and component, a direction between two layers."""
    return AblationParams(
        "global", 1.4, ComponentParams(1.2, 1.0, 0.5, 1.5), ComponentParams(0.9, 2.0, 0.3, 2.0)
    )


@pytest.mark.parametrize("norm_preserving", [False, True], ids=["plain", "norm_preserving"])
@pytest.mark.parametrize("family", FAMILIES)
def test_delta_path_gives_the_logits_of_the_edited_weights(family, norm_preserving):
    """The search's deltas on the outputs equal the edit written into the weights (what the
    export merges), and a reset gives back the original model exactly."""
    import copy

    model = _model(family)
    layers = decoder_layers(model)
    g = torch.Generator().manual_seed(2)
    directions = torch.randn(len(layers) + 1, H, generator=g)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    before_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        original = model(input_ids=ids).logits

    edited = copy.deepcopy(model)
    Ablator(edited, norm_preserving).merge(_some_trial(), directions)
    with torch.no_grad():
        expected = edited(input_ids=ids).logits

    ablator = Ablator(model, norm_preserving)
    ablator.apply(_some_trial(), directions)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 1e-4 * scale, family
    assert (got - original).abs().max() > 1e-2 * scale  # the trial changed the model

    ablator.reset()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original)
    for name, p in model.named_parameters():
        assert torch.equal(p, before_state[name]), f"{family}: {name} not restored"


def _prefill_outputs(model, batches):
    from abfleet.core.generate import prefill

    found = []
    with torch.no_grad():
        for batch in batches:
            out, cache, _ = prefill(model, batch)
            found.append(out.logits)
            found += [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_below_the_edit_are_reused_bit_for_bit(family):
    """A prefill skips the layers below the trial's first edited one (their KV entries and
    output kept from an earlier prefill of the same prompts), and its logits and KV cache are
    the very numbers that running those layers gives."""
    from abfleet.core.generate import make_batches

    model = _model(family)
    n = len(decoder_layers(model))
    g = torch.Generator().manual_seed(3)
    directions = torch.randn(n + 1, H, generator=g)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    shared = torch.randint(1, 64, (10,), generator=g).tolist()  # a chat template's worth
    lengths = (3, 6, 4, 5, 2, 7)
    prompts = [shared + torch.randint(1, 64, (k,), generator=g).tolist() for k in lengths]
    batches = make_batches(prompts, 3, 0, torch.device("cpu"), share_prefix=True)
    assert len(batches) == 2 and all(b.prefix is not None for b in batches)

    def trial(position: float) -> AblationParams:
        comp = ComponentParams(1.0, position, 0.5, 0.5)  # this layer only
        return AblationParams("per_layer", 0.0, comp, comp)

    ablator = Ablator(model)
    store = ablator.unedited
    assert store is not None
    base = _prefill_outputs(model, batches)  # the unedited model: every layer is kept
    for position in (n - 1, 0, 1):  # deepest first: the most skipped, then none, then one
        ablator.apply(trial(position), directions)
        skipped = store.skipped
        got = _prefill_outputs(model, batches)
        # Each batch's rows, and the prefix once: the second batch reuses its cache.
        assert store.skipped - skipped == position * (len(batches) + 1), family
        store.enabled = False
        expected = _prefill_outputs(model, batches)
        store.enabled = True
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), family
    ablator.reset()  # nothing edited: every layer is skipped, the model's own numbers come out
    skipped = store.skipped
    assert all(
        torch.equal(a, b) for a, b in zip(_prefill_outputs(model, batches), base, strict=True)
    )
    assert store.skipped - skipped == n * (len(batches) + 1)
    ablator.close()
    assert unedited_store(model) is None


def unedited_store(model):
    from abfleet.core import unedited

    return unedited._STORES.get(model)
