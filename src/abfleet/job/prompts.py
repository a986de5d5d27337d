"""Prompt lists from local files (.txt, .jsonl, .csv) or a Hugging Face hub dataset."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from abfleet.errors import UserError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".csv")


class FileSource(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    path: str
    column: str = "text"
    limit: int | None = Field(default=None, ge=1)


class DatasetSource(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    dataset: str
    split: str = "train"
    column: str = "text"
    config: str | None = None
    limit: int | None = Field(default=None, ge=1)


PromptSource = str | FileSource | DatasetSource


def describe(source: PromptSource) -> str:
    if isinstance(source, str):
        return source
    if isinstance(source, FileSource):
        return source.path
    return f"{source.dataset} [{source.split}].{source.column}"


def resolve_file(source: str | FileSource, base_dir: Path) -> Path:
    raw = source if isinstance(source, str) else source.path
    path = Path(raw).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def load_prompts(source: PromptSource, base_dir: Path) -> list[str]:
    if isinstance(source, DatasetSource):
        prompts = _load_dataset(source)
        limit = source.limit
    else:
        path = resolve_file(source, base_dir)
        column = source.column if isinstance(source, FileSource) else "text"
        prompts = _load_file(path, column)
        limit = source.limit if isinstance(source, FileSource) else None
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise UserError(f"prompt source {describe(source)} is empty: it needs at least one prompt")
    return prompts


def _load_file(path: Path, column: str) -> list[str]:
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"prompt file {path} must be .txt (one per line), .jsonl or .csv")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompt file {path}: {exc}") from exc
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if suffix == ".jsonl":
        out = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number} is not JSON: {exc.msg}") from exc
            if not isinstance(row, dict) or column not in row:
                raise UserError(
                    f"{path} line {number} has no {column!r} field: set column in the job"
                )
            out.append(str(row[column]).strip())
        return [p for p in out if p]
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or column not in reader.fieldnames:
        raise UserError(f"{path} has no {column!r} column: set column in the job")
    return [row[column].strip() for row in reader if (row.get(column) or "").strip()]


def _load_dataset(source: DatasetSource) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise UserError(
            "hub datasets need the datasets package: pip install 'abfleet[hub]'"
        ) from exc
    try:
        data = datasets.load_dataset(source.dataset, source.config, split=source.split)
    except Exception as exc:
        raise UserError(
            f"cannot load dataset {describe(source)}: {str(exc).splitlines()[0]}"
        ) from exc
    if source.column not in data.column_names:
        raise UserError(
            f"dataset {source.dataset} has no column {source.column!r} (has {data.column_names})"
        )
    return [str(x).strip() for x in data[source.column] if str(x).strip()]
