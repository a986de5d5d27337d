"""Re-score the Pareto front with long answers before the choice.

The search screens refusals with short answers (30 new tokens by default) to keep trials cheap,
but a long answer often starts to comply and then refuses. So the front (and the unmodified
model, for the "before" figures) is scored again on the held-out bad prompts with long answers,
optionally classified by a judge model, and the choice uses those figures.

The figures live in the study (user attribute ``rescore``), keyed by trial number, so a resumed
or re-run export reuses them; they are recomputed when the answer length or the judge changes.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from abfleet.core.evaluate import Evaluator
from abfleet.core.judge import Judge, count_verdicts

log = logging.getLogger(__name__)

ATTR = "rescore"
BASELINE = "baseline"
N_SAMPLES = 3


def stored(study: Any, tokens: int, judge: str) -> dict[str, Any]:
    """The study's re-score for this answer length and judge (empty when there is none yet)."""
    data = study.user_attrs.get(ATTR)
    if isinstance(data, dict) and data.get("tokens") == tokens and data.get("judge") == judge:
        return data
    return {"tokens": tokens, "judge": judge, "entries": {}}


def long_answers(evaluator: Any, tokens: int, judge: str) -> tuple[list[str], tuple[int, int]]:
    """The held-out bad prompts answered at the re-score's length, and (refusals, degenerate).
    With a judge the answers are not cut at a marker: the judge reads them whole."""
    texts = evaluator.answers(tokens, stop_at_markers=not judge)
    return texts, evaluator.count(texts)


def rescore_front(
    study: Any,
    front: list[Any],
    evaluator: Evaluator,
    apply_trial: Callable[[Any | None], None],
    tokens: int,
    kl_limit: float,
    whole_front: bool = False,
    asked: Any | None = None,
    judge: str = "",
    load_judge: Callable[[], Judge] | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Long figures for the baseline and the front trials; returns the study's record.

    front is sorted by short refusals. A greedy answer with a larger cap extends the shorter
    one, so a trial's long refusals are not fewer than its short ones: once the best sound long
    count so far is below the next trial's short count, no later trial can be chosen, and
    (unless whole_front) the re-score stops there. A trial asked for by number (asked) is always scored.

    apply_trial(None) restores the unmodified model, apply_trial(trial) ablates with a trial's
    parameters. Without a judge, generation stops at a marker (the verdict is decided there); a
    judge reads whole answers.
    """
    data = stored(study, tokens, judge)
    entries: dict[str, Any] = data["entries"]
    pending: dict[str, tuple[dict[str, Any], list[str]]] = {}

    def score(key: str, trial: Any) -> dict[str, Any]:
        if key in entries:
            return entries[key]
        if key in pending:
            return pending[key][0]
        label = "original model" if trial is None else f"trial {key}"
        progress(f"{label} ({len(entries) + len(pending)} scored)")
        started = time.perf_counter()
        apply_trial(trial)
        texts, (refusals, degenerate) = long_answers(evaluator, tokens, judge)
        entry = {
            "refusals": refusals,
            "n_bad": len(texts),
            "degenerate": degenerate,
            "seconds": round(time.perf_counter() - started, 2),
            "samples": [[evaluator.bad[j], texts[j]] for j in range(min(N_SAMPLES, len(texts)))],
        }
        log.info(
            "%s at %d tokens: refusals %d/%d, degenerate %d (%.1f s)",
            label,
            tokens,
            refusals,
            len(texts),
            degenerate,
            entry["seconds"],
        )
        if judge:
            pending[key] = (entry, texts)
        else:
            entries[key] = entry
            study.set_user_attr(ATTR, data)  # kept at once: an interrupted export resumes here
        return entry

    allowed = score(BASELINE, None)["degenerate"]
    within = [t for t in front if t.values[1] <= kl_limit]
    best: float | None = None
    for trial in within:
        if best is not None and trial.values[0] > best and not whole_front:
            break
        entry = score(str(trial.number), trial)
        if entry["degenerate"] <= allowed:
            best = entry["refusals"] if best is None else min(best, entry["refusals"])
    if best is None or whole_front:
        # Nothing sound within the limit: the rule falls back to the lowest KL, so score in
        # KL order until a sound trial is found (all of them for whole_front).
        for trial in sorted(front, key=lambda t: t.values[1]):
            entry = score(str(trial.number), trial)
            if entry["degenerate"] <= allowed and not whole_front:
                break
    if asked is not None:
        score(str(asked.number), asked)
    apply_trial(None)
    if pending:
        if load_judge is None:
            raise ValueError("a judge was named but no way to load it was given")
        progress(f"judging {len(pending)} set(s) of answers with {judge}")
        started = time.perf_counter()
        scorer = load_judge()
        try:
            for key, (entry, texts) in pending.items():
                verdicts = scorer.verdicts(evaluator.bad, texts)
                entry["judge"] = count_verdicts(verdicts)
                entries[key] = entry
                log.info("judge on %s: %s", key, entry["judge"])
        finally:
            del scorer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        data["judge_seconds"] = round(time.perf_counter() - started, 2)
        study.set_user_attr(ATTR, data)
    return data
