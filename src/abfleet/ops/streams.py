"""Parallel ranged download over several SSH connections.

One SSH connection over a long path is bound by its windows, however fast the box's link:
OpenSSH's channel window is 2 MB, so about 20 MB/s at a 100 ms round trip. Several connections,
each with its own TCP and channel windows, multiply that. Each stream is one OpenSSH client
running a small POSIX shell loop on the box that answers "offset length path" requests with
exactly that many bytes (GNU dd reads the range). Requests are pipelined two deep, so no round
trip is spent idle between chunks. Files are cut into chunks that go to whichever stream is free:
small files travel side by side, large ones in ranges. Two streams start; more are added while
they raise the rate (Ramp), so a box next door does not pay for handshakes that a far one needs.

Which byte ranges of a staged file have arrived is recorded beside it (``<file>.abfleet-ranges``),
always after the bytes themselves. After any cut, or a killed controller, only the missing ranges
are asked for again. A staged file without that record is a contiguous prefix, which is what rsync
and SFTP leave. A thread hashes each file as its contiguous prefix grows, so checking the
manifest costs no second pass over the data.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shlex
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from abfleet.errors import AbfleetError, SshAuthError
from abfleet.job import manifest

log = logging.getLogger(__name__)

RANGES_SUFFIX = ".abfleet-ranges"
DEFAULT_STREAMS = 8
DEPTH = 2  # requests in flight per stream: the next chunk is asked for while one arrives
MIN_CHUNK = 4 << 20
MAX_CHUNK = 64 << 20
READ = 1 << 20
PIPE_SIZE = 1 << 20  # a 64 KB pipe would cost a system call per 64 KB on both of its ends
SAVE_EVERY = 16 << 20  # record arrived ranges at least this often within a chunk
START_STREAMS = 2  # then doubled while that pays (Ramp)
RAMP_EVERY = 1.0  # seconds of transfer between two looks at the rate
STREAM_RETRIES = 4  # consecutive cuts one stream takes before leaving the rest to the others

# The box's side of a stream. Sizes come from `wc -c` (an fstat on a regular file): a file shorter
# than asked for is padded with zeros, so the stream never waits on bytes that will not come and
# the manifest check catches the difference.
SERVE = """cd -- "$1" || exit 3
while read -r off len && IFS= read -r path; do
  size=$(wc -c < "$path" 2>/dev/null) || size=0
  have=$((size - off))
  if [ "$have" -gt "$len" ]; then have=$len; fi
  if [ "$have" -gt 0 ]; then
    dd if="$path" bs=1M iflag=skip_bytes,count_bytes skip="$off" count="$have" status=none || exit 4
  else
    have=0
  fi
  if [ "$have" -lt "$len" ]; then head -c "$((len - have))" /dev/zero; fi
