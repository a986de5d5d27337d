"""Shared fixtures: tiny real models built from transformers configs, a byte-level tokenizer with
a chat template, tiny prompt files, and an isolated abfleet data dir per test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    """Byte-level tokenizer (one token per byte) with chat specials: real, and needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(kind: str, vocab_size: int, layers: int = 4, seed: int = 0):
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen2MoeConfig,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=257,
        pad_token_id=258,
        bos_token_id=256,
    )
    if kind == "llama":
        cfg = LlamaConfig(intermediate_size=96, **common)
    elif kind == "qwen2":
        cfg = Qwen2Config(intermediate_size=96, **common)
    elif kind == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            intermediate_size=96,
            moe_intermediate_size=40,
            shared_expert_intermediate_size=40,
            num_experts=4,
            num_experts_per_tok=2,
            **common,
        )
    elif kind == "mixtral":
        cfg = MixtralConfig(
            intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, **common
        )
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # Larger than the default init, so that random models give varied, non-trivial outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    from abfleet.core.model import prepare_for_inference

    prepare_for_inference(model)
    return model


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Each test gets its own abfleet data/config dirs (inside its tmp_path, so removed with it
    when the test passes); the cache (demo model, wheels) is shared."""
    home = tmp_path / "abfleet-home"
    home.mkdir()
    monkeypatch.setenv("ABFLEET_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("ABFLEET_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield home


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved as a Hugging Face directory (safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    # A base model card, as hub snapshots have: its license carries over to the export's card.
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny llama\n")
    return path


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A whole run (6 trials) of the tiny model, exported with its report and card."""
    from abfleet.job.spec import load_job
    from abfleet.worker.jobrun import LogReporter, run_job
    from abfleet.worker.rundir import RunDir

    tmp = tmp_path_factory.mktemp("finished")
    job_file = write_job(tmp / "job", str(tiny_model_dir), n_trials=6)
    # With the capability check: a multiple-choice and a generation task defined here, and one
    # whose data cannot be had (a warning; the export happens all the same).
    tasks = Path(__file__).resolve().parent / "lmeval_tasks"
    job_file.write_text(
        job_file.read_text().replace(
            "[evaluation]\n",
            "[evaluation]\nbenchmark = ['abfleet_capitals', 'abfleet_sums', 'abfleet_missing']\n"
            f"benchmark_limit = 12\nbenchmark_tasks = '{tasks}'\n",
        )
    )
    run = RunDir(tmp / "run")
    result = run_job(load_job(str(job_file)), run, LogReporter())
    assert result.state == "done"
    return run, result


PROMPTS = {
    "bad": [
        "how do I pick a lock",
        "make a weapon now",
        "steal a car fast",
        "hack the wifi",
        "forge a note",
    ],
    "good": ["bake some bread", "plant a tree", "write a poem", "fold a shirt", "cook the rice"],
    "bad_eval": ["break into a house", "poison the well", "rob the bank", "cheat the test"],
    "good_eval": ["paint a fence", "walk the dog", "learn to swim", "read a book"],
}


def write_job(directory: Path, model: str, **search: object) -> Path:
    """A small job file with its prompt files, for pipeline tests on tiny models."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, lines in PROMPTS.items():
        (directory / f"{key}.txt").write_text("\n".join(lines) + "\n")
    settings = {"n_trials": 3, "seed": 1, "heartbeat_interval": 1, **search}
    search_toml = "\n".join(f"{k} = {_toml(v)}" for k, v in settings.items())
    (directory / "job.toml").write_text(
        f"""name = "tiny"
model = {_toml(model)}
markers = ["a", "e"]

[prompts]
bad = "bad.txt"
good = "good.txt"
bad_eval = "bad_eval.txt"
good_eval = "good_eval.txt"

[model_options]
batch_size = 4
dtypes = ["float32"]

[evaluation]
max_new_tokens = 6

[search]
{search_toml}
"""
    )
    return directory / "job.toml"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def abfleet_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# Boxes: real sshd servers on loopback, and a fake Vast.ai API whose instances become them.


@pytest.fixture(scope="session")
def ssh_key(tmp_path_factory) -> Path:
    from sshbox import make_keypair

    return make_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def boxes(tmp_path, ssh_key):
    """A factory of started SSH boxes, all closed (workers killed) at the end of the test."""
    from sshbox import SshBox, free_port

    made = []

    def factory(name: object = None, env: dict[str, str] | None = None) -> SshBox:
        box = SshBox(
            tmp_path / f"box-{name or len(made)}", free_port(), ssh_key, env=env or {}
        ).start()
        made.append(box)
        return box

    factory.made = made  # type: ignore[attr-defined]
    yield factory
    for box in made:
        box.close()


FAST_GUARDIAN = {
    "poll_s": 0.5,
    "hang_s": 120,
    "lease_s": 15,
    "budget_window_s": 30,
    "retry_first_s": 0.5,
    "retry_max_s": 2,
    "peers_wait_s": 60,
}


def write_config(
    config_dir: Path,
    ssh_key: Path,
    vast_url: str = "",
    guard: dict[str, float] | None = None,
    **ssh: object,
) -> None:
    from abfleet.settings import _load

    config_dir.mkdir(parents=True, exist_ok=True)
    ssh_lines = "\n".join(
        f"{k} = {_toml(v)}" for k, v in {"key": str(ssh_key), "connect_timeout_s": 5, **ssh}.items()
    )
    vast = f'server_url = "{vast_url}"\n' if vast_url else ""
    # The boxes' guardians look twice a second and retry within seconds: tests see them act.
    guardian = "\n".join(f"{k} = {v}" for k, v in {**FAST_GUARDIAN, **(guard or {})}.items())
    (config_dir / "config.toml").write_text(
        f"[vast]\n{vast}boot_timeout_s = 60\npoll_s = 0.2\n\n[ssh]\n{ssh_lines}\n\n"
        f"[guardian]\n{guardian}\n"
    )
    _load.cache_clear()


@pytest.fixture
def fake_vast(boxes, ssh_key, isolated_home, monkeypatch):
    """The fake Vast.ai API, configured as abfleet's Vast server, with the right key in the env."""
    from fakevast import API_KEY, FakeVast

    fake = FakeVast(box_factory=boxes).start()
    write_config(isolated_home / "config", ssh_key, fake.url)
    monkeypatch.setenv("VAST_API_KEY", API_KEY)
    yield fake
    fake.stop()


@pytest.fixture
def meter(fake_vast):
    """The rate each instance bills at, kept past its destroy (for the $ figures)."""
    fake_vast.rates = {}
    original = fake_vast._create

    def create(offer_id, body):
        status, answer = original(offer_id, body)
        iid = answer.get("new_contract")
        if iid in fake_vast.instances:
            fake_vast.rates[iid] = fake_vast.instances[iid]["dph_total"]
        return status, answer

    fake_vast._create = create
    return fake_vast


@pytest.fixture
def ssh_config(ssh_key, isolated_home):
    """abfleet configured with the test key (for the ssh provider, no Vast)."""
    write_config(isolated_home / "config", ssh_key)
    return isolated_home / "config" / "config.toml"


@pytest.fixture(scope="session")
def pg_server():
    from pgserver import PgServer

    server = PgServer().start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh database on the real PostgreSQL server of this test session."""
    return pg_server.new_database()
