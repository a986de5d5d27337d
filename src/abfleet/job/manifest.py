"""MANIFEST.sha256: one line per file of an exported model, ``<sha256>  <size>  <path>``.

Written by the export on the box and checked by the download on the controller. Paths are
relative to the model directory; a manifest naming an absolute path or one with ``..`` is
refused, so a tampered or broken manifest cannot make a download write outside its folder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from abfleet.errors import AbfleetError

NAME = "MANIFEST.sha256"
CHUNK = 4 << 20


@dataclass(frozen=True)
class Entry:
    sha256: str
    size: int
    path: str


def sha256_file(path: Path, start_hash: hashlib._Hash | None = None, offset: int = 0) -> str:
    digest = start_hash or hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build(directory: Path) -> list[Entry]:
    entries = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != NAME):
        rel = path.relative_to(directory).as_posix()
        entries.append(Entry(sha256_file(path), path.stat().st_size, rel))
    return entries


def render(entries: list[Entry]) -> str:
    return "".join(f"{e.sha256}  {e.size}  {e.path}\n" for e in entries)


def write(directory: Path) -> list[Entry]:
    entries = build(directory)
    tmp = directory / (NAME + ".tmp")
    tmp.write_text(render(entries), encoding="utf-8")
    tmp.replace(directory / NAME)
    return entries


def safe_relative(path: str) -> str:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path or "\0" in path:
        raise AbfleetError(f"the manifest names an unsafe path {path!r}: refusing to download it")
    return pure.as_posix()


def parse(text: str) -> list[Entry]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("  ", 2)
        if len(parts) != 3 or len(parts[0]) != 64 or not parts[1].isdigit():
            raise AbfleetError(f"{NAME} line {number} is malformed: {line[:80]!r}")
        entries.append(Entry(parts[0].lower(), int(parts[1]), safe_relative(parts[2])))
    if not entries:
        raise AbfleetError(f"{NAME} lists no files")
    return entries


def verify(directory: Path, entries: list[Entry]) -> list[str]:
    """Paths whose size or hash does not match (empty: all good)."""
    bad = []
    for e in entries:
        path = directory / e.path
        if not path.is_file() or path.stat().st_size != e.size or sha256_file(path) != e.sha256:
            bad.append(e.path)
    return bad
