"""Setting abfleet up on a box reuses the torch of the box's Python, whatever kind of Python it is.

The box's Python here is a virtual environment whose torch is its own (a link to this suite's
torch, so nothing is copied): a box venv that saw the *base* interpreter's packages instead, as
`venv --system-site-packages` from a venv's Python does, would import another torch or install a
new one (5.6 GB of CUDA wheels).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from abfleet.fleet.deploy import build_wheel, install, locate
from abfleet.fleet.remote import SshRemote, SshTarget, known_hosts_file
from sshbox import SshBox, free_port

MAX_BOX_VENV_MB = 300


def make_chosen_python(directory: Path) -> tuple[Path, Path]:
    """A venv with a torch of its own and this suite's other packages on its path.

    Returns its python and the torch/__init__.py it imports."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True)
    python = directory / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    real_torch = Path(torch.__file__).parent
    (purelib / "torch").symlink_to(real_torch, target_is_directory=True)
    [dist_info] = real_torch.parent.glob(f"torch-{torch.__version__.split('+')[0]}*.dist-info")
    (purelib / dist_info.name).symlink_to(dist_info, target_is_directory=True)
    # Everything else (transformers, optuna, pip, ...) from this suite's environment, after its own.
    here = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    (purelib / "suite.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(here)))
    return python, purelib / "torch" / "__init__.py"


def du_mb(path: Path) -> float:
    """Bytes on disk under path, following no links (a linked torch would count otherwise)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = Path(root) / name
            if not full.is_symlink():
                total += full.stat().st_size
    return total / 1e6


def test_box_venv_reuses_the_torch_of_a_venv_python_and_stays_small(tmp_path, ssh_key):
    python, torch_init = make_chosen_python(tmp_path / "chosen-env")
    box = SshBox(tmp_path / "box", free_port(), ssh_key, python=str(python)).start()
    remote = SshRemote(
        SshTarget("127.0.0.1", box.port, "root", known_hosts_file("test", "venv"), str(ssh_key), 5)
    )
    try:
        where = locate(remote)
        installed = install(where, build_wheel())
        assert f"torch {torch.__version__}" in installed.runtime
        assert str(torch_init.parent.parent) in installed.runtime
        assert installed.runtime.startswith(f"python {python}")

        venv = box.root / "venv"
        seen = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import torch; print(torch.__file__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert seen == str(torch_init)
        # Nothing of torch (or its CUDA libraries) was installed into the box venv.
        assert not list(venv.rglob("torch*/__init__.py")) and not list(venv.rglob("nvidia"))
        assert du_mb(venv) < MAX_BOX_VENV_MB, f"box venv takes {du_mb(venv):.0f} MB"
        # The worker itself runs on that torch.
        worker = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import abfleet.cli, torch, sys; print(torch.__file__)",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert worker.stdout.strip() == str(torch_init)

        # A second setup of the same build leaves the box as it is and still says what it uses.
        before = (venv / "abfleet-python.json").stat().st_mtime_ns
        again = install(where, build_wheel())
        assert again == installed
        assert (venv / "abfleet-python.json").stat().st_mtime_ns == before
    finally:
        remote.close()
        box.close()


def test_an_older_box_venv_with_a_torch_of_its_own_is_rebuilt(tmp_path, ssh_key):
    """A venv left by an older abfleet (no record of its Python) may hold a second torch: it is
    replaced, not reused."""
    box = SshBox(tmp_path / "box", free_port(), ssh_key).start()
    remote = SshRemote(
        SshTarget("127.0.0.1", box.port, "root", known_hosts_file("test", "old"), str(ssh_key), 5)
    )
    try:
        venv = box.root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        [purelib] = venv.glob("lib/python*/site-packages")
        (purelib / "torch").mkdir()
        (purelib / "torch" / "__init__.py").write_text(
            "raise ImportError('a stale second torch')\n"
        )
        installed = install(locate(remote), build_wheel())
        assert f"torch {torch.__version__}" in installed.runtime
        assert not (purelib / "torch").exists()
    finally:
        remote.close()
        box.close()
