"""Reasoning models: score the answer, not the think block in front of it.

A model that thinks before it answers starts every answer with the same opening (``<think>``, and
for an empty think block the whole block). Scored as is, the first-token KL compares the think
tag with itself (near zero for any trial) and 30 tokens of thinking contain no refusal marker.
So the baseline answers' common prefix is found once per study; when it opens a think block,
the block (closed, empty, if the model would go on thinking) is appended to every prompt, and the
KL of the first answer token and the markers of the answer itself are scored after it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from abfleet.core.chat import ChatFormatter
from abfleet.core.generate import greedy_generate

log = logging.getLogger(__name__)

# (open, close) tags of the think blocks of current open models.
THINK_TAGS = (
    ("<think>", "</think>"),
    ("<thinking>", "</thinking>"),
    ("<reasoning>", "</reasoning>"),
    ("\u25c1think\u25b7", "\u25c1/think\u25b7"),
)
PROBE_TOKENS = 24
PROBE_PROMPTS = 32


def think_prefix(answers: Sequence[str]) -> str:
    """The think block every answer starts with ("" if they share none). An unclosed block
    (the model goes on thinking) is closed empty, as a template's thinking switch does."""
    if not answers:
        return ""
    common = os.path.commonprefix(list(answers))  # noqa: RUF071 - character prefix wanted
    body = common.lstrip()
    lead = common[: len(common) - len(body)]
    for opening, closing in THINK_TAGS:
        if not body.startswith(opening):
            continue
        end = common.find(closing)
        if end < 0:
            return f"{lead}{opening}\n\n{closing}\n\n"
        stop = end + len(closing)
        # The blank line templates put after the block, not whatever whitespace follows.
        while stop < len(common) and common[stop].isspace() and stop < end + len(closing) + 2:
            stop += 1
        return common[:stop]
    return ""


def find_answer_prefix(
    model: Any, chat: ChatFormatter, prompts: Sequence[str], batch_size: int
) -> str:
    """Greedy baseline answers to some prompts; the think block they share, if any."""
    sample = list(prompts)[:PROBE_PROMPTS]
    saved, chat.answer_prefix = chat.answer_prefix, ""
    rendered = chat.format(sample[0]) if sample else ""
    for opening, closing in THINK_TAGS:
        if rendered.rstrip().endswith(opening):
            # The template opens the think block itself (DeepSeek-R1 style): close it empty.
            chat.answer_prefix = saved
            return ("" if rendered.endswith("\n") else "\n") + f"\n{closing}\n\n"
    try:
        gens = greedy_generate(model, chat, sample, PROBE_TOKENS, batch_size, keep_special=True)
    finally:
        chat.answer_prefix = saved
    prefix = think_prefix([g.text for g in gens])
    if prefix:
        log.info("answers start with a think block: scoring after %r", prefix)
    return prefix
