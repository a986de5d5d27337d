"""Export the chosen trial, prove the export gives the searched model's answers, checksum it, and
only then rename it into place, so a half-written model never looks finished.

The weights are merged into the source's safetensors shard by shard: a shard is read, its
touched tensors are edited in float32 and written back in the shard's dtype, the other files are
copied. Host memory stays near one shard whatever the model's size, and the GPU copy of the model
is never gathered into host RAM. A source that cannot be merged that way (a GGUF file, .bin
weights, a checkpoint whose tensor names differ from the loaded model's) is saved from memory
after writing the edit into the loaded weights.

The check: next-token log-probs of a few prompts from the model as searched (deltas on its
outputs) are kept; the search model is released; the export is loaded where the model ran, with
the run's dtype and quantization, and must give the same distributions (bounded KL). After a
quantized search the reference is the full-precision source with the trial's deltas and the
export is loaded at its own precision, where that fits (see export_model).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from abfleet import __version__
from abfleet.core.ablation import AblationParams, Ablator, orthogonalize_
from abfleet.core.chat import ChatFormatter
from abfleet.core.generate import encode_prompts, greedy_generate, next_token_logprobs
from abfleet.core.model import LoadedModel, ModelSource
from abfleet.errors import UserError
from abfleet.job import manifest

log = logging.getLogger(__name__)

RUN_FILE = "abfleet-run.json"
# Weight files other than the safetensors written here: copying them would ship unablated weights.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot")
_NOT_COPIED = {manifest.NAME, manifest.SIZES, RUN_FILE}
# KL (nats) allowed between the searched model and the loaded export, per prompt: float
# rounding of merged weights vs. deltas stays far below; re-quantizing merged weights does not.
KL_LIMIT = 0.01
# After a quantized search whose full-precision model cannot be loaded for the check: the
# re-quantized export against the searched (quantized) model. Quantizing edited weights anew
# gives other rounding than the search's quantized base plus its deltas: 0.45 nats on the 135M
# demo at bnb-4bit (less on larger models), so this limit only catches a merge gone wrong.
KL_LIMIT_REQUANTIZED = 1.0


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


@dataclass(frozen=True)
class TensorEdit:
    v: torch.Tensor
    w: float
    out_axis: int
    is_bias: bool


def export_model(
    loaded: LoadedModel,
    ablator: Ablator,
    params: AblationParams,
    directions: torch.Tensor,
    chat: ChatFormatter,
    target: Path,
    run_record: dict[str, Any],
    check_prompts: list[str],
    reload: Callable[[Path], LoadedModel],
    release: Callable[[], None],
    quantized: bool = False,
    batch_size: int = 8,
    measure: Callable[[Any], dict[str, Any]] | None = None,
    annotate: Callable[[dict[str, Any], Path], None] | None = None,
    extras: Callable[[Path, dict[str, Any]], None] | None = None,
    reload_shipped: Callable[[Path], LoadedModel] | None = None,
    full_reference: Callable[[list[list[int]]], torch.Tensor | None] | None = None,
) -> dict[str, Any]:
    """Write the trial's model to target and return the check's figures.

    release() must drop every reference to the search model (it is not used again): the
    export is loaded for the check in its place, so the two never share the GPU.

    measure(model) scores the loaded export as the search scored trials: its figures become the
    record's `after` (the search's own figures for the trial stay as `after_search`), so what a
    user reads is what the saved weights do, rounding of merged weights included.

    annotate(record, folder) adds to the record once the check's model is released too (the
    judge's verdicts, the capability check of the saved export in folder: nothing else holds
    the GPU then).

    After a quantized search, full_reference(encoded) gives the log-probs of the full-precision
    source with the trial's deltas (None when it does not fit): the export, loaded at its own
    precision by reload_shipped(folder), must match it as closely as an unquantized export,
    and its figures are the record's: what ships is what is measured. The re-quantized reload
    is then measured beside it, for information. Where full precision does not fit, the
    re-quantized reload is the check (a looser limit) and the record says so in words.

    extras(folder, record) adds files beside the model (the report) before the manifest is
    written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    try:
        ablator.apply(params, directions)
        encoded = encode_prompts(chat, check_prompts)
        reference = next_token_logprobs(loaded.model, chat, encoded, batch_size).cpu()
        tmp.mkdir(parents=True)
        shards = mergeable_shards(loaded, ablator, params, directions)
        if shards is not None:
            merge_shards(shards[0], shards[1], tmp, ablator.norm_preserving)
            how = "merged shard by shard"
        else:
            if quantized:
                raise UserError(
                    f"{loaded.source.display}: a quantized search is exported by merging the edit "
                    "into the source's safetensors, which this source does not have as loaded; "
                    "run without quantization"
                )
            ablator.merge(params, directions)
            loaded.model.save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
            how = "saved from memory"
        saved = time.monotonic()
        release()
        full = full_reference(encoded) if quantized and full_reference else None
        if full is not None and reload_shipped is not None:
            check = _check(
                tmp,
                reload_shipped,
                chat,
                check_prompts,
                encoded,
                full,
                batch_size,
                KL_LIMIT,
                measure,
            )
            check["measured"] = f"shipped ({check.pop('dtype')})"
            requantized = _check(
                tmp, reload, chat, check_prompts, encoded, reference, batch_size, None, measure
            )
            check["requantized_kl_to_searched"] = requantized["max_kl"]
            check["figures_requantized"] = requantized.get("figures")
        else:
            limit = KL_LIMIT_REQUANTIZED if quantized else KL_LIMIT
            check = _check(
                tmp, reload, chat, check_prompts, encoded, reference, batch_size, limit, measure
            )
            check.pop("dtype")
            if quantized:
                check["measured"] = "re-quantized"

        check.update(
            how=how,
            save_seconds=round(saved - started, 2),
            check_seconds=round(time.monotonic() - saved, 2),
        )
        record = {**run_record, "load_check": check, "versions": versions()}
        if check.get("measured") == "re-quantized":
            record.setdefault("warnings", []).append(
                "the figures after are of the export re-quantized as it was searched: its "
                "full-precision weights, which ship, did not fit this machine's memory to be "
                "measured"
            )
        if check.get("figures"):
            record["after_search"] = run_record.get("after")
            record["after"] = {**(run_record.get("after") or {}), **check["figures"]}
        if annotate is not None:
            annotate(record, tmp)
        (tmp / RUN_FILE).write_text(
            json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8"
        )
        if extras is not None:
            extras(tmp, json.loads((tmp / RUN_FILE).read_text(encoding="utf-8")))
        for path in tmp.rglob("*"):  # safetensors writes its files owner-only; a model is shared
            if path.is_file():
                path.chmod(0o644)
        manifest.write(tmp)
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported to %s (%s)", target, how)
    return check


