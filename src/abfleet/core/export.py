"""Export the chosen trial: apply it, save, prove the saved model loads and answers, checksum it,
and only then rename it into place, so a half-written model never looks finished."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from abfleet import __version__
from abfleet.core.chat import ChatFormatter
from abfleet.core.generate import greedy_generate
from abfleet.job import manifest

log = logging.getLogger(__name__)

RUN_FILE = "abfleet-run.json"


def versions() -> dict[str, str]:
    import optuna
    import transformers

    return {
        "abfleet": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "optuna": optuna.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def export_model(
    model: Any,
    tokenizer: Any,
    chat: ChatFormatter,
    target: Path,
    run_record: dict[str, Any],
    check_prompt: str,
) -> dict[str, Any]:
    """Save the model as it is now (already ablated) to target; return the load-back check."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        saved = time.monotonic()
        # Load back from disk and answer once: a model that saves but does not load is no result.
        back_tok = AutoTokenizer.from_pretrained(tmp)
        back = AutoModelForCausalLM.from_pretrained(tmp, dtype="auto")
        back.eval()
        answer = greedy_generate(
            back, ChatFormatter(back_tok, chat.system_prompt), [check_prompt], 24, 1
        )[0]
        del back
        check = {
            "prompt": check_prompt,
            "answer": answer.text,
            "save_seconds": round(saved - started, 2),
            "load_seconds": round(time.monotonic() - saved, 2),
        }
        record = {**run_record, "load_check": check, "versions": versions()}
        (tmp / RUN_FILE).write_text(
            json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8"
        )
        manifest.write(tmp)
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported to %s", target)
    return check


def _replace_dir(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
