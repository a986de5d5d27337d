"""Resumable, verified download of an exported model.

The box's MANIFEST.sha256 says what to fetch (paths inside the model folder only). Files arrive
in a staging folder, resume from what is already there after a cut connection, are checked
against their sha256 and size, and only then renamed into place. A file verified once is
remembered (size, mtime, hash), so re-running a finished download transfers and re-hashes
nothing. rsync does the transfer when both ends have it (C speed, the same ssh as scp); SFTP with
offset resume otherwise. The verification is the same either way, and it runs while the bytes
arrive rather than in a second pass: SFTP hashes what it writes, and for rsync (which appends in
place) a thread hashes each file as it grows.

Over SSH the default is several parallel streams (ops/streams.py): one connection is bound by
its windows at world distance, several are not. One stream (rsync, or SFTP) remains for boxes
whose dd cannot read byte ranges, and on request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abfleet.errors import AbfleetError, RemoteError, SshAuthError
from abfleet.fleet.remote import LocalRemote, Remote, SshRemote, identity_files
from abfleet.job import manifest
from abfleet.ops import streams

log = logging.getLogger(__name__)

STAGING = ".abfleet-partial"
STATE = ".abfleet-verified.json"
CHUNK = 1 << 20
# rsync exit codes that mean "the connection went away": worth reconnecting and resuming.
RSYNC_RETRY = {10, 11, 12, 20, 23, 30, 35, 255}

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
Connect = Callable[[], Remote]


@dataclass
class DownloadResult:
    files: int
    skipped: int
    bytes_total: int
    bytes_needed: int  # what was not on disk yet when this download started
    bytes_transferred: int  # what came over the wire, re-sent bytes included
    method: str
    seconds: float
    attempts: int
    target: Path
    streams: int = 1  # parallel: the most connections that ran at once
    # Files that were in the target but are not part of this export, moved aside (and where).
    set_aside: list[str] = field(default_factory=list)
    set_aside_to: Path | None = None
    resent_fraction: float = field(init=False)

    def __post_init__(self) -> None:
        extra = max(0, self.bytes_transferred - self.bytes_needed)
        self.resent_fraction = extra / self.bytes_total if self.bytes_total else 0.0


# One command for the manifest, its sizes and whether the box's dd reads byte ranges: each
# command is a round trip or two before the first byte moves.
_READ_MANIFEST = f"""cd -- "$1" || exit 3
cat -- "$2" || exit 4
printf '\\0'
cat -- "$3" 2>/dev/null
printf '\\0'
if {shlex.join(streams.PROBE)} 2>/dev/null; then echo ranged; fi
"""


def read_manifest(remote: Remote, remote_dir: str) -> tuple[list[manifest.Entry], bool]:
    """The export's manifest, and whether the box can serve byte ranges (GNU dd)."""
    argv = ["sh", "-c", _READ_MANIFEST, "sh", remote_dir, manifest.NAME, manifest.SIZES]
    out = remote.run(argv, timeout=60, check=False)
    if out.code != 0 or out.stdout.count("\0") != 2:
        raise AbfleetError(
            f"no {manifest.NAME} on the box in {remote_dir}: the model is not exported (yet)"
        )
    text, sizes, probe = out.stdout.split("\0")
    return manifest.parse(text, sizes or None), probe.strip() == "ranged"


class Verified:
    """Files already checked in the target folder: path -> [size, mtime_ns, sha256]."""

    def __init__(self, target: Path) -> None:
        self.path = target / STATE
        try:
            self.data: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            self.data = {}

    def ok(self, target: Path, entry: manifest.Entry) -> bool:
        path = target / entry.path
        if not path.is_file():
            return False
        st = path.stat()
        if st.st_size != entry.size:
            return False
        if self.data.get(entry.path) == [st.st_size, st.st_mtime_ns, entry.sha256]:
            return True
        if manifest.sha256_file(path) == entry.sha256:
            self.remember(target, entry)
            return True
        return False

    def remember(self, target: Path, entry: manifest.Entry) -> None:
        st = (target / entry.path).stat()
        self.data[entry.path] = [st.st_size, st.st_mtime_ns, entry.sha256]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


