"""Ship abfleet to a box and start the worker there.

The exact local code travels as a wheel (built once per source hash), is installed into a venv
that reuses the image's torch, and must report the same version and source hash as the
controller before any job starts. The job goes as a self-contained folder (job.toml and its
prompt files, and the model itself when it is local), secrets as a 0600 env file.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from abfleet import __version__
from abfleet.buildinfo import version_string
from abfleet.errors import AbfleetError, RemoteError, UserError
from abfleet.fleet.remote import Remote
from abfleet.paths import cache_dir
from abfleet.resources import resource_path, source_root

log = logging.getLogger(__name__)


def infra_script(name: str) -> str:
    return (resource_path("infra") / name).read_text(encoding="utf-8")


def run_script(
    remote: Remote, name: str, *args: str, timeout: float | None = None, check: bool = True
):
    """Run infra/NAME on the box as `bash -c <text> NAME ARGS...`: arguments are never code."""
    return remote.run(["bash", "-c", infra_script(name), name, *args], timeout=timeout, check=check)


@dataclass(frozen=True)
class Box:
    remote: Remote
    root: str

    @property
    def abfleet(self) -> str:
        return f"{self.root}/venv/bin/abfleet"

    def run_dir(self, run: str) -> str:
        return f"{self.root}/runs/{run}"


def locate(remote: Remote) -> Box:
    root = run_script(remote, "remote-root.sh", timeout=60).stdout.strip().splitlines()[-1]
    if not root.startswith("/"):
        raise RemoteError(f"{remote.label} reported an unusable work folder {root!r}")
    return Box(remote, root)


# ---------------------------------------------------------------------------------------------
# The wheel


def build_wheel() -> Path:
    """A wheel of exactly the running code, cached by its source hash."""
    from abfleet.buildinfo import source_hash

    target = cache_dir() / "wheels" / source_hash()
    found = sorted(target.glob("abfleet-*.whl")) if target.is_dir() else []
    if found:
        return found[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        root = source_root()
        if root is not None:
            _pip_wheel(root, tmp)
        else:
            _repack_installed(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(target.glob("abfleet-*.whl"))[-1]


def _pip_wheel(root: Path, out: Path) -> None:
    base = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "-q",
        "--disable-pip-version-check",
        "-w",
        str(out),
    ]
    # Without build isolation when hatchling is already here: no download, seconds not minutes.
    try:
        import hatchling  # noqa: F401

        cmd = [*base, "--no-build-isolation", str(root)]
    except ImportError:
        cmd = [*base, str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AbfleetError(
            f"building the abfleet wheel failed: {proc.stderr.strip().splitlines()[-1:]}"
        )


def _repack_installed(out: Path) -> None:
    """Rebuild the wheel of an installed (non-editable) abfleet from its RECORD."""
    from importlib.metadata import distribution

    dist = distribution("abfleet")
    files = [
        f for f in dist.files or [] if not str(f).endswith(".pyc") and "__pycache__" not in str(f)
    ]
    skip = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}
    name = f"abfleet-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(out / name, "w", zipfile.ZIP_DEFLATED) as zf:
        record = []
        for f in files:
            path = Path(str(f.locate()))
            rel = PurePosixPath(str(f))
            if rel.parts[0] == ".." or rel.name in skip or not path.is_file():
                continue
            zf.write(path, str(rel))
            record.append(f"{rel},,")
        dist_info = next(PurePosixPath(str(f)).parts[0] for f in files if ".dist-info" in str(f))
        record.append(f"{dist_info}/RECORD,,")
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")


@dataclass(frozen=True)
class Installed:
    """What a box runs after setup: abfleet's build, and the Python and torch it reuses."""

    version: str
    runtime: str  # "python PATH (3.x), torch X (CUDA Y) from DIR"


RUNTIME_PREFIX = "runtime: "


def install(box: Box, wheel: Path, timeout: float = 1800) -> Installed:
    """Upload and install the wheel; fail unless the box reports this exact build.

    A box that already runs this exact build (same version and source hash) is left as it is.
    """
    here = version_string()
    runtime_file = f"{box.root}/venv/abfleet-runtime.txt"
    current = box.remote.run(
        [
            "bash",
            "-c",
            'cat "$1" 2>/dev/null; "$2" worker --version',
            "check",
            runtime_file,
            box.abfleet,
        ],
        timeout=120,
        check=False,
    )
    if current.ok and current.stdout.strip().splitlines()[-1:] == [here]:
        return Installed(here, _runtime(current.stdout))
    remote_wheel = f"{box.root}/wheels/{wheel.name}"
    box.remote.put(wheel, remote_wheel)
    result = run_script(
        box.remote, "bootstrap.sh", box.root, remote_wheel, timeout=timeout, check=False
    )
    if result.code == 3:
        raise RemoteError(f"{box.remote.label}: {result.stderr.strip()}")
    if result.code != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise RemoteError(f"installing abfleet on {box.remote.label} failed: {tail}")
    there = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if there != here:
        raise RemoteError(
            f"{box.remote.label} runs {there!r} after install, but this controller is {here!r}"
        )
    return Installed(there, _runtime(result.stdout))


