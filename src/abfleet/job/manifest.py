"""MANIFEST.sha256 (``<sha256>  <path>`` per file, as `sha256sum -c` reads it) and MANIFEST.sizes
(``<size>  <path>``): every file of an exported model.

Written by the export on the box and checked by the download on the controller; a user can check
a model folder with `sha256sum -c MANIFEST.sha256` alone. Sizes live in their own file so the
download can plan and resume before hashing. Paths are relative to the model directory; a
manifest naming an absolute path or one with ``..`` is refused, so a tampered or broken manifest
cannot make a download write outside its folder. Exports made before the sizes moved (three
fields per line) still parse.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from abfleet.errors import AbfleetError

NAME = "MANIFEST.sha256"
SIZES = "MANIFEST.sizes"
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
    listed = [p for p in directory.rglob("*") if p.is_file() and p.name not in (NAME, SIZES)]
    for path in sorted(listed):
        rel = path.relative_to(directory).as_posix()
        entries.append(Entry(sha256_file(path), path.stat().st_size, rel))
    return entries


def render(entries: list[Entry]) -> str:
    return "".join(f"{e.sha256}  {e.path}\n" for e in entries)


def render_sizes(entries: list[Entry]) -> str:
    return "".join(f"{e.size}  {e.path}\n" for e in entries)


def write(directory: Path) -> list[Entry]:
    entries = build(directory)
    save(directory, entries)
    return entries


def save(directory: Path, entries: list[Entry]) -> None:
    """Sizes first, hashes last: a folder with MANIFEST.sha256 has both."""
    for name, text in ((SIZES, render_sizes(entries)), (NAME, render(entries))):
        tmp = directory / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(directory / name)


def read(directory: Path) -> list[Entry]:
    sizes = directory / SIZES
    return parse(
        (directory / NAME).read_text(encoding="utf-8"),
        sizes.read_text(encoding="utf-8") if sizes.is_file() else None,
    )


def safe_relative(path: str) -> str:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path or "\0" in path:
        raise AbfleetError(f"the manifest names an unsafe path {path!r}: refusing to download it")
    return pure.as_posix()


def parse(text: str, sizes: str | None = None) -> list[Entry]:
    """Entries from MANIFEST.sha256 and MANIFEST.sizes (None: the older one-file format)."""
    known: dict[str, int] = {}
    for number, line in enumerate((sizes or "").splitlines(), 1):
        size, sep, path = line.partition("  ")
        if not line.strip():
            continue
        if not sep or not size.isdigit():
            raise AbfleetError(f"{SIZES} line {number} is malformed: {line[:80]!r}")
        known[safe_relative(path)] = int(size)
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("  ", 1 if sizes is not None else 2)
        if sizes is None and (len(parts) != 3 or not parts[1].isdigit()):
            parts = []
        if len(parts) < 2 or len(parts[0]) != 64:
            raise AbfleetError(f"{NAME} line {number} is malformed: {line[:80]!r}")
        path = safe_relative(parts[-1])
        if sizes is not None and path not in known:
            raise AbfleetError(f"{SIZES} gives no size for {path}: the manifest is incomplete")
        size = known[path] if sizes is not None else int(parts[1])
        entries.append(Entry(parts[0].lower(), size, path))
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