done
"""
PROBE = ["dd", "if=/dev/null", "iflag=skip_bytes,count_bytes", "count=0", "status=none"]

Progress = Callable[[int], None]  # bytes that arrived since the last call


class Ranges:
    """The byte ranges of one staged file that have arrived: sorted, merged [start, end) pairs."""

    def __init__(self, part: Path, size: int) -> None:
        self.part = part
        self.size = size
        self.record = record_path(part)
        self.lock = threading.Lock()
        self.done: list[list[int]] = arrived(part, size)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        with self.lock:
            merged: list[list[int]] = []
            for a, b in sorted([*self.done, [start, end]]):
                if merged and a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            self.done = merged

    def prefix(self) -> int:
        with self.lock:
            return self.done[0][1] if self.done and self.done[0][0] == 0 else 0

    def count(self) -> int:
        with self.lock:
            return sum(b - a for a, b in self.done)

    def missing(self) -> list[tuple[int, int]]:
        with self.lock:
            gaps, at = [], 0
            for a, b in self.done:
                if a > at:
                    gaps.append((at, a))
                at = b
            if at < self.size:
                gaps.append((at, self.size))
            return gaps

    def save(self) -> None:
        """Write the record; a complete file needs none (it is then just a file to check)."""
        with self.lock:
            if sum(b - a for a, b in self.done) == self.size:
                self.record.unlink(missing_ok=True)
                return
            tmp = self.record.with_name(self.record.name + ".tmp")
            tmp.write_text(json.dumps({"size": self.size, "done": self.done}))
            tmp.replace(self.record)


def record_path(part: Path) -> Path:
    return part.with_name(part.name + RANGES_SUFFIX)


def arrived(part: Path, size: int) -> list[list[int]]:
    """The ranges of a staged file known to be there: from its record, else its prefix."""
    record = record_path(part)
    if record.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            data = json.loads(record.read_text())
            done = [[int(a), int(b)] for a, b in data["done"]]
            if data["size"] == size and all(0 <= a < b <= size for a, b in done):
                return done
        record.unlink(missing_ok=True)  # unreadable: trust nothing in the part
        part.unlink(missing_ok=True)
        return []
    have = part.stat().st_size if part.is_file() else 0
    if have > size:
        part.unlink()
        return []
    return [[0, have]] if have else []


def staged_bytes(part: Path, size: int) -> int:
    return sum(b - a for a, b in arrived(part, size))


def to_prefix(part: Path, size: int) -> None:
    """Turn a ranged part into the contiguous prefix that rsync and SFTP append to."""
    record = record_path(part)
    if not record.is_file():
        return
    done = arrived(part, size)
    keep = done[0][1] if done and done[0][0] == 0 else 0
    if part.is_file():
        os.truncate(part, keep)
    record.unlink(missing_ok=True)


@dataclass
class _Chunk:
    file: int
    start: int
    end: int
    pos: int = 0  # where the next byte lands

    def __post_init__(self) -> None:
        self.pos = self.start


class Ramp:
    """How many streams to add: double them while the last doubling raised the rate by a
    quarter or more. Far from the box every stream adds its window's worth; near it, with the
    CPU or the link the limit, more streams only cost handshakes. The interval in which streams
    were added is not judged: far away, their handshakes (a few round trips) fill most of it."""

    def __init__(self, most: int, every: float = RAMP_EVERY, now: float | None = None) -> None:
        self.most = most
        self.every = every
        self.since = time.monotonic() if now is None else now
        self.bytes = 0
        self.rate: float | None = None
        self.settling = False
        self.done = False

    def more(self, running: int, received: int, work_left: bool, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        if self.done or now - self.since < self.every:
            return 0
        rate = (received - self.bytes) / (now - self.since)
        self.since, self.bytes = now, received
        if self.settling:
            self.settling = False
            return 0
        if not work_left or running >= self.most or (self.rate and rate < 1.25 * self.rate):
            self.done = True
            return 0
        self.rate = rate
        self.settling = True
        return min(running, self.most - running)


AUTH_REFUSED = "Permission denied"  # OpenSSH's words when no key is accepted


class Cut(Exception):
    """The stream's connection went away (or its process did)."""


