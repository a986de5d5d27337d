"""Batched, left-padded, greedy generation that drops each answer from the batch once it is decided.

transformers' generate() keeps every row until the whole batch ends. Here a row leaves the batch
(its KV cache rows are dropped) as soon as it emitted an end token or its text matched a stop
marker, and waiting prompts take the freed places: a batch of refusals costs a few steps
instead of the full budget, and the next prompts do not wait for the slowest answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from abfleet.core import compat, kvcache, unedited
from abfleet.core.chat import ChatFormatter


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    ended: bool  # emitted an end-of-turn token
    stopped: bool  # the stop check matched before the budget ran out


@dataclass
class Batch:
    """Token ids of some prompts, left padded, with the position of each row's tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rows: list[int]  # index of each row in the caller's prompt list
    # Tokens every row starts with (chat template, system prompt), run once and shared through
    # the KV cache; input_ids then hold only what follows, its positions counted after them.
    prefix: torch.Tensor | None = None


def model_device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def encode_prompts(chat: ChatFormatter, prompts: Sequence[str]) -> list[list[int]]:
    tok = chat.tokenizer
    return [tok(chat.format(p), add_special_tokens=False)["input_ids"] for p in prompts]


# A shared prefix shorter than this is not worth a second forward call.
MIN_SHARED_PREFIX = 8


def make_batches(
    encoded: Sequence[list[int]],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    share_prefix: bool = False,
) -> list[Batch]:
    """Group prompts of similar length (less padding), left pad, and derive position ids.

    share_prefix: the tokens all rows of a batch start with become the batch's prefix, to be
    computed once (see prefill); every row keeps at least one token of its own."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    # The prefix all prompts share (not each batch's own), so that every batch starts with the
    # same one and its cache can be computed once for them all (see prefill).
    common = _common_prefix(list(encoded)) if share_prefix and len(encoded) > 1 else 0
    batches = []
    for start in range(0, len(order), max(1, batch_size)):
        rows = order[start : start + batch_size]
        shared = common if len(rows) > 1 and common >= MIN_SHARED_PREFIX else 0
        width = max(len(encoded[i]) for i in rows) - shared
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            seq = encoded[i][shared:]
            ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[r, width - len(seq) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0) + shared
        prefix = torch.tensor([encoded[rows[0]][:shared]], device=device) if shared else None
        batches.append(Batch(ids.to(device), mask.to(device), pos.to(device), rows, prefix))
    return batches


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix all sequences share, leaving each at least one token."""
    limit = min(len(s) for s in seqs) - 1
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def prefill(model: Any, batch: Batch, room: int = 0) -> tuple[Any, DynamicCache, torch.Tensor]:
    """The prompts' forward pass into a fresh KV cache: (output with the last position's
    logits, the cache, the attention mask over everything cached). A shared prefix runs once
    at batch size 1 and its cache is repeated for every row. room: positions the cache keeps
    free after the prompts, for the tokens to be decoded (see kvcache)."""
    cache = DynamicCache(config=model.config)
    mask = batch.attention_mask
    # The same prompts give the same key in every trial, so the layers below the trial's first
    # edited one can be skipped (see unedited.py).
    prefix = tuple(batch.prefix[0].tolist()) if batch.prefix is not None else ()
    rows = (prefix, tuple(map(tuple, batch.input_ids.tolist())), tuple(batch.rows))
    if batch.prefix is not None:
        shared = batch.prefix.shape[1]
        store = unedited.for_model(model)
        kept = store.prefix_cache(prefix, model.config) if store is not None else None
        if kept is not None:
            cache = kept
        else:
            with unedited.prefill_call(model, ("prefix", prefix)):
                model(
                    input_ids=batch.prefix,
                    position_ids=torch.arange(shared, device=mask.device)[None],
                    **compat.model_cache_kwargs(model, cache),
                    use_cache=True,
                    logits_to_keep=1,
                )
            if store is not None:
                store.keep_prefix(prefix, cache)
        cache.batch_repeat_interleave(len(batch.rows))
        mask = torch.cat([mask.new_ones((len(batch.rows), shared)), mask], dim=1)
    if room:
        kvcache.make_roomy(cache, room)
    with unedited.prefill_call(model, ("rows", rows)):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=batch.position_ids,
            **compat.model_cache_kwargs(model, cache),
            use_cache=True,
            logits_to_keep=1,
        )
    return out, cache, mask


