"""Find a batch size by doubling until memory runs out or throughput stops improving."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from abfleet.core.chat import ChatFormatter
from abfleet.core.generate import encode_prompts, greedy_generate

log = logging.getLogger(__name__)

PROBE_TOKENS = 8
MIN_GAIN = 1.05  # a doubling must bring 5% more tokens per second to be worth its memory


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def find_batch_size(model: Any, chat: ChatFormatter, prompts: Sequence[str], limit: int) -> int:
    """Largest useful batch up to limit (and never above the number of prompts)."""
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
    return best_size
