"""Resumable, verified download over a real SSH server that is killed mid-transfer: parallel
ranged streams (the default), rsync and SFTP."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from abfleet.errors import AbfleetError
from abfleet.fleet.remote import SshRemote, SshTarget, known_hosts_file
from abfleet.job import manifest
from abfleet.ops.streams import RANGES_SUFFIX, Ramp
from abfleet.ops.transfer import STAGING, download

MB = 1 << 20
SIZES = {
    "model-00001-of-00003.safetensors": 150 * MB,
    "model-00002-of-00003.safetensors": 120 * MB,
    "model-00003-of-00003.safetensors": 30 * MB,
    "config.json": 700,
    "tokenizer/tokenizer.json": 3 * MB,
}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("export") / "model"
    for rel, size in SIZES.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 16 * MB)
                f.write(os.urandom(n))
                left -= n
    manifest.write(src)
    return src


@pytest.fixture
def box_with_model(boxes, model_files):
    box = boxes("dl")
    remote_dir = box.root / "runs" / "r1" / "model"
    remote_dir.parent.mkdir(parents=True)
    os.symlink(model_files, remote_dir)
    return box, str(remote_dir)


def connector(box, key: Path):
    def connect():
        return SshRemote(
            SshTarget("127.0.0.1", box.port, "root", known_hosts_file("test", "dl"), str(key), 5)
        )

    return connect


def staged_bytes(target: Path) -> int:
    """Bytes on disk in the staging folder (allocated blocks: a ranged part is sparse)."""
    staging = target / STAGING
    if not staging.exists():
        return 0
    return sum(
        min(p.stat().st_size, p.stat().st_blocks * 512) for p in staging.rglob("*") if p.is_file()
    )


def options(method: str) -> dict:
    return {"prefer_rsync": method != "sftp", "stream_count": 8 if method == "parallel" else 1}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["parallel", "rsync", "sftp"])
def test_download_survives_two_cuts_resends_little_and_is_bit_identical(
    method, box_with_model, ssh_key, model_files, tmp_path
):
    box, remote_dir = box_with_model
    target = tmp_path / "got"
    total = sum(SIZES.values())
    cuts = []

    def cutter():
        for fraction in (0.25, 0.6):
            deadline = time.monotonic() + 120
            while (
                staged_bytes(target) + sum(p.stat().st_size for p in target.rglob("*.safetensors"))
                < fraction * total
            ):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.002)
            box.kill()  # the server and every session it forked: the connection is cut
            cuts.append(staged_bytes(target))
            time.sleep(0.5)
            box.start()

    thread = threading.Thread(target=cutter, daemon=True)
    thread.start()
    result = download(connector(box, ssh_key), remote_dir, target, **options(method))
    thread.join(timeout=60)
    assert result.method == method
    assert len(cuts) == 2 and result.attempts >= 3, (cuts, result)
    for rel in SIZES:
        assert sha(target / rel) == sha(model_files / rel), rel
    assert result.resent_fraction < 0.05, result
    assert not (target / STAGING).exists()
    assert not list(target.rglob(f"*{RANGES_SUFFIX}"))

    again = download(connector(box, ssh_key), remote_dir, target, **options(method))
    assert again.bytes_transferred == 0 and again.skipped == len(SIZES) and again.method == "none"


@pytest.mark.parametrize("method", ["parallel", "sftp"])
def test_a_controller_killed_mid_download_resumes_from_the_recorded_ranges(
    method, box_with_model, ssh_key, model_files, tmp_path
):
    """What a killed ranged download leaves: two stretches of the first shard and their record.
    The streams fetch only the gap and the tail; one stream keeps the contiguous prefix."""
    box, remote_dir = box_with_model
    target = tmp_path / "got"
    name = "model-00001-of-00003.safetensors"
    source = (model_files / name).read_bytes()
    part = target / STAGING / name
    part.parent.mkdir(parents=True)
    with open(part, "wb") as f:
        f.write(source[: 40 * MB])
        f.seek(80 * MB)
        f.write(source[80 * MB : 120 * MB])
    Path(str(part) + RANGES_SUFFIX).write_text(
        f'{{"size": {len(source)}, "done": [[0, {40 * MB}], [{80 * MB}, {120 * MB}]]}}'
    )
    result = download(connector(box, ssh_key), remote_dir, target, **options(method))
    assert result.method == method
    for rel in SIZES:
        assert sha(target / rel) == sha(model_files / rel), rel
    kept = 80 * MB if method == "parallel" else 40 * MB  # SFTP appends after the prefix only
    assert result.bytes_needed == sum(SIZES.values()) - 80 * MB
    assert result.bytes_transferred == sum(SIZES.values()) - kept
    assert not list(target.rglob(f"*{RANGES_SUFFIX}"))


def test_a_box_whose_dd_reads_no_ranges_gets_one_rsync_stream(ssh_key, model_files, tmp_path):
    """busybox's dd has no iflag=skip_bytes: the download falls back instead of failing."""
    import sys

    from sshbox import SshBox, free_port

    bin_dir = tmp_path / "bin"  # first on the box's PATH
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "dd").write_text(
        '#!/bin/sh\nfor a; do case $a in iflag=*) echo "dd: invalid operand" >&2; exit 1;; esac; done\n'
        'exec /bin/dd "$@"\n'
    )
    (bin_dir / "dd").chmod(0o755)
    box = SshBox(tmp_path / "box", free_port(), ssh_key, python=str(bin_dir / "python")).start()
    try:
        result = download(connector(box, ssh_key), str(model_files), tmp_path / "got")
    finally:
        box.kill()
    assert result.method == "rsync" and result.streams == 1
    for rel in SIZES:
        assert sha(tmp_path / "got" / rel) == sha(model_files / rel), rel


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_a_download_that_cannot_fit_is_refused_before_any_byte(box_with_model, ssh_key, tmp_path):
    import subprocess

    box, remote_dir = box_with_model
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(AbfleetError, match=r"GB free and the model needs 0\.3 GB more"):
            download(connector(box, ssh_key), remote_dir, small / "got")
        assert [p for p in small.rglob("*") if p.is_file()] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_streams_double_while_the_rate_grows_and_stop_when_it_does_not():
    far = Ramp(8, every=1, now=0)  # each stream adds its window's worth
    assert far.more(2, 10 * MB, True, now=0.5) == 0  # not a full second yet
    assert far.more(2, 20 * MB, True, now=1) == 2  # 20 MB/s on 2: try 4
    assert far.more(4, 30 * MB, True, now=2) == 0  # their handshakes: this second is not judged
    assert far.more(4, 70 * MB, True, now=3) == 4  # 40 MB/s: try 8
    assert far.more(8, 100 * MB, True, now=4) == 0
    assert far.more(8, 180 * MB, True, now=5) == 0  # at the most
    near = Ramp(8, every=1, now=0)  # CPU-bound: more streams do not help
    assert near.more(2, 400 * MB, True, now=1) == 2
    assert near.more(4, 780 * MB, True, now=2) == 0
    assert near.more(4, 1200 * MB, True, now=3) == 0  # 420 MB/s is not a quarter more
    assert near.more(4, 2400 * MB, True, now=9) == 0  # and it stays there
    assert Ramp(8, every=1, now=0).more(2, 10 * MB, False, now=1) == 0  # nothing left to share


