"""One session type for talking to a box: run a command, move a file. Over SSH (fabric/paramiko)
for rented and user-provided machines, or directly for this machine.

Commands are argument lists, quoted with shlex.join: a model name or path with shell
metacharacters reaches the box as data, never as shell code. Secrets travel as file contents
(an env file written with mode 0600 before anything is written to it), never in a command line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import paramiko

from abfleet.errors import RemoteError, SshAuthError
from abfleet.paths import data_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandResult:
    code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0


class Remote(Protocol):
    label: str

    def run(
        self, argv: list[str], timeout: float | None = None, check: bool = True
    ) -> CommandResult: ...

    def put(self, local: Path, remote: str) -> None: ...

    def get(self, remote: str, local: Path) -> None: ...

    def write_text(self, remote: str, text: str, mode: int = 0o644) -> None: ...

    def close(self) -> None: ...


def _check(result: CommandResult, argv: list[str], label: str) -> CommandResult:
    if result.code != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RemoteError(
            f"on {label}: `{shlex.join(argv)[:120]}` failed ({result.code}): {' | '.join(tail)}"
        )
    return result


# ---------------------------------------------------------------------------------------------
# SSH


def known_hosts_file(provider: str, instance_id: str) -> Path:
    """Host keys are pinned per instance: a gateway address reused by a later instance does not
    inherit (or break) an earlier one's key."""
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in f"{provider}-{instance_id}")
    return data_dir() / "known_hosts" / safe


class PinOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Accept and save the key the first time; paramiko itself rejects a different key later."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        client.get_host_keys().save(str(tmp))
        tmp.replace(self.path)
        log.info("pinned host key %s for %s in %s", key.get_name(), hostname, self.path)


@dataclass(frozen=True)
class SshTarget:
    host: str
    port: int
    user: str
    known_hosts: Path
    key_file: str | None = None
    connect_timeout: float = 20.0
    keepalive: int = 15
    instance_id: str = ""  # the provider's id, for messages that name a command to run

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def default_key_files() -> list[Path]:
    ssh = Path.home() / ".ssh"
    return [p for p in (ssh / "id_ed25519", ssh / "id_ecdsa", ssh / "id_rsa") if p.is_file()]


def identity_files(target: SshTarget) -> list[str]:
    """The private keys every connection offers, the same for paramiko, rsync's ssh and the
    parallel streams: the configured key, else the default keys under $HOME/.ssh (whose
    public halves `public_keys` hands to the box). OpenSSH on its own would read the passwd
    entry's home instead, which differs under sudo, in containers and in CI."""
    return [target.key_file] if target.key_file else [str(p) for p in default_key_files()]


def public_keys() -> list[str]:
    """The public halves of the keys abfleet logs in with: the configured key (its .pub, or
    derived from it), else the default key files, else the agent's keys. A rented box is given
    these through the provider's API, so it accepts them whatever the account holds."""
    from abfleet.settings import settings

    ssh = settings().ssh
    files = [Path(ssh.key).expanduser()] if ssh.key else default_key_files()
    found = []
    for key in files:
        pub = Path(f"{key}.pub")
        if pub.is_file():
            found.append(" ".join(pub.read_text(encoding="utf-8").split()[:2]))
            continue
        with contextlib.suppress(Exception):  # unreadable or encrypted: the agent may have it
            private = paramiko.PKey.from_path(key)
            found.append(f"{private.get_name()} {private.get_base64()}")
    if not found:
        with contextlib.suppress(Exception):
            found = [f"{k.get_name()} {k.get_base64()}" for k in paramiko.Agent().get_keys()]
    return found


