"""The exported model on the Hugging Face Hub: its model card, and the push.

The card (README.md) is written into the export before its manifest, so the folder that is
checked, downloaded and pushed is one and the same. Its YAML metadata comes from
huggingface_hub's ModelCardData: base_model (when the source is a hub repository), the base
card's license, tags. The push checks the manifest first, then uploads the folder with
`upload_folder`, which huggingface_hub runs as a resumable, multi-commit upload (Xet) when
hf_xet is installed. The token is read from HF_TOKEN by huggingface_hub itself: never an
argument, never logged.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from abfleet.errors import AbfleetError, UserError
from abfleet.job import manifest
from abfleet.render import fmt_judge, fmt_kl, fmt_refusals

log = logging.getLogger(__name__)

CARD = "README.md"
OUTCOME = "push.json"  # in the run folder: the last push's repo, URL or error
TAGS = ["abliterated", "abfleet", "uncensored"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def base_card_metadata(card: Path) -> dict[str, Any]:
    """License fields of the base model's card, when it has one (they carry over)."""
    if not card.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(card, ignore_metadata_errors=True).data.to_dict()
    except (OSError, ValueError) as exc:  # a malformed card must not fail an export
        log.warning("base model card %s not read: %s", card, exc)
        return {}
    return {k: data[k] for k in ("license", "license_name", "license_link") if data.get(k)}


def model_card(record: dict[str, Any], base: dict[str, Any]) -> str:
    """README.md for the export: metadata, what was done, before/after, parameters."""
    from huggingface_hub import ModelCard, ModelCardData

    source = str((record.get("model") or {}).get("source", ""))
    on_hub = bool(_HUB_ID.match(source)) and not Path(source).exists()
    data = ModelCardData(
        base_model=source if on_hub else None,
        tags=TAGS,
        library_name="transformers",
        pipeline_tag="text-generation",
        **base,
    )
    name = source if on_hub else Path(source).name or "the base model"
    versions = record.get("versions") or {}
    chosen = record.get("chosen") or {}
    check = record.get("load_check") or {}
    lines = [
        f"# {name}, abliterated",
        "",
        f"{name} with its refusal direction removed from the weights (abliteration): the "
        "direction that separates harmful from harmless prompts in the residual stream is "
        "projected out of the modules that write to it, with the strength per layer chosen by "
        f"an Optuna search. Made with abfleet {versions.get('abfleet', '?')}.",
        "",
        "## Before and after (held-out prompts)",
        "",
        _before_after(record),
        "",
        "Refusals: answers of the held-out harmful prompts that match a refusal marker. KL: "
        "divergence of the first answer token from the base model on held-out harmless "
        "prompts (how much the rest of the model moved).",
        "",
        *_capability(record),
        *_warnings(record),
        "## How it was made",
        "",
        f"- Study `{(record.get('study') or {}).get('name', '?')}`: "
        f"{(record.get('study') or {}).get('complete', '?')} trials; chosen trial "
        f"{chosen.get('trial', '?')} ({chosen.get('reason', '')}).",
        f"- Export: {check.get('how', '?')}; reloaded and compared with the searched model "
        f"(max KL of the next token {check.get('max_kl', '?')} on {check.get('prompts', '?')} "
        f"prompts){_measured(check)}.",
        f"- Software: torch {versions.get('torch', '?')}, transformers "
        f"{versions.get('transformers', '?')}, optuna {versions.get('optuna', '?')}; device "
        f"{versions.get('device', '?')}.",
        "",
        "## Parameters of the chosen trial",
        "",
        "| parameter | value |",
        "| --- | --- |",
        *[f"| {k} | {_value(v)} |" for k, v in (chosen.get("params") or {}).items()],
        "",
        "`abfleet-run.json` holds the whole record; `report.html` (when present) the charts.",
        "Abliteration removes a behaviour; it does not add knowledge or judgement. Use it within "
        "the base model's license.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").content


def _measured(check: dict[str, Any]) -> str:
    """After a quantized search: which model the figures above describe."""
    measured = check.get("measured")
    if not measured:
        return ""
    if measured == "re-quantized":
        return (
            "; the figures above are of the export re-quantized as searched, not of these weights"
        )
    return f"; the figures above were measured on the {measured} weights"


