"""The result of a study: its Pareto front and the rule that picks one trial (no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from abfleet.errors import AbfleetError, UserError


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]


def pareto_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials no other trial beats on both refusals and KL, sorted by refusals."""
    front = []
    for t in trials:
        r, k = t.values
        dominated = any(
            (o.values[0] <= r and o.values[1] <= k) and (o.values[0] < r or o.values[1] < k)
            for o in trials
        )
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: (t.values[0], t.values[1], t.number))


@dataclass(frozen=True)
class Choice:
    trial: FrozenTrial
    reason: str
    within_limit: bool


# A trial may loop on a few more answers than the original model does (5% of them): a small
# model's greedy answers loop now and then, and no tolerance passed over the best trials for one
# looping answer in 60 (on the float32 demo, 10 trials then chose 47/60 over 6/60 at KL 0.16).
DEGENERATE_TOLERANCE = 0.05


def choose_trial(
    trials: list[FrozenTrial],
    kl_limit: float,
    trial_number: int | None = None,
    baseline_degenerate: int | None = None,
    rescore: dict[str, Any] | None = None,
) -> Choice:
    """The rule: fewest refusals among trials with KL <= kl_limit, ties by lower KL. A trial
    whose answers degenerate more often than the unmodified model's, by more than
    DEGENERATE_TOLERANCE of the answers, is never chosen: fewer refusals bought with broken
    answers is not a better model. An explicit trial number overrides the rule.

    With a long re-score (core.rescore), the rule runs on the re-scored trials with their long
    figures (refusals and degenerate answers), against the original model's long figures.
    """
    if not trials:
        raise AbfleetError("the study has no completed trial to choose from")
    if trial_number is not None:
        for t in trials:
            if t.number == trial_number:
                return Choice(t, f"trial {trial_number} as asked", t.values[1] <= kl_limit)
        raise UserError(f"trial {trial_number} is not a completed trial of this study")
    entries = (rescore or {}).get("entries") or {}
    long = {t.number: entries[str(t.number)] for t in trials if str(t.number) in entries}
    if long and "baseline" in entries:
        # (refusals, degenerate, answers) per trial: the long figures of the re-scored trials
        figures = {
            n: (float(e["refusals"]), int(e["degenerate"]), int(e.get("n_bad", 0)))
            for n, e in long.items()
        }
        allowed = entries["baseline"]["degenerate"]
        at = f" at {(rescore or {}).get('tokens')} tokens"
    else:
        figures = {
            t.number: (t.values[0], _degenerate(t), int(t.user_attrs.get("n_bad", 0)))
            for t in trials
        }
        allowed, at = baseline_degenerate, ""
    sound = [t for t in trials if t.number in figures]
    if allowed is not None:
        sound = [
            t
            for t in sound
            if figures[t.number][1] <= allowed + int(DEGENERATE_TOLERANCE * figures[t.number][2])
        ]
        if not sound:
            raise UserError(
                f"every trial degenerates more often than the original model "
                f"({allowed} degenerate answers{at}, and {DEGENERATE_TOLERANCE:.0%} of the "
                "answers more allowed): nothing is exported by the rule; look at the front "
                "(`abfleet progress`) and export one with --trial N"
            )
    eligible = [t for t in sound if t.values[1] <= kl_limit]
    if eligible:
        best = min(eligible, key=lambda t: (figures[t.number][0], t.values[1], t.number))
        return Choice(best, f"fewest refusals{at} with KL <= {kl_limit:g}", True)
    best = min(sound, key=lambda t: (t.values[1], t.number))
    return Choice(best, f"no trial has KL <= {kl_limit:g}: lowest KL instead", False)


def _degenerate(t: FrozenTrial) -> int:
    return int(t.user_attrs.get("degenerate", 0))


def trial_row(t: FrozenTrial, rescore: dict[str, Any] | None = None) -> dict[str, Any]:
    """A trial's figures as raw counts, from its user attributes (values as the fallback), with
    its long re-score beside them when there is one."""
    a = t.user_attrs
    row = {
        "trial": t.number,
        "refusals": int(a.get("refusals", t.values[0])),
        "n_bad": int(a.get("n_bad", 0)),
        "kl": float(a.get("kl", t.values[1])),
        "degenerate": int(a.get("degenerate", 0)),
        "seconds": float(a.get("seconds", 0.0)),
        "params": t.params,
    }
    if rescore:
        entry = (rescore.get("entries") or {}).get(str(t.number))
        row.update(long_fields(entry, rescore.get("tokens", 0)))
    return row


def long_fields(entry: dict[str, Any] | None, tokens: int) -> dict[str, Any]:
    """The long figures as they appear beside the short ones in rows and abfleet-run.json."""
    if not entry:
        return {}
    out: dict[str, Any] = {
        "long_tokens": tokens,
        "long_refusals": int(entry["refusals"]),
        "long_degenerate": int(entry["degenerate"]),
    }
    if "judge" in entry:
        out["judge"] = dict(entry["judge"])
    return out