class SshRemote:
    def __init__(self, target: SshTarget) -> None:
        from fabric import Config, Connection

        self.target = target
        self.label = target.label
        keys = identity_files(target)
        self._keys = [k for k in keys if k]
        config = Config(overrides={"load_ssh_configs": False})
        self.conn = Connection(
            target.host,
            user=target.user,
            port=target.port,
            config=config,
            connect_timeout=int(target.connect_timeout),
            connect_kwargs={
                "key_filename": self._keys,
                "allow_agent": True,
                "look_for_keys": False,
                "banner_timeout": 30,
            },
        )
        client = self.conn.client
        if target.known_hosts.is_file():
            client.load_host_keys(str(target.known_hosts))
        client.set_missing_host_key_policy(PinOnFirstUse(target.known_hosts))
        self._sftp: paramiko.SFTPClient | None = None
        self._open()

    def _open(self) -> None:
        try:
            self.conn.open()
        except paramiko.BadHostKeyException as exc:
            raise SshAuthError(
                f"the host key of {self.label} is not the one pinned when abfleet first connected "
                f"({exc.expected_key.get_name()} in {self.target.known_hosts}): refusing to connect. "
                "If this instance was really rebuilt, delete that file."
            ) from exc
        except paramiko.AuthenticationException as exc:
            raise SshAuthError(self._auth_hint()) from exc
        except paramiko.SSHException as exc:
            if "No authentication methods available" in str(exc) or "no keys" in str(exc).lower():
                raise SshAuthError(self._auth_hint()) from exc
            # paramiko says "Error reading SSH protocol banner", or later "No existing session",
            # when the port accepted the connection but no SSH server ever spoke on it.
            if "banner" in str(exc).lower() or "no existing session" in str(exc).lower():
                raise RemoteError(
                    f"cannot reach {self.label}: it accepted the connection but sent no SSH greeting within "
                    f"{self.target.connect_timeout:.0f} s (not an SSH port, or the box is overloaded)"
                ) from exc
            raise RemoteError(f"SSH to {self.label} failed: {exc}") from exc
        except TimeoutError as exc:
            raise RemoteError(
                f"cannot reach {self.label}: no answer within {self.target.connect_timeout:.0f} s "
                "(the box may still be booting, or its SSH port changed after a reboot: see abfleet status)"
            ) from exc
        except (OSError, paramiko.ssh_exception.NoValidConnectionsError) as exc:
            raise RemoteError(f"cannot reach {self.label}: {exc.strerror or exc}") from exc
        transport = self.conn.transport
        if transport is not None and self.target.keepalive:
            transport.set_keepalive(self.target.keepalive)

    def _auth_hint(self) -> str:
        agent_keys = []
        with contextlib.suppress(Exception):
            agent_keys = list(paramiko.Agent().get_keys())
        if not self._keys and not agent_keys:
            return (
                f"SSH to {self.label}: no key loaded. Start ssh-agent and `ssh-add` your key, or set "
                '[ssh] key = "~/.ssh/..." in ~/.config/abfleet/config.toml'
            )
        for key in self._keys:
            mode = stat.S_IMODE(os.stat(key).st_mode)
            if mode & 0o077:
                return f"SSH to {self.label}: {key} has permissions {mode:04o}, which are too open: chmod 600 {key}"
        names = ", ".join(
            [Path(k).name for k in self._keys] + [f"agent:{k.get_name()}" for k in agent_keys]
        )
        return (
            f"SSH to {self.label} rejected your key ({names}): it is probably not attached to this "
            "instance. On Vast.ai add the public key to your account before creating, or run "
            f"`abfleet attach-key {self.target.instance_id or 'INSTANCE'}` for an existing instance"
        )

    def run(
        self, argv: list[str], timeout: float | None = None, check: bool = True
    ) -> CommandResult:
        command = shlex.join(argv)
        try:
            r = self.conn.run(command, hide=True, warn=True, in_stream=False, timeout=timeout)
        except Exception as exc:
            raise RemoteError(
                f"on {self.label}: `{command[:120]}` did not complete: {exc}"
            ) from exc
        result = CommandResult(r.exited, r.stdout, r.stderr)
        return _check(result, argv, self.label) if check else result

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self.conn.client.open_sftp()
        return self._sftp

    def put(self, local: Path, remote: str) -> None:
        self.sftp.put(str(local), remote)

    def get(self, remote: str, local: Path) -> None:
        self.sftp.get(remote, str(local))

    def write_text(self, remote: str, text: str, mode: int = 0o644) -> None:
        # The mode is set while the file is still empty: a secret is never readable by others.
        with self.sftp.open(remote, "w") as handle:
            self.sftp.chmod(remote, mode)
            handle.write(text.encode("utf-8"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._sftp is not None:
                self._sftp.close()
        with contextlib.suppress(Exception):
            self.conn.close()


# ---------------------------------------------------------------------------------------------
# This machine


class LocalRemote:
    """The same operations on this machine, for the `local` provider."""

    label = "this machine"

    def run(
        self, argv: list[str], timeout: float | None = None, check: bool = True
    ) -> CommandResult:
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as exc:
            raise RemoteError(f"`{shlex.join(argv)[:120]}` timed out after {timeout} s") from exc
        except FileNotFoundError:
            # What a shell on a box answers for a missing program, so callers see one behaviour.
            result = CommandResult(127, "", f"{argv[0]}: command not found")
            return _check(result, argv, self.label) if check else result
        result = CommandResult(proc.returncode, proc.stdout, proc.stderr)
        return _check(result, argv, self.label) if check else result

    def put(self, local: Path, remote: str) -> None:
        Path(remote).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, remote)

    def get(self, remote: str, local: Path) -> None:
        shutil.copyfile(remote, local)

    def write_text(self, remote: str, text: str, mode: int = 0o644) -> None:
        fd = os.open(remote, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.chmod(remote, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)

    def close(self) -> None:
        pass


def open_remote(
    instance: Any, provider: str, key_file: str | None = None, timeout: float | None = None
) -> Remote:
    """Connect to an instance record or provider Instance (anything with ssh_host/port/user)."""
    from abfleet.settings import settings

    ssh = settings().ssh
    if not getattr(instance, "ssh_host", None) or not getattr(instance, "ssh_port", None):
        raise RemoteError(
            f"instance {getattr(instance, 'id', None) or getattr(instance, 'instance_id', '?')} "
            "has no SSH address yet (still starting?)"
        )
    target = SshTarget(
        host=instance.ssh_host,
        port=int(instance.ssh_port),
        user=getattr(instance, "ssh_user", None) or ssh.user,
        known_hosts=known_hosts_file(
            provider, str(getattr(instance, "id", None) or instance.instance_id)
        ),
        key_file=key_file or (str(Path(ssh.key).expanduser()) if ssh.key else None),
        connect_timeout=timeout or ssh.connect_timeout_s,
        keepalive=ssh.keepalive_s,
        instance_id=str(getattr(instance, "id", None) or instance.instance_id),
    )
    return SshRemote(target)