def set_aside_strays(target: Path, entries: list[manifest.Entry]) -> tuple[Path | None, list[str]]:
    """Move every file of the target that this export does not have into a sibling folder, with
    a note: an earlier export's model.safetensors beside a new sharded one is what transformers
    would load first. Nothing is deleted; the target then holds exactly the manifest's files."""
    keep = {e.path for e in entries} | {manifest.NAME, manifest.SIZES, STATE}
    strays = sorted(
        rel
        for path in target.rglob("*")
        if path.is_file()
        and not (rel := path.relative_to(target).as_posix()).startswith(STAGING + "/")
        and rel not in keep
        and not rel.endswith(".tmp")
    )
    if not strays:
        return None, []
    aside = target.parent / f"{target.name}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}"
    for rel in strays:
        dest = aside / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        (target / rel).rename(dest)
    (aside / "NOTE.txt").write_text(
        f"These files were in {target} but are not part of the export downloaded there on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} (its MANIFEST.sha256 does not list them).\n"
        "They were moved here so that nothing loads them by mistake; delete this folder when "
        "you no longer need them.\n",
        encoding="utf-8",
    )
    for path in sorted(target.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and path.name != STAGING and not any(path.iterdir()):
            path.rmdir()
    log.info("moved %d file(s) not in the export aside to %s", len(strays), aside)
    return aside, strays


class _Interrupted(Exception):
    def __init__(self, message: str, transferred: int) -> None:
        super().__init__(message)
        self.transferred = transferred


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


class Downloader:
    def __init__(
        self,
        connect: Connect,
        remote_dir: str,
        target: Path,
        progress: Progress | None,
        prefer_rsync: bool,
        stream_count: int = streams.DEFAULT_STREAMS,
        on_attempt: Callable[[int, str], None] | None = None,
    ) -> None:
        self.connect = connect
        self.remote_dir = remote_dir
        self.target = target
        self.staging = target / STAGING
        self.progress = progress
        self.prefer_rsync = prefer_rsync
        # path -> (size, mtime_ns, sha256) of a staged file, hashed while it arrived
        self.digests: dict[str, tuple[int, int, str]] = {}
        self.failures: dict[str, int] = {}
        self.total = 0
        self.stream_count = stream_count
        self.on_attempt = on_attempt
        self.reconnects = 0  # streams that reconnected by themselves, within one attempt
        self.peak = 1

    def run(self, attempts: int) -> DownloadResult:
        started = time.monotonic()
        self.target.mkdir(parents=True, exist_ok=True)
        remote = self.connect()
        try:
            entries, ranged = read_manifest(remote, self.remote_dir)
            verified = Verified(self.target)
            todo = [e for e in entries if not verified.ok(self.target, e)]
            skipped = len(entries) - len(todo)
            self.total = sum(e.size for e in entries)
            needed = sum(e.size for e in todo) - sum(self._staged(e) for e in todo)
            free = shutil.disk_usage(self.target).free
            if needed > free:  # found out now, not hours into a 140 GB download
                raise AbfleetError(
                    f"{self.target} has {free / 1e9:.1f} GB free and the model needs "
                    f"{needed / 1e9:.1f} GB more: free some space or download elsewhere with --to DIR"
                )
            verified.save()
        except BaseException:
            remote.close()
            raise
        method = self._method(remote, ranged) if todo else "none"
        transferred = 0
        tries = 0
        while todo:
            tries += 1
            if tries > attempts:
                raise AbfleetError(
                    f"download gave up after {attempts} attempts; rerun the same command to resume"
                )
            base = self.total - sum(e.size for e in todo)
            try:
                fetch = {"parallel": self._parallel, "rsync": self._rsync}.get(method, self._sftp)
                transferred += fetch(remote, todo, base)
            except SshAuthError:
                remote.close()
                raise  # a refused key is not a lost connection: no retry helps
            except (RemoteError, OSError, EOFError, _Interrupted) as exc:
                transferred += getattr(exc, "transferred", 0)
                log.warning("download interrupted (%s); resuming", exc)
                if self.on_attempt:
                    self.on_attempt(tries, str(exc))
                remote.close()
                time.sleep(min(2 ** (tries - 1), 10))
                remote = self._reconnect(attempts)
                continue
            todo = self._finish(todo, verified)
        remote.close()
        aside_to, aside = set_aside_strays(self.target, entries)
        for rel in aside:
            verified.data.pop(rel, None)
        verified.save()
        manifest.save(self.target, entries)
        _remove_empty_dirs(self.staging)
        if self.progress:
            self.progress(self.total, self.total)
        return DownloadResult(
            files=len(entries),
            skipped=skipped,
            bytes_total=self.total,
            bytes_needed=max(0, needed),
            bytes_transferred=transferred,
            method=method,
            seconds=time.monotonic() - started,
            attempts=tries + self.reconnects,
            target=self.target,
            streams=self.peak,
            set_aside=aside,
            set_aside_to=aside_to,
        )

    def _method(self, remote: Remote, ranged: bool) -> str:
        if not isinstance(remote, SshRemote) or not self.prefer_rsync:
            return _plain_method(remote)
        if self.stream_count > 1 and ranged and shutil.which("ssh"):
            return "parallel"
        return "rsync" if _rsync_possible(remote) else "sftp"

    def _staged(self, e: manifest.Entry) -> int:
        return streams.staged_bytes(self.staging / e.path, e.size)

    def _reconnect(self, attempts: int) -> Remote:
        for i in range(attempts):
            try:
                return self.connect()
            except RemoteError as exc:
                log.warning("reconnect %d failed: %s", i + 1, exc)
                time.sleep(min(2**i, 10))
        raise AbfleetError(
            "lost the connection to the box and could not get it back; rerun the same command to resume"
        )

    def _digest(self, path: Path, rel: str) -> str:
        """The hash taken while the file arrived, if the file has not changed since; else now."""
        st = path.stat()
        known = self.digests.pop(rel, None)
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        return manifest.sha256_file(path)

    def _finish(self, todo: list[manifest.Entry], verified: Verified) -> list[manifest.Entry]:
        """Move verified staged files into place; a corrupt one is fetched again, and twice the
        same failure means the file on the box is not what its manifest says."""
        left = []
        for e in todo:
            part = self.staging / e.path
            if (
                not part.is_file()
                or part.stat().st_size < e.size
                or streams.record_path(part).is_file()  # ranges still missing
            ):
                left.append(e)
                continue
            if part.stat().st_size == e.size and self._digest(part, e.path) == e.sha256:
                final = self.target / e.path
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, final)
                verified.remember(self.target, e)
                continue
            part.unlink()
            self.failures[e.path] = self.failures.get(e.path, 0) + 1
            if self.failures[e.path] >= 2:
                raise AbfleetError(
                    f"{e.path} on the box does not match {manifest.NAME} (changed or corrupt since export): "
                    "nothing was renamed into place"
                )
            log.warning("%s failed verification; fetching it again from the start", e.path)
            left.append(e)
        verified.save()
        return left

    # -- parallel ranged streams -------------------------------------------------------------

    def _parallel(self, remote: Any, todo: list[manifest.Entry], base: int) -> int:
        t = remote.target
        ssh = [
            *ssh_command(remote),
            "-T",
            "-o",
            "Compression=no",
            # Each stream its own TCP connection, whatever multiplexing the user's config asks.
            "-o",
            "ControlMaster=no",
            "-o",
            "ControlPath=none",
            "--",
            f"{t.user}@{t.host}",
        ]
        lock = threading.Lock()

        def arrived(n: int) -> None:
            nonlocal done
            with lock:
                done += n
                if self.progress:
                    self.progress(min(done, self.total), self.total)

        def cut(why: str) -> None:
            log.warning("a download stream was cut (%s); it reconnects", why)
            if self.on_attempt:
                self.on_attempt(fetch.reconnects, why)

        fetch = streams.ParallelFetch(
            ssh,
            self.remote_dir,
            self.staging,
            todo,
            self.stream_count,
            arrived,
            cut,
            self.digests,
        )
        done = base + fetch.already()
        try:
            return fetch.run()
        except streams.Cut as exc:
            raise _Interrupted(str(exc), fetch.received) from exc
        finally:
            self.reconnects += fetch.reconnects
            self.peak = max(self.peak, fetch.peak)

    # -- SFTP (and plain copies on this machine) ------------------------------------------

    def _sftp(self, remote: Remote, todo: list[manifest.Entry], base: int) -> int:
        got = 0
        done = base
        for e in todo:
            part = self.staging / e.path
            part.parent.mkdir(parents=True, exist_ok=True)
            streams.to_prefix(part, e.size)
            offset = _size(part)
            if offset > e.size:
                part.unlink()
                offset = 0
            digest = _hash_prefix(part, offset)
            done += offset
            if offset < e.size:
                try:
                    with (
                        _open_remote(remote, f"{self.remote_dir}/{e.path}") as rf,
                        open(part, "ab") as lf,
                    ):
                        rf.seek(offset)
                        if hasattr(rf, "prefetch"):
                            rf.prefetch(e.size)
                        while chunk := rf.read(CHUNK):
                            lf.write(chunk)
                            digest.update(chunk)
                            got += len(chunk)
                            done += len(chunk)
                            if self.progress:
                                self.progress(done, self.total)
                except Exception as exc:
                    raise _Interrupted(f"{type(exc).__name__}: {exc}", got) from exc
            st = part.stat()
            self.digests[e.path] = (st.st_size, st.st_mtime_ns, digest.hexdigest())
        return got

    # -- rsync --------------------------------------------------------------------------

    def _rsync(self, remote: Any, todo: list[manifest.Entry], base: int) -> int:
        self.staging.mkdir(parents=True, exist_ok=True)
        for e in todo:
            streams.to_prefix(self.staging / e.path, e.size)
        already = sum(_size(self.staging / e.path) for e in todo)
        listing = self.target / ".abfleet-files"
        listing.write_text("".join(e.path + "\n" for e in todo))
        t = remote.target
        cmd = [
            "rsync",
            "--partial",
            "--append-verify",
            "--protect-args",
            f"--files-from={listing}",
            "--stats",
            "--info=progress2",
            "--no-inc-recursive",
            "-e",
            shlex.join(ssh_command(remote)),
            f"{t.user}@{t.host}:{self.remote_dir}/",
            f"{self.staging}/",
        ]
        parts = [self.staging / e.path for e in todo]
        # rsync --append writes each file in place, in list order: its size is what arrived.
        hasher = streams.GrowingHasher(
            parts, todo, lambda _i, fd: os.fstat(fd).st_size, self.digests
        )
        hasher.start()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        received = 0
        try:
            received = self._read_rsync_output(proc, base + already)
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            code = proc.wait()
        finally:
            hasher.stop()
            listing.unlink(missing_ok=True)
        if code == 0:
            return received
        got = max(received, sum(_size(self.staging / e.path) for e in todo) - already)
        if code in RSYNC_RETRY:
            last = err.strip().splitlines()[-1] if err.strip() else ""
            raise _Interrupted(f"rsync exited {code}: {last}", got)
        raise AbfleetError(f"rsync failed ({code}): {err.strip()[-300:]}")

    def _read_rsync_output(self, proc: subprocess.Popen, start: int) -> int:
        received = 0
        buf = b""
        assert proc.stdout is not None
        while data := proc.stdout.read1(65536):
            buf += data
            *lines, buf = re.split(rb"[\r\n]", buf)
            for raw in lines:
                line = raw.decode(errors="replace")
                m = _PROGRESS.match(line)
                if m and self.progress:
                    self.progress(min(self.total, start + int(m[1].replace(",", ""))), self.total)
                r = _RECEIVED.search(line)
                if r:
                    received = int(r[1].replace(",", ""))
        return received


