"""The cache layer that grows in place (core/kvcache.py): the same numbers as transformers'
DynamicLayer, no copy per decode step, and a shared state is never written through."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from abfleet.core import compat, kvcache
from conftest import make_model, make_tokenizer


def _step(model, cache, ids, start):
    positions = torch.arange(start, start + ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.inference_mode():
        return model(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            **compat.model_cache_kwargs(model, cache),
        ).logits[:, -1, :]


def test_a_roomy_cache_decodes_the_same_numbers_in_place():
    model = make_model("llama", len(make_tokenizer()))
    prompt = torch.randint(1, 200, (3, 9), generator=torch.Generator().manual_seed(0))
    plain = DynamicCache(config=model.config)
    roomy = kvcache.make_roomy(DynamicCache(config=model.config), room=8)
    a, b = _step(model, plain, prompt, 0), _step(model, roomy, prompt, 0)
    assert torch.equal(a, b)
    first = roomy.layers[0].keys.data_ptr()
    for t in range(8):  # greedy steps within the room: written in place, no new buffer
        token = a.argmax(-1)[:, None]
        a, b = _step(model, plain, token, 9 + t), _step(model, roomy, token, 9 + t)
        assert torch.equal(a, b), t
        assert roomy.layers[0].keys.data_ptr() == first
    for mine, theirs in zip(roomy.layers, plain.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    # Past the room: a new, larger buffer, the same numbers.
    token = a.argmax(-1)[:, None]
    assert torch.equal(_step(model, plain, token, 17), _step(model, roomy, token, 17))
    assert roomy.layers[0].keys.data_ptr() != first


def test_a_state_kept_from_a_roomy_cache_is_never_written_through():
    model = make_model("llama", len(make_tokenizer()))
    prompt = torch.randint(1, 200, (1, 9), generator=torch.Generator().manual_seed(1))
    source = kvcache.make_roomy(DynamicCache(config=model.config), room=8)
    _step(model, source, prompt, 0)
    kept = [kvcache.state(layer) for layer in source.layers]
    snapshot = [s["keys"].clone() for s in kept]
    # Two caches made from the kept state (as a shared prompt prefix is reused), each decoding
    # its own token, and the source going on too: none writes into another's tensors.
    copies = []
    for token in (5, 6):
        cache = kvcache.make_roomy(DynamicCache(config=model.config), room=8)
        for layer, s in zip(cache.layers, kept, strict=True):
            layer.__dict__.update(s)
        _step(model, cache, torch.tensor([[token]]), 9)
        copies.append(cache)
    _step(model, source, torch.tensor([[7]]), 9)
    assert all(torch.equal(s["keys"], before) for s, before in zip(kept, snapshot, strict=True))
    a, b = (c.layers[0].keys[..., -1, :] for c in copies)
    assert not torch.equal(a, b)  # each kept its own last position
