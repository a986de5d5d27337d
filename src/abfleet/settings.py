"""Controller settings: config/defaults.toml, overridden by ~/.config/abfleet/config.toml.

The user file holds no secrets by design: the Vast.ai key is read by the vastai SDK from
VAST_API_KEY or its own key file, and never passes through abfleet's argv or logs.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from abfleet.errors import UserError
from abfleet.paths import config_dir
from abfleet.resources import resource_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VastSettings(_Section):
    image: str
    min_reliability: float = Field(ge=0, le=1)
    min_inet_down_mbps: float = Field(ge=0)
    min_cuda: float = Field(ge=0)
    verified: bool
    boot_timeout_s: float = Field(gt=0)
    poll_s: float = Field(gt=0)
    server_url: str | None = None  # tests point the SDK at a local fake
    postgres_port: int = Field(
        default=5432, gt=0, lt=65536
    )  # the head's Postgres, inside its container


class SshSettings(_Section):
    key: str
    user: str
    connect_timeout_s: float = Field(gt=0)
    keepalive_s: int = Field(ge=0)


class SizingSettings(_Section):
    disk_overhead_gb: float
    min_disk_by_params_b: list[tuple[float, float]]
    prompt_tokens: int
    default_batch_size: int
    usable_fraction: float = Field(gt=0, le=1)
    cuda_context_gb: float


class GuardianSettings(_Section):
    """The box guardian's timings (see worker/guardian.py), sent to each box with its terms."""

    poll_s: float = Field(gt=0)
    hang_s: float = Field(gt=0)
    lease_s: float = Field(gt=0)
    budget_window_s: float = Field(ge=0)
    retry_first_s: float = Field(gt=0)
    retry_max_s: float = Field(gt=0)
    peers_wait_s: float = Field(ge=0)


class Settings(_Section):
    vast: VastSettings
    ssh: SshSettings
    sizing: SizingSettings
    guardian: GuardianSettings


def user_config_file() -> Path:
    return config_dir() / "config.toml"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


@functools.cache
def _load(user_file: str) -> Settings:
    data = tomllib.loads((resource_path("config") / "defaults.toml").read_text(encoding="utf-8"))
    path = Path(user_file)
    if path.is_file():
        try:
            data = _merge(data, tomllib.loads(path.read_text(encoding="utf-8")))
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path} is not valid TOML: {exc}") from exc
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise UserError(f"{path}: {where}: {err['msg']}") from None


def settings() -> Settings:
    return _load(str(user_config_file()))
