"""The model-side steps of a run that every worker shares through the study: the chat format,
the refusal directions and the baseline scores (computed once, stored in the study), and the
study itself, created once by whoever starts a run.

The run of one worker (run folder, status file, trials, export) is abfleet.worker.jobrun.
"""

from __future__ import annotations

import base64
import logging
import zlib
from typing import Any

import torch

from abfleet.core import search
from abfleet.core.ablation import decoder_layers
from abfleet.core.chat import ChatFormatter
from abfleet.core.directions import compute_directions, mean_residuals
from abfleet.core.evaluate import Evaluator, Scores
from abfleet.core.model import LoadedModel
from abfleet.core.reasoning import find_answer_prefix
from abfleet.errors import AbfleetError, UserError
from abfleet.job.spec import Job

log = logging.getLogger(__name__)


def search_settings(job: Job) -> search.SearchSettings:
    spec = job.spec.search
    return search.SearchSettings(
        n_trials=spec.n_trials,
        seed=spec.seed,
        n_startup_trials=job.n_startup_trials,
        heartbeat_interval=spec.heartbeat_interval,
        grace_period=3 * spec.heartbeat_interval,
    )


def chat_formatter(loaded: LoadedModel, system_prompt: str) -> ChatFormatter:
    try:
        return ChatFormatter(loaded.tokenizer, system_prompt)
    except ValueError as exc:
        raise UserError(f"{loaded.source.display}: {exc}") from exc


def _encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    raw = zlib.compress(t.contiguous().to(torch.float32).numpy().tobytes())
    return {"shape": list(t.shape), "data": base64.b64encode(raw).decode("ascii")}


def _decode_tensor(d: dict[str, Any]) -> torch.Tensor:
    import numpy as np

    raw = zlib.decompress(base64.b64decode(d["data"]))
    return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).reshape(d["shape"])


def shared_directions(
    study: Any,
    storage: Any,
    loaded: LoadedModel,
    chat: ChatFormatter,
    prompts: dict[str, list[str]],
    batch_size: int,
    projected: bool,
) -> torch.Tensor:
    """Computed by the first worker and kept in the study; later workers and resumes reuse them."""
    with search.BudgetLock(storage, study.study_name).hold():
        stored = study.user_attrs.get("directions")
        if stored:
            directions = _decode_tensor(stored)
            log.info("using the directions stored in the study")
        else:
            mean_bad = mean_residuals(loaded.model, chat, prompts["bad"], batch_size)
            mean_good = mean_residuals(loaded.model, chat, prompts["good"], batch_size)
            directions = compute_directions(mean_bad, mean_good, projected)
            study.set_user_attr("directions", _encode_tensor(directions))
    expected = len(decoder_layers(loaded.model)) + 1
    if directions.shape[0] != expected:
        raise AbfleetError(
            f"the study's directions have {directions.shape[0]} rows, the model needs {expected}: "
            "this study belongs to another model"
        )
    return directions


def _precision_label(p: dict[str, Any]) -> str:
    q = p.get("quantization") or "none"
    return p.get("dtype", "?") if q == "none" else f"{q} ({p.get('dtype', '?')})"


def shared_precision(study: Any, storage: Any, loaded: LoadedModel, quantization: str) -> None:
    """The precision the study is searched at, kept by its first worker: a worker or a resume
    that loads the model otherwise (another dtype on another device, or another quantization)
    would mix directions, baselines and scores of two different models, so it is refused."""
    here = {"dtype": loaded.dtype, "quantization": quantization}
    with search.BudgetLock(storage, study.study_name).hold():
        stored = study.user_attrs.get("precision")
        if not stored:
            study.set_user_attr("precision", here)
            return
    if stored != here:
        raise UserError(
            f"study {study.study_name!r} was searched with the model at "
            f"{_precision_label(stored)} and this run loads it at {_precision_label(here)}: its "
            "directions, baseline and scores do not carry over; start a new study with "
            f"--study NAME, or load the model as the study did"
        )


def shared_answer_prefix(
    study: Any,
    storage: Any,
    loaded: LoadedModel,
    chat: ChatFormatter,
    prompts: list[str],
    batch_size: int,
) -> str:
    """The think block every answer of this model starts with ("" for most models), found once
    per study so that every worker scores after the same prefix."""
    with search.BudgetLock(storage, study.study_name).hold():
        stored = study.user_attrs.get("answer_prefix")
        if isinstance(stored, str):
            return stored
        prefix = find_answer_prefix(loaded.model, chat, prompts, batch_size)
        study.set_user_attr("answer_prefix", prefix)
        return prefix


def shared_baseline(study: Any, storage: Any, evaluator: Evaluator) -> dict[str, Any]:
    """Scores of the unmodified model (the "before" figures), computed once per study."""
    with search.BudgetLock(storage, study.study_name).hold():
        stored = study.user_attrs.get("baseline")
        if stored:
            return stored
        scores: Scores = evaluator.score()
        data = scores.to_dict()
        study.set_user_attr("baseline", data)
        return data


def create_shared_study(
    job: Job, url: str, resume: bool = False, prompts: dict[str, list[str]] | None = None
) -> str:
    """The controller creates a shared study once, before any worker starts; workers only load it.

    Opening the storage here is also the check that it is reachable with these credentials,
    done before anything is rented. Returns the job's fingerprint.
    """
    fingerprint = job.fingerprint(prompts if prompts is not None else job.load_all_prompts())
    settings = search_settings(job)
    storage = search.open_storage(url, settings)
    try:
        search.create_or_load_study(
            storage,
            job.study_name,
            fingerprint,
            search.make_sampler(settings),
            allow_mismatch=resume,
        )
    finally:
        storage.engine.dispose()
    return fingerprint