def source_directory(source: ModelSource) -> Path | None:
    """The local folder holding the source's files, if there is one."""
    if source.kind == "dir":
        return Path(source.location)
    if source.kind == "hub":  # already downloaded by the load: only look in the cache
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(source.location, local_files_only=True))
        except (
            OSError,
            ValueError,
        ) as exc:  # not cached as a whole snapshot: save from memory instead
            log.info("no local snapshot of %s: %s", source.location, exc)
    return None


def mergeable_shards(
    loaded: LoadedModel, ablator: Ablator, params: AblationParams, directions: torch.Tensor
) -> tuple[Path, dict[str, dict[str, TensorEdit]]] | None:
    """Per source shard, the tensors to edit; None when the source cannot be merged file-wise."""
    from safetensors import safe_open

    folder = source_directory(loaded.source)
    files = sorted(folder.glob("*.safetensors")) if folder else []
    if not folder or not files:
        log.info("%s has no safetensors shards: saving from memory", loaded.source.display)
        return None
    where: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                where[key] = (path.name, tuple(f.get_slice(key).get_shape()))
    names = {id(p): n for n, p in loaded.model.named_parameters()}
    plan: dict[str, dict[str, TensorEdit]] = {}
    for t, v, w in ablator.edits(params, directions):
        key = names[id(t.param)]
        found = where.get(key)
        state = getattr(t.param, "quant_state", None)  # bnb 4-bit: packed, shape kept there
        shape = tuple(state.shape if state is not None else t.param.shape)
        if found is None or found[1] != shape:
            log.info("%s: %s is not stored as loaded: saving from memory", folder, key)
            return None
        plan.setdefault(found[0], {})[key] = TensorEdit(v.float().cpu(), w, t.out_axis, t.is_bias)
    return folder, plan


