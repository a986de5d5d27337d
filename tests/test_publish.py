"""`abfleet push` and the box's --push-to-hub against a local stand-in of the Hub's upload
endpoints (tests/fakehub.py), driven by the real huggingface_hub client over HTTP."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from abfleet.job import manifest
from conftest import abfleet_env, write_job
from fakehub import TOKEN, FakeHub


@pytest.fixture
def hub(tmp_path):
    with FakeHub(tmp_path / "hub") as server:
        yield server


def _hub_env(hub: FakeHub, token: str | None = TOKEN) -> dict[str, str]:
    env = abfleet_env(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1")
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_OFFLINE", None)  # the suite's default: no hub at all
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def _abfleet(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "abfleet", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_push_uploads_exactly_the_verified_export_with_its_card(finished_run, hub, tmp_path):
    run, result = finished_run
    model = run.model_dir
    proc = _abfleet(
        "push", str(run.path), "--repo", "me/tiny-abliterated", "--private", "--yes",
        env=_hub_env(hub),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "pushed to" in proc.stdout
    state = hub.state
    assert state.repos["me/tiny-abliterated"]["visibility"] == "private"
    pushed = state.repo_dir("me/tiny-abliterated")
    entries = manifest.read(model)
    names = {p.relative_to(pushed).as_posix() for p in pushed.rglob("*") if p.is_file()}
    assert names == {e.path for e in entries} | {manifest.NAME, manifest.SIZES}
    for e in entries:  # bit for bit what the manifest vouches for
        assert _sha(pushed / e.path) == e.sha256, e.path
    # Large and binary files went through LFS (uploaded to the object store, then committed).
    assert any(method == "PUT" for method, _ in state.calls)

    card = (pushed / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["license"] == "apache-2.0"  # carried from the base model's card
    assert "abliterated" in meta["tags"] and meta["library_name"] == "transformers"
    assert "base_model" not in meta  # a local directory is not a Hub id
    assert f"{result.baseline['refusals']}/{result.baseline['n_bad']}" in card
    assert f"{result.chosen['refusals']}/{result.chosen['n_bad']}" in card

    # The token went in a header only: never in argv, output or the files pushed.
    assert state.auth_seen and all(a == f"Bearer {TOKEN}" for a in state.auth_seen)
    assert TOKEN not in proc.stdout + proc.stderr
    assert not any(TOKEN.encode() in p.read_bytes() for p in pushed.rglob("*") if p.is_file())

    # Pushing again sends no file content: the objects are already there.
    puts = sum(method == "PUT" for method, _ in state.calls)
    again = _abfleet(
        "push", str(model), "--repo", "me/tiny-abliterated", "--yes", env=_hub_env(hub)
    )
    assert again.returncode == 0, again.stderr
    assert sum(method == "PUT" for method, _ in state.calls) == puts


def test_push_refuses_a_changed_export_or_a_missing_token_before_any_upload(
    finished_run, hub, tmp_path
):
    run, _ = finished_run
    copy = tmp_path / "model"
    shutil.copytree(run.model_dir, copy)
    weights = next(copy.glob("*.safetensors"))
    with open(weights, "r+b") as handle:  # one flipped byte
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (("push", str(copy), "--repo", "me/x", "--yes"), _hub_env(hub), "differ from MANIFEST"),
        (("push", str(run.path), "--repo", "me/x", "--yes"), _hub_env(hub, None), "HF_TOKEN"),
        (("push", str(run.path), "--repo", "not a repo", "--yes"), _hub_env(hub), "OWNER/NAME"),
        (("push", str(empty), "--repo", "me/x", "--yes"), _hub_env(hub), "not a finished"),
    ]
    for args, env, expected in cases:
        proc = _abfleet(*args, env=env)
        assert proc.returncode != 0 and expected in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert hub.state.calls == []  # nothing reached the Hub

    wrong = _abfleet(
        "push", str(run.path), "--repo", "me/x", "--yes", env=_hub_env(hub, "hf_wrong")
    )
    assert wrong.returncode != 0 and "HTTP 401" in wrong.stderr
    assert "hf_wrong" not in wrong.stderr


def test_run_with_push_to_hub_pushes_from_where_it_ran(tiny_model_dir, hub, tmp_path):
    """The worker pushes the export itself (on a box: no download needed)."""
    job = write_job(tmp_path / "job", str(tiny_model_dir), n_trials=2)
    out = tmp_path / "run"
    args = ("run", str(job), "--output", str(out), "--push-to-hub", "team/from-box")
    no_token = _abfleet(*args, env=_hub_env(hub, None))
    assert no_token.returncode != 0 and "HF_TOKEN" in no_token.stderr  # before any trial
    assert not out.exists() and hub.state.calls == []

    proc = _abfleet(*args, "--push-private", env=_hub_env(hub))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pushed to" in proc.stdout
    assert hub.state.repos["team/from-box"]["visibility"] == "private"
    pushed = hub.state.repo_dir("team/from-box")
    for e in manifest.read(out / "model"):
        assert _sha(pushed / e.path) == e.sha256, e.path
    outcome = json.loads((out / "push.json").read_text())  # what status and watch show
    assert outcome["repo"] == "team/from-box" and outcome["url"] and not outcome["error"]

    # A Hub that cannot be reached does not fail the run: the export stays, and the command
    # that pushes it later is on screen.
    unreachable = {**_hub_env(hub), "HF_ENDPOINT": "http://127.0.0.1:9"}
    down = _abfleet(*args, "--trials", "3", env=unreachable)
    assert down.returncode == 0, down.stderr[-3000:]
    assert "push failed" in down.stdout and f"abfleet push {out}" in down.stdout
    assert json.loads((out / "push.json").read_text())["error"]
    assert (out / "model" / manifest.NAME).is_file()
