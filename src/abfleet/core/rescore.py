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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


# Greedy tokens are not bit-identical across workers, batch shapes and GPUs, so a trial's long
# count can fall below its short one. The pruning keeps scoring while a trial's short count is
# within this margin (a fraction of the answers, at least one) of the best long count so far.
PRUNE_MARGIN = 0.05


def prune_margin(n_answers: int) -> int:
    return max(1, math.ceil(PRUNE_MARGIN * n_answers))


@dataclass
class Rescore:
    """The study's record (`data`) and the long answers the judge has yet to read, by key."""

    data: dict[str, Any]
    unjudged: dict[str, list[str]] = field(default_factory=dict)


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
    progress: Callable[[str], None] = lambda _m: None,
) -> Rescore:
    """Long figures for the baseline and the front trials.

    front is sorted by short refusals. A greedy answer with a larger cap extends the shorter
    one, so a trial's long refusals are rarely fewer than its short ones: once the best sound
    long count so far, plus a margin (prune_margin), is below the next trial's short count, no
    later trial is likely to be chosen, and (unless whole_front) the re-score stops there. A
    trial asked for by number (asked) is always scored.

    apply_trial(None) restores the unmodified model, apply_trial(trial) ablates with a trial's
    parameters. Without a judge, generation stops at a marker (the verdict is decided there); a
    judge reads whole answers, later (judge_answers), once the search model is released.
    """
    data = stored(study, tokens, judge)
    entries: dict[str, Any] = data["entries"]
    out = Rescore(data)

    def score(key: str, trial: Any) -> dict[str, Any]:
        entry = entries.get(key)
        # A judged study reuses an entry once the judge has read it (or failed to): else its
        # answers are generated again for the judge.
        if entry is not None and (not judge or "judge" in entry or data.get("judge_error")):
            return entry
        label = "original model" if trial is None else f"trial {key}"
        progress(f"{label} ({len(entries)} scored)")
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
        entries[key] = entry
        if judge:
            out.unjudged[key] = texts
        study.set_user_attr(ATTR, data)  # kept at once: an interrupted export resumes here
        return entry

    baseline = score(BASELINE, None)
    allowed = baseline["degenerate"]
    margin = prune_margin(int(baseline.get("n_bad", 0)))
    within = [t for t in front if t.values[1] <= kl_limit]
    best: float | None = None
    for trial in within:
        if best is not None and trial.values[0] > best + margin and not whole_front:
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
    return out


def judge_answers(
    study: Any,
    rescore: Rescore,
    prompts: list[str],
    load_judge: Callable[[], Judge],
    progress: Callable[[str], None] = lambda _m: None,
) -> None:
    """The judge's verdicts on the long answers, kept in the study. Called once the search model
    is released, so the two never share the GPU. Raises what loading or judging raised: the
    caller decides that a judge is informational."""
    data = rescore.data
    if not rescore.unjudged:
        return
    progress(f"judging {len(rescore.unjudged)} set(s) of answers with {data.get('judge')}")
    started = time.perf_counter()
    scorer = load_judge()
    try:
        for key, texts in rescore.unjudged.items():
            verdicts = scorer.verdicts(prompts, texts)
            data["entries"][key]["judge"] = count_verdicts(verdicts)
            log.info("judge on %s: %s", key, data["entries"][key]["judge"])
    finally:
        del scorer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rescore.unjudged.clear()
    data.pop("judge_error", None)
    data["judge_seconds"] = round(time.perf_counter() - started, 2)
    study.set_user_attr(ATTR, data)


def judge_failed(study: Any, rescore: Rescore, error: str) -> None:
    """The judge could not give its verdicts: the entries stand on the markers' figures, and the
    study remembers why (a re-export does not generate the answers again for it)."""
    rescore.data["judge_error"] = error
    rescore.unjudged.clear()
    study.set_user_attr(ATTR, rescore.data)