class ParallelFetch:
    """One round of a ranged download of `entries` into `staging`, over `streams` connections.

    `ssh` is the OpenSSH command line up to the remote command. `run` returns once every byte
    has arrived, and raises Cut when every stream gave up with work left.
    """

    def __init__(
        self,
        ssh: list[str],
        remote_dir: str,
        staging: Path,
        entries: list[manifest.Entry],
        streams: int,
        progress: Progress,
        on_cut: Callable[[str], None],
        digests: dict[str, tuple[int, int, str]],
    ) -> None:
        self.ssh = ssh
        self.remote_dir = remote_dir
        self.entries = entries
        self.parts = [staging / e.path for e in entries]
        self.progress = progress
        self.on_cut = on_cut
        self.digests = digests
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.fatal: BaseException | None = None
        self.received = 0
        self.reconnects = 0  # the most any one stream reconnected
        self.peak = 0  # the most streams started
        for part in self.parts:
            part.parent.mkdir(parents=True, exist_ok=True)
        self.ranges = [Ranges(p, e.size) for p, e in zip(self.parts, entries, strict=True)]
        for r, part in zip(self.ranges, self.parts, strict=True):
            r.save()  # a record exists before any byte lands out of order
            part.touch()
        self.queue: deque[_Chunk] = deque(self._chunks(streams))
        self.streams = max(1, min(streams, len(self.queue)))  # the most that will run

    def _chunks(self, streams: int) -> list[_Chunk]:
        gaps = [(i, a, b) for i, r in enumerate(self.ranges) for a, b in r.missing()]
        left = sum(b - a for _, a, b in gaps)
        size = min(MAX_CHUNK, max(MIN_CHUNK, left // (streams * 4)))
        return [_Chunk(i, s, min(b, s + size)) for i, a, b in gaps for s in range(a, b, size)]

    def already(self) -> int:
        return sum(r.count() for r in self.ranges)

    def run(self) -> int:
        """Fetch every missing byte; the bytes that came over the wire."""
        hasher = GrowingHasher(
            self.parts, self.entries, lambda i, _fd: self.ranges[i].prefix(), self.digests
        )
        hasher.start()
        threads: list[threading.Thread] = []

        def add(count: int) -> None:
            for _ in range(count):
                t = threading.Thread(target=self._stream, daemon=True, name="abfleet-stream")
                t.start()
                threads.append(t)
            self.peak = max(self.peak, len(threads))

        try:
            add(min(START_STREAMS, self.streams))
            ramp = Ramp(self.streams)
            while any(t.is_alive() for t in threads):
                time.sleep(0.1)  # in the main thread: Ctrl+C still lands
                add(ramp.more(len(threads), self.received, bool(self.queue)))
        except BaseException:
            self.halt.set()
            hasher.halt.set()
            for t in threads:
                t.join(10)
            raise
        finally:
            for r in self.ranges:
                r.save()
        if self.fatal is not None:
            self.halt.set()
            hasher.halt.set()
            if isinstance(self.fatal, OSError):  # writing here failed: no retry will help
                raise AbfleetError(
                    f"could not write the download ({self.fatal.strerror or self.fatal}): "
                    "fix that, then rerun the same command to resume"
                ) from self.fatal
            raise self.fatal
        if self.queue:
            self.halt.set()
            hasher.stop()
            raise Cut(f"every stream lost its connection with {len(self.queue)} chunks left")
        hasher.join()
        return self.received

    # -- a stream ---------------------------------------------------------------------------

    def _take(self) -> _Chunk | None:
        with self.lock:
            return self.queue.popleft() if self.queue else None

    def _give_back(self, chunks: list[_Chunk]) -> None:
        with self.lock:
            for c in reversed(chunks):
                if c.pos < c.end:
                    c.start = c.pos
                    self.queue.appendleft(c)

    def _spawn(self) -> subprocess.Popen:
        read_end, write_end = os.pipe()
        setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only; a Mac keeps its default
        if setpipe is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(read_end, setpipe, PIPE_SIZE)
        remote = shlex.join(["sh", "-c", SERVE, "sh", self.remote_dir])
        try:
            proc = subprocess.Popen(
                [*self.ssh, remote],
                stdin=subprocess.PIPE,
                stdout=write_end,
                stderr=subprocess.PIPE,
                bufsize=0,
            )
        finally:
            os.close(write_end)
        proc.stdout = os.fdopen(read_end, "rb", buffering=0)
        return proc

    def _stream(self) -> None:
        cuts = 0
        proc: subprocess.Popen | None = None
        inflight: deque[_Chunk] = deque()
        buf = bytearray(READ)
        try:
            while not self.halt.is_set():
                try:
                    if proc is None:
                        if not self.queue:
                            return
                        proc = self._spawn()
                    while len(inflight) < DEPTH and (chunk := self._take()):
                        inflight.append(chunk)
                        self._ask(proc, chunk)
                    if not inflight:
                        return
                    self._receive(proc, inflight[0], buf)
                    inflight.popleft()
                    cuts = 0
                except Cut as exc:
                    why = _stop(proc) or str(exc)
                    proc = None
                    if AUTH_REFUSED in why:
                        # No reconnect fixes a key the box does not accept: say so, once.
                        raise SshAuthError(
                            f"the box refused abfleet's SSH key for a download stream ({why}); "
                            "`abfleet attach-key ID` gives it your key"
                        ) from None
                    self._give_back(list(inflight))
                    inflight.clear()
                    if self.halt.is_set():
                        return
                    cuts += 1
                    with self.lock:
                        first = cuts > self.reconnects
                        self.reconnects = max(self.reconnects, cuts)
                    if first:
                        self.on_cut(why)
                    if cuts > STREAM_RETRIES:
                        log.warning("a download stream gave up after %d cuts: %s", cuts - 1, why)
                        return
                    log.info("stream cut (%s); reconnecting", why)
                    self.halt.wait(min(2 ** (cuts - 1), 10))
        except BaseException as exc:  # noqa: BLE001 - a local failure (disk full...) stops all streams
            with self.lock:
                self.fatal = self.fatal or exc
            self.halt.set()
        finally:
            _stop(proc)
            self._give_back(list(inflight))

    def _ask(self, proc: subprocess.Popen, chunk: _Chunk) -> None:
        path = self.entries[chunk.file].path
        try:
            assert proc.stdin is not None
            proc.stdin.write(f"{chunk.pos} {chunk.end - chunk.pos}\n{path}\n".encode())
        except OSError as exc:
            raise Cut(f"{type(exc).__name__}: {exc}") from exc

    def _receive(self, proc: subprocess.Popen, chunk: _Chunk, buf: bytearray) -> None:
        ranges = self.ranges[chunk.file]
        view = memoryview(buf)
        assert proc.stdout is not None
        fd = os.open(self.parts[chunk.file], os.O_WRONLY | os.O_CREAT, 0o644)
        saved = chunk.pos
        try:
            while chunk.pos < chunk.end:
                # Write what each read brings: waiting to fill a larger buffer measured slower.
                try:
                    n = proc.stdout.readinto(view[: min(READ, chunk.end - chunk.pos)])
                except OSError as exc:
                    raise Cut(f"{type(exc).__name__}: {exc}") from exc
                if not n:
                    raise Cut("the connection closed")
                written = 0
                while written < n:  # local errors (ENOSPC...) propagate: they are not cuts
                    written += os.pwrite(fd, view[written:n], chunk.pos + written)
                ranges.add(chunk.pos, chunk.pos + n)
                chunk.pos += n
                with self.lock:
                    self.received += n
                self.progress(n)
                if chunk.pos - saved >= SAVE_EVERY:
                    ranges.save()
                    saved = chunk.pos
                if self.halt.is_set():
                    raise Cut("stopped")
        finally:
            os.close(fd)
            ranges.save()


class GrowingHasher(threading.Thread):
    """Hashes each staged file, in order, as far as it has arrived contiguously, so checking the
    manifest costs no second pass. `available(i, fd)` says how far file i is contiguous: its
    size for rsync (which appends), the recorded prefix for ranged streams. A digest is kept
    with the file's size and mtime, so one made stale by a later rewrite is ignored."""

    def __init__(
        self,
        parts: list[Path],
        entries: list[manifest.Entry],
        available: Callable[[int, int], int],
        digests: dict[str, tuple[int, int, str]],
    ) -> None:
        super().__init__(daemon=True, name="abfleet-hash")
        self.parts = parts
        self.entries = entries
        self.available = available
        self.digests = digests
        self.halt = threading.Event()

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)

    def run(self) -> None:
        for i, (e, part) in enumerate(zip(self.entries, self.parts, strict=True)):
            while not part.is_file():
                if self.halt.wait(0.01):
                    return
            digest = hashlib.sha256()
            done = 0
            # pread, unbuffered: a buffered reader would read ahead into holes not yet written.
            fd = os.open(part, os.O_RDONLY)
            try:
                while done < e.size:
                    upto = min(self.available(i, fd), e.size)
                    if upto <= done:
                        if self.halt.wait(0.01):
                            return
                        continue
                    while done < upto and (chunk := os.pread(fd, min(4 * READ, upto - done), done)):
                        digest.update(chunk)
                        done += len(chunk)
            finally:
                os.close(fd)
            st = part.stat()
            self.digests[e.path] = (st.st_size, st.st_mtime_ns, digest.hexdigest())


def _stop(proc: subprocess.Popen | None) -> str:
    """End a stream's process; the last line it wrote to stderr, if any."""
    if proc is None:
        return ""
    with contextlib.suppress(OSError):
        if proc.stdin:
            proc.stdin.close()
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    err = b""
    with contextlib.suppress(OSError, ValueError):
        if proc.stderr:
            err = proc.stderr.read()
            proc.stderr.close()
    with contextlib.suppress(OSError, ValueError):
        if proc.stdout:
            proc.stdout.close()
    lines = err.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""
