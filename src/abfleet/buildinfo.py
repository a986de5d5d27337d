"""Identify the exact code that runs: the version plus a hash of the package's Python sources.

The controller compares its own with the box's (`abfleet worker --version`) after installing the
shipped wheel, so a stale or different install on the box is caught before any GPU time is spent.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from abfleet import __version__

_PACKAGE = Path(__file__).resolve().parent


@functools.cache
def source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        rel = path.relative_to(_PACKAGE)
        if rel.parts[0] in ("_data", "__pycache__"):
            continue
        digest.update(rel.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def version_string() -> str:
    return f"abfleet {__version__} (source {source_hash()})"