def _runtime(stdout: str) -> str:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RUNTIME_PREFIX)]
    return lines[-1][len(RUNTIME_PREFIX) :] if lines else "unknown (set up by an older abfleet)"


# ---------------------------------------------------------------------------------------------
# Disk, files, env, workers


def free_disk_gb(box: Box) -> float:
    out = box.remote.run(["df", "-Pk", box.root], timeout=30).stdout.strip().splitlines()
    try:
        return int(out[-1].split()[3]) * 1024 / 1e9
    except (IndexError, ValueError) as exc:
        raise RemoteError(f"cannot read the free disk of {box.remote.label}: {out[-1:]}") from exc


def check_disk(box: Box, need_gb: float) -> float:
    free = free_disk_gb(box)
    if free < need_gb:
        raise UserError(
            f"{box.remote.label} has {free:.1f} GB free under {box.root}, but this job needs {need_gb:.1f} GB "
            "(model download + export): refusing to start a run that would fail while saving"
        )
    return free


def upload_tree(remote: Remote, local: Path, remote_dir: str) -> int:
    """Copy a folder to the box; returns bytes sent."""
    sent = 0
    dirs = sorted(
        {remote_dir}
        | {
            f"{remote_dir}/{p.relative_to(local).as_posix()}"
            for p in local.rglob("*")
            if p.is_dir()
        }
    )
    remote.run(["mkdir", "-p", *dirs], timeout=60)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        remote.put(path, f"{remote_dir}/{path.relative_to(local).as_posix()}")
        sent += path.stat().st_size
    return sent


def env_file_text(env: dict[str, str]) -> str:
    """KEY='value' lines for `set -a; . .env`: values single-quoted, so nothing in them runs."""
    lines = []
    for key, value in sorted(env.items()):
        if not key.isidentifier():
            raise UserError(f"environment variable name {key!r} is not valid")
        lines.append(f"{key}='" + value.replace("'", "'\"'\"'") + "'")
    return "\n".join(lines) + "\n"


def write_env(box: Box, run_dir: str, env: dict[str, str]) -> None:
    box.remote.write_text(f"{run_dir}/.env", env_file_text(env), mode=0o600)


def hub_token_reason(job: Any, exports: bool) -> str | None:
    """Why a box of this job needs the Hugging Face token, or None: a push (from the box that
    exports), or a model or judge from the Hub that is gated (or whose gating cannot be read
    from here: better a token on the box than a run that fails to load)."""
    from abfleet.job.source import judge_source, resolve_source

    if not (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        return None
    if exports and job.spec.output.push_to_hub:
        return f"the push to {job.spec.output.push_to_hub}"
    for what, source in (
        ("the model", resolve_source(job.spec.model)),
        ("the judge", judge_source(job.spec.evaluation.judge)),
    ):
        if source is None or source.kind != "hub":
            continue
        gated = _gated(source.location)
        if gated is None:
            return f"{what} {source.location} (whether it is gated cannot be read from here)"
        if gated:
            return f"{what} {source.location} is gated"
    return None


def _gated(repo: str) -> bool | None:
    """Whether a Hub model is gated (None: unknown), asked without the token."""
    try:
        from huggingface_hub import model_info

        return bool(model_info(repo, token=False).gated)
    except Exception:  # noqa: BLE001 - offline, rate-limited, private: unknown
        return None


def secret_env(reason: str | None) -> dict[str, str]:
    """Only what a worker needs: the Hugging Face token when `reason` says why (the guardian
    removes it from the box once the run is over). Never the Vast key."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return {"HF_TOKEN": token} if token and reason else {}


def start_worker(
    box: Box, run_dir: str, index: int, gpus: str = "", args: tuple[str, ...] = ()
) -> int:
    out = run_script(
        box.remote,
        "launch-worker.sh",
        box.root,
        run_dir,
        str(index),
        gpus,
        *args,
        timeout=120,
        check=False,
    )
    if out.code != 0:
        raise RemoteError(
            f"worker {index} did not start on {box.remote.label}: {out.stderr.strip()}"
        )
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise RemoteError(
            f"worker {index} on {box.remote.label} printed no pid: {out.stdout!r}"
        ) from exc


def signal_workers(remote: Remote, run_dir: str, signal: str = "TERM") -> list[int]:
    out = run_script(remote, "stop-workers.sh", run_dir, signal, timeout=60)
    return [int(x) for x in out.stdout.split()]


def stop_workers(
    remote: Remote, ledger, provider: str, instance_id: str, signal: str = "TERM"
) -> list[int]:
    pids = []
    for run in ledger.runs_on(provider, instance_id):
        if run.remote_dir:
            pids += signal_workers(remote, run.remote_dir, signal)
    return pids