def merge_shards(
    source: Path, plan: dict[str, dict[str, TensorEdit]], out: Path, norm_preserving: bool
) -> None:
    """Copy the source folder's top-level files into out, editing the planned tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(source.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name in _NOT_COPIED:
            continue
        if name.endswith(_OTHER_WEIGHTS):
            log.info("not copying %s: only the merged safetensors are exported", name)
            continue
        edits = plan.get(name)
        if not edits:
            shutil.copyfile(path, out / name)
            continue
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        for key, edit in edits.items():
            orthogonalize_(
                tensors[key], edit.v, edit.w, edit.out_axis, norm_preserving, edit.is_bias
            )
        save_file(tensors, out / name, metadata=metadata)
        del tensors  # one shard in memory at a time
        log.info("merged %d tensors into %s", len(edits), name)


def _check(
    folder: Path,
    reload: Callable[[Path], LoadedModel],
    chat: ChatFormatter,
    prompts: list[str],
    encoded: list[list[int]],
    reference: torch.Tensor,
    batch_size: int,
    limit: float | None,
    measure: Callable[[Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The export loaded by reload(), compared with the reference log-probs (held to limit;
    None: recorded only) and measured."""
    back = reload(folder)
    dtype = back.dtype
    figures = None
    try:
        got = next_token_logprobs(back.model, chat, encoded, batch_size).cpu()
        kl = (reference.exp() * (reference - got)).sum(dim=-1).clamp_min(0)
        # The exported tokenizer must encode the chat exactly as the one the search used.
        back_chat = ChatFormatter(back.tokenizer, chat.system_prompt)
        back_chat.answer_prefix = chat.answer_prefix
        same_tokens = encode_prompts(back_chat, prompts[:1])[0] == encoded[0]
        answer = greedy_generate(back.model, back_chat, prompts[:1], 24, 1)[0]
        if measure is not None:
            figures = measure(back.model)
    finally:
        del back
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    max_kl = float(kl.max())
    check = {
        "prompts": len(encoded),
        "max_kl": round(max_kl, 6) if math.isfinite(max_kl) else max_kl,
        "same_top_token": int((reference.argmax(-1) == got.argmax(-1)).sum()),
        "tokenizer_matches": same_tokens,
        "prompt": prompts[0],
        "answer": answer.text,
    }
    if figures is not None:
        check["figures"] = figures
    check["dtype"] = dtype
    if limit is None:  # informational (the re-quantized reload beside the shipped model)
        return check
    _require_finite(check)
    if check["max_kl"] > limit or not same_tokens:
        raise UserError(
            f"the exported model does not answer like the searched one (KL {check['max_kl']:.4g} "
            f"> {limit} nats, tokenizer {'same' if same_tokens else 'different'}): it is not "
            "kept; the study is, so `abfleet run` again re-exports it"
        )
    return check


def _require_finite(check: dict[str, Any]) -> None:
    """NaN compares False with every limit: a model whose figures are not numbers fails."""
    figures = check.get("figures") or {}
    bad = [k for k in ("max_kl",) if not math.isfinite(check[k])]
    bad += [
        f"figures.{k}" for k, v in figures.items() if isinstance(v, float) and not math.isfinite(v)
    ]
    if bad:
        raise UserError(
            f"the exported model gives non-finite figures ({', '.join(bad)}): it is not kept; "
            "the study is, so `abfleet run` again re-exports it (or try another dtype)"
        )


def _replace_dir(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
