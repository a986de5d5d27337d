"""What the edit costs in capability: lm-evaluation-harness tasks, on the original and the export.

Each task runs on its own, capped at `limit` examples, so that one task that cannot load (no
network on the box, a gated dataset, a name lm-eval does not know) costs a warning, not the
others, and never the export. A task's headline metric is the first one lm-eval reports for it
(acc for multiple choice, exact_match for generation, ...).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# lm-eval reports "metric,filter" keys beside stderr ones; acc_norm is the less noisy choice
# metric where a task has it.
PREFERRED = ("acc_norm", "acc", "exact_match", "f1", "mc2", "bleu")


@dataclass
class Measured:
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> metric, value, n
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def measure(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int,
    include: Path | None = None,
    batch_size: int = 8,
    skip: set[str] | None = None,
) -> Measured:
    """Run each task on the loaded model; `skip`: tasks already known not to load."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    started = time.monotonic()
    out = Measured()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(include) if include else None)
    for task in tasks:
        if skip and task in skip:
            continue
        try:
            # A task folder's data_files are relative paths: lm-eval opens them from the cwd.
            with contextlib.chdir(include) if include else contextlib.nullcontext():
                result = simple_evaluate(
                    model=lm,
                    tasks=[task],
                    limit=limit,
                    task_manager=manager,
                    log_samples=False,
                    bootstrap_iters=0,
                    random_seed=0,
                    numpy_random_seed=0,
                    torch_random_seed=0,
                )
            if result is None or task not in result.get("results", {}):
                raise ValueError("lm-eval returned no result for it")
            metric, value = headline(result["results"][task])
            n = (result.get("n-samples") or {}).get(task, {}).get("effective")
            out.scores[task] = {"metric": metric, "value": value, "n": n}
        except Exception as exc:  # noqa: BLE001 - a task is informational, never the run
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("benchmark %s could not run: %s", task, why)
            out.warnings.append(f"benchmark {task} could not run ({why[:200]}): no figure for it")
    out.seconds = time.monotonic() - started
    return out


def headline(results: dict[str, Any]) -> tuple[str, float]:
    """The task's main metric and its value, from lm-eval's "metric,filter" keys."""
    values = {
        key.split(",")[0]: float(v)
        for key, v in results.items()
        if "," in key and "_stderr" not in key and isinstance(v, (int, float))
    }
    if not values:
        raise ValueError(f"no numeric metric in {sorted(results)}")
    name = next((m for m in PREFERRED if m in values), sorted(values)[0])
    return name, values[name]


def compare(before: Measured, after: Measured) -> dict[str, dict[str, Any]]:
    """Per task: metric, before, after, difference (after - before), examples used."""
    table = {}
    for task, b in before.scores.items():
        a = after.scores.get(task)
        if a is None:
            continue
        table[task] = {
            "metric": b["metric"],
            "before": b["value"],
            "after": a["value"],
            "diff": a["value"] - b["value"],
            "n": a["n"] if a["n"] is not None else b["n"],
        }
    return table


def lines(table: dict[str, dict[str, Any]]) -> list[str]:
    """One line per task, for summaries and the card."""
    return [
        f"{task}: {row['metric']} {row['before']:.3f} -> {row['after']:.3f} "
        f"({row['diff']:+.3f}, {row['n']} examples)"
        for task, row in table.items()
    ]
