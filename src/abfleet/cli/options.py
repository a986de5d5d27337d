"""Flags shared by commands that take a job (run, launch, submit, resume)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def _comma_list(_ctx: Any, _param: Any, value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def job_flags(func: Callable[..., Any]) -> Callable[..., Any]:
    flags = [
        click.option("--model", help="HF directory, .gguf file, hub id, or demo:smollm2-refusal."),
        click.option("--trials", type=int, help="Total trials in the study (resumes up to this)."),
        click.option("--seed", type=int, help="Sampler seed."),
        click.option(
            "--storage",
            help="Study storage: a SQLAlchemy URL, `env` (the URL is in ABFLEET_STORAGE_URL) or, "
            "for launch, `head` (Postgres on the first box). Default: SQLite in the run folder.",
        ),
        click.option("--study", help="Study name (default: the job's name)."),
        click.option("--output", help="Run folder (default: runs/<job name>)."),
        click.option("--system-prompt", help="System prompt for every prompt."),
        click.option(
            "--batch-size", type=int, help="Fixed batch size (default: found by doubling)."
        ),
        click.option(
            "--dtype", callback=_comma_list, help="dtypes to try in order, e.g. bfloat16,float32."
        ),
        click.option(
            "--quantization",
            type=click.Choice(("none", "bnb-8bit", "bnb-4bit")),
            help="Hold the base weights in 8 or 4 bits during the search (export: full precision).",
        ),
        click.option("--max-new-tokens", type=int, help="Generation cap for the marker check."),
        click.option(
            "--long-tokens",
            type=int,
            help="Answer length of the Pareto front's re-score before the choice (0: none).",
        ),
        click.option(
            "--rescore",
            type=click.Choice(("needed", "front")),
            help="Re-score only the front trials that can still be chosen (default), or all.",
        ),
        click.option("--judge", help="Judge model (directory or hub id) for the long answers."),
        click.option(
            "--benchmark",
            callback=_comma_list,
            help="lm-eval tasks (e.g. gsm8k,mmlu,hellaswag) run on the original and the export: "
            "what the edit costs in capability.",
        ),
        click.option(
            "--benchmark-limit", type=int, help="Examples per benchmark task (default 100)."
        ),
        click.option(
            "--benchmark-tasks", help="A folder of your own lm-eval task YAMLs for --benchmark."
        ),
        click.option(
            "--norm-preserving/--no-norm-preserving",
            default=None,
            help="Norm-preserving (biprojected) ablation: each row keeps its length.",
        ),
        click.option("--startup-trials", type=int, help="Random trials before TPE (default 30%)."),
        click.option(
            "--kl-limit", type=float, help="Choice rule: fewest refusals with KL <= this."
        ),
        click.option("--trial", type=int, help="Export this trial instead of the rule's choice."),
        click.option(
            "--push-to-hub",
            metavar="OWNER/NAME",
            help="Push the verified export to this Hub repository when the run ends (HF_TOKEN "
            "from the environment).",
        ),
        click.option(
            "--push-private/--push-public",
            default=None,
            help="With --push-to-hub: create the repository private (default: public).",
        ),
    ]
    for flag in reversed(flags):
        func = flag(func)
    return func


JOB_FLAG_NAMES = (
    "model",
    "trials",
    "seed",
    "storage",
    "study",
    "output",
    "system_prompt",
    "batch_size",
    "dtype",
    "quantization",
    "max_new_tokens",
    "long_tokens",
    "rescore",
    "judge",
    "benchmark",
    "benchmark_limit",
    "benchmark_tasks",
    "norm_preserving",
    "startup_trials",
    "kl_limit",
    "trial",
    "push_to_hub",
    "push_private",
)


def pop_job_flags(kwargs: dict[str, Any]) -> dict[str, Any]:
    from abfleet.console import warn
    from abfleet.job.storage import has_password

    flags = {name: kwargs.pop(name) for name in JOB_FLAG_NAMES if name in kwargs}
    if flags.get("storage") and has_password(flags["storage"]):
        warn(
            "the --storage URL carries a password, which other users of this machine can read in "
            "its process list: prefer `--storage env` with ABFLEET_STORAGE_URL, or PGPASSWORD"
        )
    return flags
