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
    reason: str  # the true reason: why this trial and not a better-looking one
    within_limit: bool
    warning: str = ""  # what the user must know before using the model ("" when nothing)


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
    """The rule: fewest refusals among sound trials with KL <= kl_limit, ties by lower KL. A
    trial is sound when its answers degenerate no more often than the unmodified model's plus
    DEGENERATE_TOLERANCE of the answers: fewer refusals bought with broken answers is not a
    better model. Without a sound trial in the limit, the sound trial with the lowest KL; without
    any sound trial, the one that degenerates least, with a warning. A paid search always ends
    with a model, and the reason says which of these happened. An explicit trial number
    overrides the rule.

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
    scored = [t for t in trials if t.number in figures]

    def excess(t: FrozenTrial) -> int:
        """Degenerate answers beyond what the original model plus the tolerance gives."""
        if allowed is None:
            return 0
        _, degenerate, answers = figures[t.number]
        return max(0, degenerate - allowed - int(DEGENERATE_TOLERANCE * answers))

    sound = [t for t in scored if excess(t) == 0]
    in_limit = [t for t in scored if t.values[1] <= kl_limit]
    eligible = [t for t in sound if t.values[1] <= kl_limit]
    if eligible:
        best = min(eligible, key=lambda t: (figures[t.number][0], t.values[1], t.number))
        return Choice(best, f"fewest refusals{at} with KL <= {kl_limit:g}", True)
    tolerance = f"{allowed} as the original model{at}, +{DEGENERATE_TOLERANCE:.0%} of the answers"
    if sound:
        best = min(sound, key=lambda t: (t.values[1], t.number))
        if in_limit:
            reason = (
                f"the {len(in_limit)} trial(s) with KL <= {kl_limit:g} degenerate more often "
                f"than allowed ({tolerance}): the sound trial with the lowest KL instead"
            )
        else:
            reason = f"no trial has KL <= {kl_limit:g}: lowest KL instead"
        return Choice(best, reason, False)
    best = min(scored, key=lambda t: (excess(t), figures[t.number][0], t.values[1], t.number))
    _, degenerate, answers = figures[best.number]
    return Choice(
        best,
        f"every trial degenerates more often than allowed ({tolerance}): the one that "
        "degenerates least instead",
        best.values[1] <= kl_limit,
        warning=(
            f"{degenerate} of its {answers} answers{at} loop or break (the original model's: "
            f"{allowed}): read its samples in report.html before using it, or export another "
            "trial with --trial N"
        ),
    )


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
