"""`--storage head`: PostgreSQL on the first instance of a run, shared by every worker.

The controller makes a random password, hands it to the head in a 0600 file (never in a
command line), starts the server with infra/postgres-head.sh (TLS required, SCRAM passwords),
and fetches its self-signed certificate so that every client verifies the server
(sslmode=verify-ca). Workers on the head reach it on localhost; the others and the controller
through the port the provider exposed.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from abfleet.errors import ProviderError
from abfleet.fleet.deploy import Box, run_script
from abfleet.fleet.providers.base import Instance

CERT_NAME = "pg-server.crt"


@dataclass(frozen=True)
class HeadDb:
    password: str
    port: int  # inside the head instance
    public_host: str
    public_port: int  # as exposed by the provider
    local_cert: Path

    def _url(self, host: str, port: int, cert: str) -> str:
        return (
            f"postgresql+psycopg://abfleet:{quote(self.password, safe='')}@{host}:{port}/abfleet"
            f"?sslmode=verify-ca&sslrootcert={quote(cert, safe='/')}"
        )

    def url_on_head(self, run_dir: str) -> str:
        return self._url("127.0.0.1", self.port, f"{run_dir}/{CERT_NAME}")

    def url_elsewhere(self, run_dir: str) -> str:
        return self._url(self.public_host, self.public_port, f"{run_dir}/{CERT_NAME}")

    def url_for_controller(self) -> str:
        return self._url(self.public_host, self.public_port, str(self.local_cert))


def start(box: Box, instance: Instance, port: int, local_dir: Path, say) -> HeadDb:
    public_port = instance.ports.get(port)
    if not public_port or not instance.ssh_host:
        raise ProviderError(
            f"instance {instance.id} does not expose port {port}: the shared study cannot be reached"
        )
    password = secrets.token_urlsafe(24)
    box.remote.write_text(f"{box.root}/postgres-init-password", password + "\n", mode=0o600)
    say(f"starting PostgreSQL on instance {instance.id} (TLS, port {port} -> {public_port})")
    out = run_script(box.remote, "postgres-head.sh", box.root, str(port), timeout=900)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    local_dir.mkdir(parents=True, exist_ok=True)
    cert = local_dir / CERT_NAME
    box.remote.get(info["cert"], cert)
    return HeadDb(password, port, instance.ssh_host, int(public_port), cert)