def forward(model: Any, batch: Batch, hidden_states: bool = False) -> Any:
    """One forward pass of a left-padded batch without a cache: the last position's logits
    (and every layer's hidden states when asked)."""
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        output_hidden_states=hidden_states,
        use_cache=False,
        logits_to_keep=1,
    )


@torch.inference_mode()
def next_token_logprobs(
    model: Any, chat: ChatFormatter, encoded: Sequence[list[int]], batch_size: int
) -> torch.Tensor:
    """Log-probs of the first answer token for each encoded prompt, in the prompts' order."""
    import torch.nn.functional as F

    rows: list[torch.Tensor | None] = [None] * len(encoded)
    pad = pad_token_id(chat.tokenizer)
    for batch in make_batches(encoded, batch_size, pad, model_device(model), share_prefix=True):
        logits = prefill(model, batch)[0].logits[:, -1, :].float()
        for r, i in enumerate(batch.rows):
            rows[i] = F.log_softmax(logits[r], dim=-1)
    return torch.stack([r for r in rows if r is not None])


def pad_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def end_token_ids(model: Any, chat: ChatFormatter) -> set[int]:
    """Every token that ends an answer: EOS from the configs and the template's turn end."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, chat.tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos if e is not None)
    turn_end = chat.turn_end_text()
    if turn_end:
        tok_ids = chat.tokenizer(turn_end, add_special_tokens=False)["input_ids"]
        if len(tok_ids) == 1:
            ids.add(int(tok_ids[0]))
    return ids


@torch.inference_mode()
def greedy_generate(
    model: Any,
    chat: ChatFormatter,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    stop: Callable[[str], bool] | None = None,
    encoded: Sequence[list[int]] | None = None,
    keep_special: bool = False,
) -> list[Generation]:
    """Greedy answers for prompts, in prompt order (keep_special: special tokens stay in the
    text, e.g. a think tag that the tokenizer marks special).

    At most batch_size rows decode together. Prompts are prefilled in groups of half
    that, and a group joins the running rows as soon as enough of them have left: a decode
    step costs nearly as much for a few rows as for a full batch, so steps are what to save.
    A cache that cannot be joined (sliding-window layers) decodes one full batch after another."""
    tok = chat.tokenizer
    if encoded is None:
        encoded = encode_prompts(chat, prompts)
    state = _Decoding(tok, stop, keep_special, max_new_tokens, len(encoded))
    if max_new_tokens <= 0:
        return state.results()
    device = model_device(model)
    joinable = _joinable(model)
    group = max(1, batch_size // JOIN_GROUPS) if joinable else max(1, batch_size)
    pending = make_batches(encoded, group, pad_token_id(tok), device, share_prefix=True)
    ends = end_token_ids(model, chat)
    end_tensor = torch.tensor(sorted(ends), device=device) if ends else None
    running: _Running | None = None
    while pending or running is not None:
        while pending and (
            running is None or (joinable and len(running.rows) + len(pending[0].rows) <= batch_size)
        ):
            batch = pending.pop(0)
            out, cache, mask = prefill(model, batch, room=max_new_tokens)
            fresh = _Running(cache, mask, batch.position_ids[:, -1:] + 1, batch.rows)
            kept = state.take(fresh, out.logits[:, -1, :].argmax(dim=-1), end_tensor)
            running = kept if running is None else running.join(kept)
        if running is None:
            continue
        ones = running.mask.new_ones((len(running.rows), 1))
        running.mask = torch.cat([running.mask, ones], dim=1)
        out = model(
            input_ids=running.next_tok[:, None],
            attention_mask=running.mask,
            position_ids=running.next_pos,
            **compat.model_cache_kwargs(model, running.cache),
            use_cache=True,
        )
        running.next_pos = running.next_pos + 1
        running = state.take(running, out.logits[:, -1, :].argmax(dim=-1), end_tensor)
    return state.results()


# Prompts are prefilled in groups of batch_size // JOIN_GROUPS rows (see greedy_generate): on the
# demo, halves decoded fastest (a quarter: more prefill calls; one group: no joining).
JOIN_GROUPS = 2


def _joinable(model: Any) -> bool:
    """Whether two caches of this model can be joined by left-padding the shorter one: every
    layer a plain growing cache (a sliding window keeps its own bookkeeping)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def _left_pad(t: torch.Tensor, length: int, axis: int) -> torch.Tensor:
    """Zeros before the sequence axis (-2 of a cache tensor, -1 of a mask) up to length."""
    missing = length - t.shape[axis]
    if missing <= 0:
        return t
    pad = [0, 0] * (-axis - 1) + [missing, 0]
    return torch.nn.functional.pad(t, pad)


