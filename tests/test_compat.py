"""The adapter to transformers' internals (core/compat.py): the installed version's names are
found, and a form it does not know switches the optimization off with a reason."""

from __future__ import annotations

import inspect

import torch

from abfleet.core import compat
from abfleet.core.ablation import Ablator, decoder_layers
from conftest import make_model, make_tokenizer


def test_the_installed_versions_cache_keyword_is_found():
    model = make_model("llama", len(make_tokenizer()))
    layer = decoder_layers(model)[0]
    name = compat.cache_keyword(layer)
    assert name in inspect.signature(type(layer).forward).parameters
    assert compat.cache_keyword(model) in inspect.signature(type(model).forward).parameters
    assert compat.layer_reuse_unsupported(decoder_layers(model)) is None
    ablator = Ablator(model)
    assert ablator.unedited is not None and ablator.unedited.enabled
    ablator.close()


def test_a_layer_that_hides_its_cache_keyword_switches_the_reuse_off_with_a_reason():
    """A version whose decoder layers take the cache under an unknown name (here: only as
    **kwargs) must not be skipped silently wrong: the reuse is off and says why."""
    model = make_model("llama", len(make_tokenizer()))
    layers = decoder_layers(model)
    original = type(layers[0])

    class OpaqueLayer(original):
        def forward(self, hidden_states, *args, **kwargs):  # type: ignore[override]
            return super().forward(hidden_states, *args, **kwargs)

    for layer in layers:
        layer.__class__ = OpaqueLayer
    why = compat.layer_reuse_unsupported(layers)
    assert why is not None and "OpaqueLayer takes its KV cache under none of cache" in why
    ablator = Ablator(model)
    store = ablator.unedited
    assert store is not None and not store.enabled and store.unsupported == why
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        model(input_ids=ids)  # still runs, every layer computed
    assert store.skipped == 0
    ablator.close()
