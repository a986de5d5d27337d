"""Real OpenSSH servers on 127.0.0.1 standing in for rented boxes.

Each box is an `sshd` on a free port with a throwaway host key, accepting one test key for root,
with its workspace in a temp dir (passed to abfleet through SetEnv ABFLEET_REMOTE_ROOT), and the
test interpreter as the box's Python with torch (ABFLEET_PYTHON): nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_keypair(directory: Path, name: str = "id_ed25519") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / name
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    key.chmod(0o600)
    return key


@dataclass
class SshBox:
    directory: Path
    port: int
    authorized_key: Path
    python: str = sys.executable  # the box's Python with torch (ABFLEET_PYTHON)
    env: dict[str, str] = field(default_factory=dict)  # more of the sessions' environment
    listen: tuple[str, ...] = ("127.0.0.1",)  # the first is where start() checks it answers
    wrap: list[str] = field(default_factory=list)  # e.g. `ip netns exec NAME`: sshd runs in it
    root: Path = field(init=False)
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.root = self.directory / "workspace"
        self.root.mkdir(parents=True, exist_ok=True)
        host_key = self.directory / "host_ed25519"
        if not host_key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True
            )
        (self.directory / "authorized_keys").write_text(
            Path(str(self.authorized_key) + ".pub").read_text()
        )
        python = self.python
        extra = "".join(f" {k}={v}" for k, v in sorted(self.env.items()))
        path = os.pathsep.join(
            [str(Path(python).parent), "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        )
        listen = "".join(f"ListenAddress {a}\n" for a in self.listen)
        (self.directory / "sshd_config").write_text(
            f"""Port {self.port}
{listen}HostKey {host_key}
PidFile {self.directory}/sshd.pid
AuthorizedKeysFile {self.directory}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PrintMotd no
Subsystem sftp internal-sftp
SetEnv ABFLEET_REMOTE_ROOT={self.root} ABFLEET_PYTHON={python} PATH={path} HOME={self.directory}/home{extra}
"""
        )
        (self.directory / "home").mkdir(exist_ok=True)

    def start(self) -> SshBox:
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
        self.proc = subprocess.Popen(
            [*self.wrap, SSHD, "-D", "-e", "-f", str(self.directory / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.directory / "sshd.log", "ab"),  # noqa: SIM115 - lives as long as the server
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.listen[0], self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not start; see {self.directory / 'sshd.log'}")

    def kill(self) -> None:
        """Kill the server and every session it forked (a cut connection, as on a real box)."""
        import psutil

        if self.proc is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            listener = psutil.Process(self.proc.pid)
            for child in listener.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            listener.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def container_env(self) -> dict[str, str]:
        """The container's environment, as its onstart command gets it."""
        path = os.pathsep.join(
            [str(Path(self.python).parent), "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin"]
        )
        return {
            "ABFLEET_REMOTE_ROOT": str(self.root),
            "ABFLEET_PYTHON": self.python,
            "PATH": path,
            "HOME": str(self.directory / "home"),
            **self.env,
        }

    def run_onstart(self, script: str) -> None:
        """Run the instance's onstart command in the box, as Vast does on each container start."""
        with open(self.directory / "onstart.log", "ab") as log:
            subprocess.run(
                ["bash", "-c", script],
                env=self.container_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                timeout=120,
                check=False,
            )

    def stop_workers(self) -> None:
        """Kill every process the box started: its workers and its guardian (by their pid
        files in its workspace), as a stopped container loses them."""
        import psutil

        # The guardian first: it would start the workers again.
        for pidfile in [self.root / "guardian.pid", *self.root.rglob("worker-*.pid")]:
            with contextlib.suppress(ValueError, OSError, ProcessLookupError, PermissionError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        # Then anything else run from the box's folder (a guardian whose pid file was rewritten,
        # a worker started a moment ago): left behind, it would load the CPU for later tests.
        # sshd and the Postgres are stopped by their own steps.
        mine = str(self.directory)
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            name = proc.info["name"] or ""
            if name.startswith(("sshd", "postgres", "postmaster")) or proc.pid == os.getpid():
                continue
            if any(mine in part for part in proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()

    def stop_postgres(self, keep_data: bool = False) -> None:
        """A head Postgres (infra/postgres-head.sh) outlives its SSH session: stop it too, and
        remove its data unless the box's disk stays (a stopped or rebooted instance)."""
        import glob
        import hashlib

        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
        for data in [
            self.root / "postgres" / "data",
            Path(f"/var/lib/abfleet-postgres/{digest}/data"),
        ]:
            if (data / "PG_VERSION").is_file():
                pg_ctl = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))[-1]
                subprocess.run(
                    [
                        "runuser",
                        "-u",
                        "postgres",
                        "--",
                        pg_ctl,
                        "-D",
                        str(data),
                        "-m",
                        "immediate",
                        "stop",
                    ],
                    capture_output=True,
                    check=False,
                )
                if not keep_data:
                    shutil.rmtree(data.parent, ignore_errors=True)

    def halt(self) -> None:
        """The container stops (its disk stays): every process dies, the Postgres with it."""
        self.stop_workers()
        self.stop_postgres(keep_data=True)
        self.kill()

    def close(self) -> None:
        """The box is gone (destroyed, or the test is over): its Postgres data too."""
        self.stop_workers()
        self.stop_postgres()
        self.kill()