def _capability(record: dict[str, Any]) -> list[str]:
    benchmarks = record.get("benchmarks") or {}
    if not benchmarks:
        return []
    rows = [
        f"| {task} | {r['metric']} | {r['before']:.3f} | {r['after']:.3f} | {r['diff']:+.3f} | "
        f"{r['n']} |"
        for task, r in benchmarks.items()
    ]
    return [
        "## Capability (lm-evaluation-harness)",
        "",
        "| task | metric | base | abliterated | difference | examples |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Each task on at most the number of examples shown, so a difference of a few points can be "
        "noise; run lm-eval on the full tasks before publishing a claim.",
        "",
    ]


def _warnings(record: dict[str, Any]) -> list[str]:
    warnings = record.get("warnings") or []
    if not warnings:
        return []
    return ["## Warnings", "", *[f"- {w}" for w in warnings], ""]


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _before_after(record: dict[str, Any]) -> str:
    before, after = record.get("before") or {}, record.get("after") or {}
    rows = ["| | refusals | KL | degenerate |", "| --- | --- | --- | --- |"]
    for label, r, kl in (("base", before, "0"), ("abliterated", after, fmt_kl(after.get("kl")))):
        rows.append(
            f"| {label} | {fmt_refusals(r.get('refusals'), r.get('n_bad'))} | {kl} | "
            f"{r.get('degenerate', '-')} |"
        )
    if after.get("judge") or before.get("judge"):
        rows.append(f"\nJudge: before {fmt_judge(before.get('judge'))}, after ")
        rows[-1] += fmt_judge(after.get("judge"))
    return "\n".join(rows)


def write_card(folder: Path, record: dict[str, Any], base_readme: Path | None = None) -> Path:
    """Replace the base model's README.md (copied with the other files) by this model's card,
    carrying the base card's license."""
    base = base_card_metadata(base_readme or folder / CARD)
    target = folder / CARD
    tmp = folder / f".{CARD}.tmp-{os.getpid()}"
    tmp.write_text(model_card(record, base), encoding="utf-8")
    tmp.replace(target)
    return target


def require_token(repo: str) -> None:
    """Fail before anything runs (or is rented) when a push could not happen."""
    if not _HUB_ID.match(repo):
        raise UserError(f"Hub repository {repo!r}: give it as OWNER/NAME")
    if not os.environ.get("HF_TOKEN"):
        raise UserError(
            f"pushing to {repo} needs HF_TOKEN: export a write token "
            "(huggingface.co/settings/tokens) in the environment; it is never taken as an argument"
        )


def listed(folder: Path) -> list[manifest.Entry]:
    """The export's files as its manifest lists them."""
    try:
        return manifest.read(folder)
    except (AbfleetError, OSError) as exc:
        raise UserError(
            f"{folder} is not a finished export (no readable {manifest.NAME}): give a run folder "
            "or its model folder, downloaded with `abfleet download`"
        ) from exc


def push(folder: Path, repo: str, private: bool = False) -> str:
    """Check the export against its manifest, then upload it to repo; return its URL."""
    require_token(repo)
    entries = listed(folder)
    bad = manifest.verify(folder, entries)
    if bad:
        raise UserError(
            f"{folder}: {len(bad)} file(s) differ from MANIFEST.sha256 ({', '.join(bad[:3])}): "
            "download the export again (`abfleet download`) before pushing it"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()  # token: HF_TOKEN, read by huggingface_hub
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=folder,
            repo_id=repo,
            repo_type="model",
            # exactly the checked files (and the manifest), nothing else the folder may hold
            allow_patterns=[glob.escape(e.path) for e in entries] + [manifest.NAME, manifest.SIZES],
            commit_message="Upload an abliterated model (abfleet)",
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        first = str(exc).splitlines()[0]
        raise UserError(f"the Hub refused the push to {repo} (HTTP {status}): {first}") from exc
    except Exception as exc:  # its transport's errors (httpx2 today) are not huggingface_hub API
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"the push to {repo} failed ({type(exc).__name__}: {first}); run it again: "
            "files already uploaded are not sent twice"
        ) from exc
    log.info("pushed %s to %s", folder, url)
    return str(url)


def write_outcome(run_dir: Path, repo: str, url: str, error: str) -> None:
    target = run_dir / OUTCOME
    tmp = run_dir / f".{OUTCOME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"repo": repo, "url": url, "error": error}) + "\n", encoding="utf-8")
    tmp.replace(target)


def read_outcome(run_dir: Path) -> dict[str, str] | None:
    try:
        return json.loads((run_dir / OUTCOME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