def download(
    connect: Connect,
    remote_dir: str,
    target: Path,
    progress: Progress | None = None,
    prefer_rsync: bool = True,
    attempts: int = 8,
    on_attempt: Callable[[int, str], None] | None = None,
    stream_count: int = streams.DEFAULT_STREAMS,
) -> DownloadResult:
    """`stream_count` > 1: parallel ranged streams over SSH when the box allows; 1: one stream
    (rsync when both ends have it, SFTP otherwise). `prefer_rsync=False` forces SFTP."""
    return Downloader(
        connect, remote_dir, target, progress, prefer_rsync, stream_count, on_attempt
    ).run(attempts)


def _hash_prefix(path: Path, length: int) -> Any:
    digest = hashlib.sha256()
    if length:
        with open(path, "rb") as handle:
            left = length
            while left and (chunk := handle.read(min(CHUNK * 4, left))):
                digest.update(chunk)
                left -= len(chunk)
    return digest


def _plain_method(remote: Remote) -> str:
    return "copy" if isinstance(remote, LocalRemote) else "sftp"


def _open_remote(remote: Remote, path: str) -> Any:
    if isinstance(remote, SshRemote):
        return remote.sftp.open(path, "rb")
    return open(path, "rb")


def _remove_empty_dirs(root: Path) -> None:
    """Remove the staging folder if only empty folders are left in it (never a file)."""
    if not root.is_dir():
        return
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def _rsync_possible(remote: Remote) -> bool:
    if (
        not isinstance(remote, SshRemote)
        or shutil.which("rsync") is None
        or shutil.which("ssh") is None
    ):
        return False
    return remote.run(["sh", "-c", "command -v rsync"], timeout=30, check=False).ok


