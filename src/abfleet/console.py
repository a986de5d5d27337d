"""The one rich Console for user-facing output, and how errors become one line and an exit code."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}")


def quiet_libraries() -> None:
    """Keep transformers/HF/Optuna chatter (progress bars, advisories) out of the user's view."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    for name in ("paramiko", "fabric", "invoke", "urllib3", "vastai", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_logging(verbose: bool, log_file: str | None = None) -> None:
    """Library code logs; the CLI decides where: a file for the worker, the console with -v."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    if verbose:
        from rich.logging import RichHandler

        root.addHandler(RichHandler(console=err_console, show_path=False, markup=False))
    elif not log_file:
        root.addHandler(logging.NullHandler())
    quiet_libraries()


def is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
