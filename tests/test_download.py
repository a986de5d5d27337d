"""Resumable, verified download over a real SSH server that is killed mid-transfer."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from abfleet.errors import AbfleetError
from abfleet.fleet.remote import SshRemote, SshTarget, known_hosts_file
from abfleet.job import manifest
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
    staging = target / STAGING
    return (
        sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) if staging.exists() else 0
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["rsync", "sftp"])
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
    result = download(connector(box, ssh_key), remote_dir, target, prefer_rsync=method == "rsync")
    thread.join(timeout=60)
    assert result.method == method
    assert len(cuts) == 2 and result.attempts >= 3, (cuts, result)
    for rel in SIZES:
        assert sha(target / rel) == sha(model_files / rel), rel
    assert result.resent_fraction < 0.05, result
    assert not (target / STAGING).exists()

    again = download(connector(box, ssh_key), remote_dir, target, prefer_rsync=method == "rsync")
    assert again.bytes_transferred == 0 and again.skipped == len(SIZES) and again.method == "none"


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


def test_a_file_that_does_not_match_its_manifest_is_never_put_in_place(boxes, ssh_key, tmp_path):
    box = boxes("corrupt")
    remote = box.root / "m"
    remote.mkdir()
    (remote / "weights.bin").write_bytes(b"A" * 1000)
    manifest.write(remote)
    (remote / "weights.bin").write_bytes(b"B" * 1000)  # changed after the manifest was written
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
