"""A real PostgreSQL server for the tests: the system's binaries (tests/run installs the Debian
package), run as the `postgres` user on a free port, with password authentication."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from sshbox import free_port


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError(
            "no PostgreSQL server binaries: apt-get install postgresql (tests/run does)"
        )
    return Path(found[-1]).parent


def _as_postgres(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = list(argv)
    if os.getuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


class PgServer:
    def __init__(self) -> None:
        # Not under pytest's tmp dirs: those are root-only, and the server runs as postgres.
        self.dir = Path(tempfile.mkdtemp(prefix="abfleet-pg-", dir="/tmp"))
        self.port = free_port()
        self.user = "abfleet"
        self.password = secrets.token_urlsafe(16)
        self.database = "abfleet"
        if os.getuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.dir.chmod(0o700)
        self.data = self.dir / "data"

    def start(self) -> PgServer:
        bin_dir = pg_bin()
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if os.getuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        pwfile.chmod(0o600)
        _as_postgres(
            str(bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            f"--pwfile={pwfile}",
            "-A",
            "scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.dir}'\n"
                "fsync = off\nmax_connections = 100\n"
            )
        _as_postgres(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )
        self._createdb(self.database)
        return self

    def _createdb(self, name: str) -> None:
        _as_postgres(
            str(pg_bin() / "createdb"),
            "-h",
            str(self.dir),
            "-p",
            str(self.port),
            "-U",
            self.user,
            name,
            env={"PGPASSWORD": self.password},
        )

    def url(self, password: str | None = None, database: str | None = None) -> str:
        return f"postgresql://{self.user}:{password or self.password}@127.0.0.1:{self.port}/{database or self.database}"

    def new_database(self) -> str:
        """A fresh database on this server; returns its URL."""
        name = "t_" + secrets.token_hex(6)
        self._createdb(name)
        return self.url(database=name)

    def stop(self) -> None:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(pg_bin() / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ]
            if os.getuid() == 0
            else [str(pg_bin() / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(self.dir, ignore_errors=True)