@dataclass
class _Running:
    """Rows decoding together: their KV cache, attention mask, next positions and tokens."""

    cache: DynamicCache
    mask: torch.Tensor
    next_pos: torch.Tensor
    rows: list[int]  # the prompt of each cache row
    next_tok: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def keep(self, kept: list[int]) -> _Running | None:
        if not kept:
            return None
        if len(kept) < len(self.rows):
            index = torch.tensor(kept, device=self.mask.device)
            self.cache.reorder_cache(index)
            self.mask = self.mask.index_select(0, index)
            self.next_pos = self.next_pos.index_select(0, index)
            self.next_tok = self.next_tok.index_select(0, index)
            self.rows = [self.rows[j] for j in kept]
        return self

    def join(self, other: _Running | None) -> _Running:
        """Append other's rows; the shorter cache is left-padded (masked out) to the longer."""
        if other is None:
            return self
        length = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            if not (mine.is_initialized and theirs.is_initialized):
                continue
            for name in ("keys", "values"):
                parts = [_left_pad(getattr(c, name), length, -2) for c in (mine, theirs)]
                setattr(mine, name, torch.cat(parts))
        masks = [_left_pad(m, length, -1) for m in (self.mask, other.mask)]
        self.mask = torch.cat(masks)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.next_tok = torch.cat([self.next_tok, other.next_tok])
        self.rows = self.rows + other.rows
        return self


class _Decoding:
    """Each prompt's tokens and outcome, and which rows go on after a step."""

    def __init__(
        self,
        tok: Any,
        stop: Callable[[str], bool] | None,
        keep_special: bool,
        max_new_tokens: int,
        n: int,
    ) -> None:
        self.tok, self.stop, self.keep_special = tok, stop, keep_special
        self.max_new_tokens = max_new_tokens
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.ended = [False] * n
        self.stopped = [False] * n

    def take(
        self, running: _Running, picked: torch.Tensor, end_tensor: torch.Tensor | None
    ) -> _Running | None:
        """Record each row's picked token; the rows that go on stay, in order."""
        finished = torch.isin(picked, end_tensor).tolist() if end_tensor is not None else None
        values = picked.tolist()
        kept = []
        for j, row in enumerate(running.rows):
            if finished is not None and finished[j]:
                self.ended[row] = True
                continue
            self.tokens[row].append(values[j])
            if self.stop is not None and self.stop(
                self.tok.decode(self.tokens[row], skip_special_tokens=True)
            ):
                self.stopped[row] = True
                continue
            if len(self.tokens[row]) < self.max_new_tokens:
                kept.append(j)
        running.next_tok = picked
        return running.keep(kept)

    def results(self) -> list[Generation]:
        return [
            Generation(
                self.tok.decode(tokens, skip_special_tokens=not self.keep_special),
                len(tokens),
                self.ended[i],
                self.stopped[i],
            )
            for i, tokens in enumerate(self.tokens)
        ]
