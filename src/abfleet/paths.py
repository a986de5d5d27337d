"""Where abfleet keeps its own files on the controller: data (ledger, host keys), cache, config.

Each can be moved with an environment variable, which the tests use to stay in a temp dir.
"""

from __future__ import annotations

import os
from pathlib import Path


def _base(env: str, xdg: str, fallback: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    root = os.environ.get(xdg) or str(Path.home() / fallback)
    return Path(root).expanduser() / "abfleet"


def data_dir() -> Path:
    """Ledger, pinned host keys, local run folders of cloud runs."""
    return _base("ABFLEET_DATA_DIR", "XDG_DATA_HOME", ".local/share")


def cache_dir() -> Path:
    """Rebuildable things: the demo model, built wheels."""
    return _base("ABFLEET_CACHE_DIR", "XDG_CACHE_HOME", ".cache")


def config_dir() -> Path:
    """The user's config.toml (SSH key, provider defaults)."""
    return _base("ABFLEET_CONFIG_DIR", "XDG_CONFIG_HOME", ".config")


def local_run_dir(run: str) -> Path:
    """The controller's folder of a cloud run: the job as sent, backups, the downloaded model."""
    return data_dir() / "runs" / run
