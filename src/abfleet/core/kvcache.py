"""A KV cache layer that grows in place: each decode step writes its position into room kept
after the cached ones, instead of copying the whole cache.

transformers' DynamicLayer appends with torch.cat, so every decode step copies every layer's
keys and values; on a CPU that copy was 15% of a trial's generation when answers run their
whole budget (`trial_speed.py --profile --few-refusals --ops`). Here keys and values are views
into a buffer with room for the answer's tokens. Whatever replaces them with a tensor of its
own (dropping or joining rows, repeating a shared prefix, a kept cache's state) simply gives
the layer a new buffer at its next update, so sharing a cache's state never lets two caches
write into one buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

ROOM_ATTRS = ("_room_keys", "_room_values")


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose tensors are views into buffers with `room` positions to spare."""

    room = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        have = self.keys.shape[-2] if self.keys.numel() else 0
        need = have + key_states.shape[-2]
        keys = self.__dict__.get("_room_keys")
        if not (_views(self.keys, keys) and keys.shape[-2] >= need):
            self._room_keys = _grown(self.keys, key_states, have, need + self.room)
            self._room_values = _grown(self.values, value_states, have, need + self.room)
        self._room_keys[..., have:need, :] = key_states
        self._room_values[..., have:need, :] = value_states
        self.keys = self._room_keys[..., :need, :]
        self.values = self._room_values[..., :need, :]
        return self.keys, self.values


def _views(tensor: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    """Whether tensor is the leading part of buffer (the layer's own, never a replaced one)."""
    return (
        buffer is not None
        and tensor.numel() > 0
        and tensor.data_ptr() == buffer.data_ptr()
        and tensor.shape[:-2] == buffer.shape[:-2]
        and tensor.stride() == buffer.stride()
    )


def _grown(old: torch.Tensor, new: torch.Tensor, have: int, capacity: int) -> torch.Tensor:
    buffer = new.new_empty((*new.shape[:-2], capacity, new.shape[-1]))
    if have:
        buffer[..., :have, :] = old
    return buffer


def make_roomy(cache: Any, room: int) -> Any:
    """Give every plain growing layer of cache `room` positions to grow in place (other kinds,
    such as sliding windows, keep their own bookkeeping)."""
    for layer in cache.layers:
        if type(layer) is DynamicLayer or type(layer) is RoomyLayer:
            layer.__class__ = RoomyLayer
            layer.room = room
    return cache


def state(layer: Any) -> dict[str, Any]:
    """A layer's state to keep and share (see unedited.keep_prefix), without its buffers."""
    return {k: v for k, v in layer.__dict__.items() if k not in ROOM_ATTRS}