def ssh_command(remote: SshRemote) -> list[str]:
    """The OpenSSH client with abfleet's pinned host key: rsync never trusts a new key."""
    t = remote.target
    cmd = [
        "ssh",
        "-p",
        str(t.port),
        "-o",
        f"UserKnownHostsFile={t.known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        f"ConnectTimeout={int(t.connect_timeout)}",
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ServerAliveCountMax=3",
        # AES-GCM first: with AES-NI (every GPU host) it encrypts several times faster than
        # the default ChaCha20, and a multi-GB download is bound by ssh's CPU.
        "-o",
        "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr",
        # A handshake per stream: the post-quantum hybrid exchange that OpenSSH 9 prefers costs
        # about 70 ms of CPU on each end, where curve25519 costs a few. Every OpenSSH since 7.4
        # knows these names.
        "-o",
        "KexAlgorithms=curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,"
        "diffie-hellman-group-exchange-sha256,diffie-hellman-group14-sha256",
    ]
    keys = identity_files(t)
    for key in keys:
        cmd += ["-i", key]
    if keys:
        cmd += ["-o", "IdentitiesOnly=yes"]
    return cmd


_PROGRESS = re.compile(r"^\s*([\d,]+)\s+\d+%")
_RECEIVED = re.compile(r"Total bytes received: ([\d,]+)")
