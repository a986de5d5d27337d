"""Batched, left-padded, greedy generation that drops each answer from the batch once it is decided.

transformers' generate() keeps every row until the whole batch ends. Here a row leaves the batch
(its KV cache rows are dropped) as soon as it emitted an end token or its text matched a stop
marker, so a batch of refusals costs a few steps instead of the full budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

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
    batches = []
    for start in range(0, len(order), max(1, batch_size)):
        rows = order[start : start + batch_size]
        shared = _common_prefix([encoded[i] for i in rows]) if share_prefix and len(rows) > 1 else 0
        if shared < MIN_SHARED_PREFIX:
            shared = 0
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


def prefill(model: Any, batch: Batch) -> tuple[Any, DynamicCache, torch.Tensor]:
    """The prompts' forward pass into a fresh KV cache: (output with the last position's
    logits, the cache, the attention mask over everything cached). A shared prefix runs once
    at batch size 1 and its cache is repeated for every row."""
    cache = DynamicCache(config=model.config)
    mask = batch.attention_mask
    if batch.prefix is not None:
        shared = batch.prefix.shape[1]
        model(
            input_ids=batch.prefix,
            position_ids=torch.arange(shared, device=mask.device)[None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(len(batch.rows))
        mask = torch.cat([mask.new_ones((len(batch.rows), shared)), mask], dim=1)
    out = model(
        input_ids=batch.input_ids,
        attention_mask=mask,
        position_ids=batch.position_ids,
        past_key_values=cache,
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
    text, e.g. a think tag that the tokenizer marks special)."""
    tok = chat.tokenizer
    if encoded is None:
        encoded = encode_prompts(chat, prompts)
    device = model_device(model)
    ends = end_token_ids(model, chat)
    results: list[Generation | None] = [None] * len(encoded)
    for batch in make_batches(encoded, batch_size, pad_token_id(tok), device, share_prefix=True):
        for row, gen in zip(
            batch.rows,
            _generate_batch(model, batch, max_new_tokens, ends, tok, stop, keep_special),
            strict=True,
        ):
            results[row] = gen
    return [r for r in results if r is not None]


def _generate_batch(
    model: Any,
    batch: Batch,
    max_new_tokens: int,
    ends: set[int],
    tok: Any,
    stop: Callable[[str], bool] | None,
    keep_special: bool = False,
) -> list[Generation]:
    n = len(batch.rows)
    tokens: list[list[int]] = [[] for _ in range(n)]
    ended = [False] * n
    stopped = [False] * n
    if max_new_tokens <= 0:
        return [Generation("", 0, False, False) for _ in range(n)]
    out, cache, mask = prefill(model, batch)
    next_pos = batch.position_ids[:, -1:] + 1
    active = list(range(n))  # batch rows still generating, in cache order
    end_tensor = torch.tensor(sorted(ends), device=mask.device) if ends else None
    for step in range(max_new_tokens):
        next_tok = out.logits[:, -1, :].argmax(dim=-1)
        is_end = torch.isin(next_tok, end_tensor) if end_tensor is not None else None
        picked = next_tok.tolist()
        finished = is_end.tolist() if is_end is not None else [False] * len(active)
        keep = []
        for j, row in enumerate(active):
            if finished[j]:
                ended[row] = True
                continue
            tokens[row].append(picked[j])
            if stop is not None and stop(tok.decode(tokens[row], skip_special_tokens=True)):
                stopped[row] = True
                continue
            keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=mask.device)
            cache.reorder_cache(index)
            mask = mask.index_select(0, index)
            next_pos = next_pos.index_select(0, index)
            next_tok = next_tok.index_select(0, index)
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        out = model(
            input_ids=next_tok[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        next_pos = next_pos + 1
    return [
        Generation(
            tok.decode(tokens[i], skip_special_tokens=not keep_special),
            len(tokens[i]),
            ended[i],
            stopped[i],
        )
        for i in range(n)
    ]