@pytest.mark.parametrize("bad", ["../escape.bin", "/etc/passwd", "a/../../b", ""])
def test_manifest_paths_outside_the_model_folder_are_refused(boxes, ssh_key, tmp_path, bad):
    box = boxes("evil")
    remote = box.root / "m"
    remote.mkdir()
    (remote / manifest.NAME).write_text(f"{'0' * 64}  5  {bad}\n")
    with pytest.raises(AbfleetError, match=r"unsafe path|malformed"):
        download(connector(box, ssh_key), str(remote), tmp_path / "got")
    assert not (tmp_path / "escape.bin").exists()
    assert [p for p in (tmp_path / "got").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("now", [b"B" * 1000, b"B" * 600], ids=["changed", "shorter"])
def test_a_file_that_does_not_match_its_manifest_is_never_put_in_place(
    now, boxes, ssh_key, tmp_path
):
    box = boxes("corrupt")
    remote = box.root / "m"
    remote.mkdir()
    (remote / "weights.bin").write_bytes(b"A" * 1000)
    manifest.write(remote)
    (remote / "weights.bin").write_bytes(now)  # changed after the manifest was written
    with pytest.raises(AbfleetError, match="does not match"):
        download(connector(box, ssh_key), str(remote), tmp_path / "got")
    assert not (tmp_path / "got" / "weights.bin").exists()


def test_manifest_is_sha256sum_format_with_sizes_beside_it_and_old_exports_still_parse(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b b.json").write_text("{}")
    entries = manifest.write(tmp_path)
    lines = (tmp_path / manifest.NAME).read_text().splitlines()
    assert lines == [f"{e.sha256}  {e.path}" for e in entries]  # exactly what sha256sum writes
    assert manifest.read(tmp_path) == entries and {e.size for e in entries} == {10, 2}
    legacy = "".join(f"{e.sha256}  {e.size}  {e.path}\n" for e in entries)
    assert manifest.parse(legacy) == entries
    (tmp_path / manifest.SIZES).write_text(f"10  {entries[0].path}\n")  # one size lost
    with pytest.raises(AbfleetError, match=r"gives no size for sub/b b\.json"):
        manifest.read(tmp_path)


def test_every_stream_offers_the_key_from_home_not_the_passwd_entrys(
    box_with_model, ssh_key, model_files, tmp_path, monkeypatch
):
    """No key configured: paramiko and the parallel ssh streams both take $HOME/.ssh's key.
    OpenSSH alone would look in the passwd entry's home (here /root, with no key)."""
    import shutil

    box, remote_dir = box_with_model
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(ssh_key, home / ".ssh" / "id_ed25519")
    shutil.copy(f"{ssh_key}.pub", home / ".ssh" / "id_ed25519.pub")
    monkeypatch.setenv("HOME", str(home))
    connect = connector(box, ssh_key)

    def no_key_configured():
        remote = connect()
        remote.target = SshTarget(**{**remote.target.__dict__, "key_file": None})
        return remote

    result = download(no_key_configured, remote_dir, tmp_path / "got", stream_count=4)
    assert result.method == "parallel" and result.bytes_transferred > 0
    assert sha(tmp_path / "got" / "config.json") == sha(model_files / "config.json")


def test_a_refused_key_is_an_auth_error_at_once_not_lost_connections(box_with_model, tmp_path):
    from abfleet.errors import SshAuthError
    from abfleet.ops.streams import ParallelFetch
    from abfleet.ops.transfer import ssh_command
    from sshbox import make_keypair

    box, remote_dir = box_with_model
    stranger = make_keypair(tmp_path / "keys", "stranger")
    known = known_hosts_file("test", "dl")
    target = SshTarget("127.0.0.1", box.port, "root", known, str(stranger))
    # paramiko (the first connection) says so at once ...
    with pytest.raises(SshAuthError, match="rejected your key"):
        SshRemote(target)
    # ... and so do the streams' OpenSSH clients, which get the same key. The host key pinned
    # first, as the download's first connection does before its streams start.
    pinned = SshRemote(SshTarget("127.0.0.1", box.port, "root", known, str(box.authorized_key)))
    try:
        pinned.run(["true"])
    finally:
        pinned.close()
    cuts = []
    fetch = ParallelFetch(
        [*ssh_command(SimpleNamespace(target=target)), "-T", "--", "root@127.0.0.1"],
        remote_dir,
        tmp_path / "staging",
        manifest.read(Path(remote_dir)),
        4,
        lambda n: None,
        cuts.append,
        {},
    )
    started = time.monotonic()
    with pytest.raises(SshAuthError, match="refused abfleet's SSH key"):
        fetch.run()
    assert time.monotonic() - started < 20 and cuts == []


def test_files_not_in_the_export_are_moved_aside_never_left_to_load(
    box_with_model, ssh_key, tmp_path
):
    """An earlier export's single model.safetensors beside the new shards is what transformers
    would load first: after the download the folder holds exactly the manifest's files."""
    box, remote_dir = box_with_model
    target = tmp_path / "got"
    (target / "old").mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"weights of an earlier export")
    (target / "old" / "notes.txt").write_text("mine")
    result = download(connector(box, ssh_key), remote_dir, target, **options("parallel"))
    held = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    expected = set(SIZES) | {manifest.NAME, manifest.SIZES, ".abfleet-verified.json"}
    assert held == expected
    assert sorted(result.set_aside) == ["model.safetensors", "old/notes.txt"]
    aside = result.set_aside_to
    assert aside is not None and aside.parent == target.parent
    assert (aside / "model.safetensors").read_bytes() == b"weights of an earlier export"
    assert (aside / "old" / "notes.txt").read_text() == "mine"
    assert "not part of the export" in (aside / "NOTE.txt").read_text()
    assert manifest.verify(target, manifest.read(target)) == []
    # A second download of the same export finds nothing to move.
    again = download(connector(box, ssh_key), remote_dir, target, **options("parallel"))
    assert again.set_aside == [] and again.bytes_transferred == 0
