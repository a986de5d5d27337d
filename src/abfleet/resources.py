"""Locate the project folders abfleet needs at run time: jobs/, infra/ and config/.

In a source checkout (editable install) they sit at the repository root; in a built wheel they
are packaged under abfleet/_data/. Both layouts are looked up, wheel first.
"""

from __future__ import annotations

from pathlib import Path

from abfleet.errors import AbfleetError

_PACKAGE = Path(__file__).resolve().parent
NAMES = ("jobs", "infra", "config")


def resource_path(name: str) -> Path:
    if name not in NAMES:
        raise ValueError(f"unknown resource folder {name!r}")
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent.parent / name):
        if candidate.is_dir():
            return candidate
    raise AbfleetError(f"abfleet's {name}/ folder is missing from this install: reinstall abfleet")


def source_root() -> Path | None:
    """The repository root when abfleet runs from a source checkout, else None."""
    root = _PACKAGE.parent.parent
    return (
        root
        if (root / "pyproject.toml").is_file() and (root / "src" / "abfleet").is_dir()
        else None
    )
