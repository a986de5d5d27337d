"""Decoder layers below a trial's first edited layer, computed once per prompt batch.

Every trial runs the same prompts (the KL prompts, the held-out harmful prompts) through the
model. A trial edits layers from some depth on (its kernel's reach); below that depth, the
model is the base model, so those layers produce the same numbers in every trial. The first
time a batch's prefill reaches a layer that is unedited, that layer's KV-cache entries and
its output are kept; a later trial puts the kept KV entries of the layers below its first edit
into its cache and hands the kept output to the first layer it must run.
The skipped layers' results are the very tensors the layers computed for the same batch, so
the logits are bit-identical to running them.

Only prefills are keyed (see generate.prefill): decode steps run every layer. The store is
capped (`max_bytes`, kept in host memory); what does not fit is simply computed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from abfleet.core import compat, kvcache

# Host memory the store may use. A 72B prefill of 60 prompts keeps about 25 MB of KV entries
# and 100 MB of hidden states per layer, so this covers its first layers; what does not fit
# is computed as usual.
MAX_BYTES = 1 << 30

# One store per model, owned by the model's one editor (an Ablator). Weakly keyed, so a copied
# or freed model carries nothing along.
_STORES: weakref.WeakKeyDictionary[Any, UneditedLayers] = weakref.WeakKeyDictionary()


@dataclass
class _Entry:
    depth: int = 0  # layers [0, depth) have their KV entries kept
    kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    outputs: dict[int, Any] = field(default_factory=dict)  # layer i's output (input of i+1)


class UneditedLayers:
    """What the layers below `first_edited` computed for each prefill seen (by key)."""

    def __init__(self, layers: Any, max_bytes: int = MAX_BYTES) -> None:
        self.layers = list(layers)
        self.max_bytes = max_bytes
        self.first_edited = len(self.layers)  # nothing is edited yet
        # Why the reuse cannot engage with this model and transformers version (None: it can).
        self.unsupported = compat.layer_reuse_unsupported(self.layers)
        self.enabled = self.unsupported is None
        self._cache_keywords = [compat.cache_keyword(layer) or "" for layer in self.layers]
        self.bytes = 0
        self.skipped = 0  # layer calls skipped, for tests and benchmarks
        self._entries: dict[Hashable, _Entry] = {}
        # The shared prompt prefix's cache of the current edits, one per distinct prefix: every
        # batch of a trial (the KL prompts and each generation group) starts with it.
        self._prefixes: dict[Hashable, list[dict[str, Any]]] = {}

    def edited_from(self, layer: int) -> None:
        """New edits (a trial applied, or reset): they start at this layer."""
        self.first_edited = layer
        self._prefixes.clear()

    def forget(self) -> None:
        self._entries.clear()
        self._prefixes.clear()
        self.bytes = 0

    def prefix_cache(self, key: Hashable, config: Any) -> DynamicCache | None:
        """A fresh cache holding the prefix key as the current edits computed it, if they did."""
        layers = self._prefixes.get(key) if self.enabled else None
        if layers is None:
            return None
        cache = DynamicCache(config=config)
        for layer, state in zip(cache.layers, layers, strict=True):
            layer.__dict__.update(state)  # tensors are shared: the cache replaces, never writes
        return cache

    def keep_prefix(self, key: Hashable, cache: DynamicCache) -> None:
        if self.enabled:
            # Without a growing layer's buffers: a cache made from this state gets its own.
            self._prefixes[key] = [kvcache.state(layer) for layer in cache.layers]

    @contextlib.contextmanager
    def call(self, key: Hashable) -> Iterator[None]:
        """One prefill of the batch named key (the same key: the same input and cache state).
        The layers' forwards are wrapped only for this call, so nothing stays on the model."""
        if not self.enabled:
            yield
            return
        entry = self._entries.setdefault(key, _Entry())
        limit = min(self.first_edited, entry.depth)
        start = max((i + 1 for i in entry.outputs if i + 1 <= limit), default=0)
        handoff: list[Any] = []  # the kept output, copied to the device once per call
        saved = [layer.__dict__.get("forward") for layer in self.layers]  # accelerate's, if any
        for index, layer in enumerate(self.layers):
            layer.forward = self._wrapped(index, layer.forward, entry, start, handoff)
        try:
            yield
        finally:
            for layer, own in zip(self.layers, saved, strict=True):
                if own is None:
                    del layer.forward
                else:
                    layer.forward = own

    def _wrapped(
        self, index: int, original: Any, entry: _Entry, start: int, handoff: list[Any]
    ) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            cache = compat.layer_cache(kwargs, self._cache_keywords[index])
            if index < start:
                device = _device(self.layers[index])
                for k, v in entry.kv[index]:
                    cache.update(k.to(device), v.to(device), index)
                self.skipped += 1
                if not handoff:
                    handoff.append(_copy(entry.outputs[start - 1], device))
                return handoff[0]  # only the last skipped layer's return value is used
            if index >= self.first_edited or index != entry.depth or cache is None:
                return original(*args, **kwargs)
            return self._record(index, entry, cache, original, args, kwargs)

        return forward

    def _record(
        self, index: int, entry: _Entry, cache: Any, original: Any, args: Any, kwargs: Any
    ) -> Any:
        """Run an unedited layer, keeping its KV entries and its output."""
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        update = cache.update

        def spy(k: torch.Tensor, v: torch.Tensor, layer_idx: int, *rest: Any, **kw: Any) -> Any:
            if layer_idx == index:
                seen.append((k.detach().to("cpu", copy=True), v.detach().to("cpu", copy=True)))
            return update(k, v, layer_idx, *rest, **kw)

        cache.update = spy
        try:
            out = original(*args, **kwargs)
        finally:
            del cache.update
        size = sum(_nbytes(t) for pair in seen for t in pair) + _nbytes(out)
        if self.bytes + size <= self.max_bytes:
            entry.kv[index] = seen
            entry.outputs[index] = _copy(out, torch.device("cpu"))
            entry.depth = index + 1
            self.bytes += size
        return out


def attach(model: Any, layers: Any) -> UneditedLayers | None:
    """The store for the model's one editor. A second editor of the same model switches the
    first one's store off (which edits are live is then unknown) and gets none."""
    found = _STORES.get(model)
    if found is not None:
        found.enabled = False
        found.forget()
        return None
    store = _STORES[model] = UneditedLayers(layers)
    return store


def release(model: Any, store: UneditedLayers | None) -> None:
    """The editor is done: its store goes (a store switched off stays, so it stays off)."""
    if store is not None and _STORES.get(model) is store and store.enabled:
        del _STORES[model]
    if store is not None:
        store.forget()


def for_model(model: Any) -> UneditedLayers | None:
    return _STORES.get(model)


def prefill_call(model: Any, key: Hashable) -> contextlib.AbstractContextManager[None]:
    """The context a prefill's model call runs in: skipping the kept layers, if any."""
    found = _STORES.get(model)
    return found.call(key) if found is not None else contextlib.nullcontext()


def _device(layer: Any) -> torch.device:
    return next(layer.parameters()).device


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _copy(obj: Any, device: torch.device) -> Any:
    """A private copy of a layer's output (a tensor, or a tuple holding tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, tuple):
        return tuple(_copy(o, device) for o in obj)
    return obj
