"""Find a batch size by doubling until memory runs out or throughput stops improving.

The size picked must then run the worst case: the longest prompts, stretched so that the cache
reaches the length the longest answer will need, and the directions pass (every layer's hidden
states); it is halved until it does, so a batch that fits here cannot run out of memory later.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from abfleet.core.chat import ChatFormatter
from abfleet.core.generate import (
    encode_prompts,
    forward,
    greedy_generate,
    make_batches,
    model_device,
    pad_token_id,
)

log = logging.getLogger(__name__)

PROBE_TOKENS = 8
MIN_GAIN = 1.05  # a doubling must bring 5% more tokens per second to be worth its memory


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def find_batch_size(
    model: Any,
    chat: ChatFormatter,
    prompts: Sequence[str],
    limit: int,
    max_new_tokens: int = PROBE_TOKENS,
    worst_prompts: Sequence[str] | None = None,
) -> int:
    """Largest useful batch up to limit (and never above the number of prompts).

    Throughput is measured on prompts as trials see them; the size it picks must then survive
    the worst case (halved until it does): the longest of worst_prompts (default: prompts),
    stretched to the cache length of the longest answer, and the directions pass.
    """
    limit = max(1, min(limit, len(prompts)))
    encoded = encode_prompts(chat, prompts)
    best_size, best_rate = 1, 0.0
    size = 1
    while size <= limit:
        sample = [encoded[i % len(encoded)] for i in range(size)]
        try:
            started = time.perf_counter()
            greedy_generate(model, chat, [""] * size, PROBE_TOKENS, size, encoded=sample)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not _is_oom(exc):
                raise
            log.info("batch size %d ran out of memory", size)
            torch.cuda.empty_cache()
            break
        tokens = sum(len(s) for s in sample) + size * PROBE_TOKENS
        rate = tokens / max(seconds, 1e-9)
        log.info("batch size %d: %.0f tokens/s", size, rate)
        if rate < best_rate * MIN_GAIN:
            break
        best_size, best_rate = size, rate
        if size == limit:
            break
        size = min(size * 2, limit)
    return _fits_worst_case(model, chat, worst_prompts or prompts, best_size, max_new_tokens)


def _fits_worst_case(
    model: Any, chat: ChatFormatter, prompts: Sequence[str], size: int, max_new_tokens: int
) -> int:
    stretch = max(0, max_new_tokens - PROBE_TOKENS)
    longest = sorted(encode_prompts(chat, prompts), key=len, reverse=True)
    longest = [ids + ids[-1:] * stretch for ids in longest]
    while True:
        worst = [longest[i % len(longest)] for i in range(size)]
        try:
            greedy_generate(model, chat, [""] * size, PROBE_TOKENS, size, encoded=worst)
            _hidden_states_pass(model, chat, worst)
            return size
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not _is_oom(exc) or size == 1:
                raise
            log.info("batch size %d runs out of memory on the longest prompts", size)
            torch.cuda.empty_cache()
            size //= 2


@torch.inference_mode()
def _hidden_states_pass(model: Any, chat: ChatFormatter, sample: list[list[int]]) -> None:
    """What the directions need: one forward keeping every layer's hidden states."""
    pad = pad_token_id(chat.tokenizer)
    for batch in make_batches(sample, len(sample), pad, model_device(model)):
        forward(model, batch, hidden_states=True)


@contextlib.contextmanager
def worst_case_edit(ablator: Any) -> Iterator[None]:
    """Every editable site of every layer ablated at the search's largest weight, for the batch
    probe: the edit's own memory (the hooks' float32 temporaries, at the down projection's
    input width when rows keep their norms) is then part of what the probe measures. The
    directions need not be the real ones (they do not exist yet): random unit vectors cost the
    same memory."""
    from abfleet.core.ablation import AblationParams, ComponentParams, hidden_size

    n = ablator.n_layers
    every = ComponentParams(1.5, 0.0, 1.5, float(n))  # full weight from layer 0 to the last
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(n + 1, hidden_size(ablator.model), generator=generator)
    directions /= directions.norm(dim=-1, keepdim=True)
    ablator.apply(AblationParams("per_layer", 0.0, every, every), directions)
    try:
        yield
    finally:
        ablator.reset()
