"""The export: merged into the source shard by shard, loaded back and compared by logits; the
same for a search on 4-bit weights (bitsandbytes runs on this CPU); saved from memory when the
source has no safetensors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from abfleet.core.ablation import AblationParams, Ablator, ComponentParams, orthogonalize_
from abfleet.core.chat import ChatFormatter
from abfleet.core.export import RUN_FILE, export_model
from abfleet.core.generate import encode_prompts, next_token_logprobs
from abfleet.core.model import ModelSource, load_model
from abfleet.errors import UserError
from abfleet.job import manifest
from conftest import make_model, make_tokenizer

PROMPTS = ["paint a fence", "walk the dog", "break into a house", "rob the bank"]
TRIAL = AblationParams(
    "global", 1.5, ComponentParams(1.1, 1.0, 0.4, 2.0), ComponentParams(0.9, 2.5, 0.2, 2.0)
)


def _llama64(vocab_size: int, seed: int = 0):
    """Widths bitsandbytes' CPU 4-bit kernels take (every output a multiple of 32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        eos_token_id=257,
        pad_token_id=258,
        bos_token_id=256,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # the default init is so small that every answer is near uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model.to(torch.bfloat16)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """A tiny Llama in bfloat16 saved as several safetensors shards, with stray weight files."""
    path = tmp_path_factory.mktemp("sharded")
    tok = make_tokenizer()
    _llama64(len(tok)).save_pretrained(path, max_shard_size="100KB")
    tok.save_pretrained(path)
    (path / "consolidated.pth").write_bytes(b"unablated weights of another format")
    return path


def _directions(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(len(model.model.layers) + 1, model.config.hidden_size, generator=g)
    return d / d.norm(dim=-1, keepdim=True)


def _export(loaded, ablator, directions, out, quantization="none"):
    chat = ChatFormatter(loaded.tokenizer, None)
    held = {"loaded": loaded}

    def release():
        ablator.detach()
        held.pop("loaded").model = None

    def reload(folder):
        return load_model(
            ModelSource("dir", str(folder)),
            (loaded.dtype,),
            None,
            for_ablation=False,
            quantization=quantization,
        )

    return export_model(
        loaded,
        ablator,
        TRIAL,
        directions,
        chat,
        out,
        {"job": "test"},
        PROMPTS,
        reload,
        release,
        quantized=quantization != "none",
    )


def _tensors(folder):
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                found[key] = (path.name, f.get_tensor(key))
    return found


@pytest.mark.parametrize("norm_preserving", [False, True], ids=["plain", "norm_preserving"])
def test_multi_shard_export_is_merged_file_by_file_and_answers_like_the_search(
    tmp_path, sharded_dir, norm_preserving
):
    loaded = load_model(ModelSource("dir", str(sharded_dir)), ("bfloat16",), None)
    ablator = Ablator(loaded.model, norm_preserving)
    directions = _directions(loaded.model)
    edits = {
        n: (v, w, t)
        for t, v, w in ablator.edits(TRIAL, directions)
        for n, p in loaded.model.named_parameters()
        if p is t.param
    }
    chat = ChatFormatter(loaded.tokenizer, None)
    ablator.apply(TRIAL, directions)
    searched = next_token_logprobs(loaded.model, chat, encode_prompts(chat, PROMPTS), 4)

    out = tmp_path / "model"
    check = _export(loaded, ablator, directions, out)

    assert check["how"] == "merged shard by shard"
    assert check["max_kl"] < 1e-3  # bfloat16 rounding of merged weights vs. the deltas
    source, exported = _tensors(sharded_dir), _tensors(out)
    assert len({f for f, _ in source.values()}) >= 3  # really several shards
    assert {k: f for k, (f, _) in source.items()} == {k: f for k, (f, _) in exported.items()}
    for key, (_, original) in source.items():
        got = exported[key][1]
        assert got.dtype == torch.bfloat16
        if key not in edits:
            assert torch.equal(got, original), key
            continue
        v, w, t = edits[key]
        expected = original.clone()
        orthogonalize_(expected, v, w, t.out_axis, norm_preserving, t.is_bias)
        assert torch.equal(got, expected), key
        assert not torch.equal(got, original), key
    assert not (out / "consolidated.pth").exists()  # another format's unablated weights
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    assert manifest.verify(out, manifest.read(out)) == []
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes  # readable by whoever the model is shared with
    assert json.loads((out / RUN_FILE).read_text())["load_check"]["max_kl"] == check["max_kl"]

    # Independently of the export's own check: the export, loaded, gives the searched logits.
    back = load_model(ModelSource("dir", str(out)), ("bfloat16",), None, for_ablation=False)
    got = next_token_logprobs(back.model, chat, encode_prompts(chat, PROMPTS), 4)
    kl = (searched.exp() * (searched - got)).sum(-1)
    assert kl.max() < 1e-3
    source_model = load_model(ModelSource("dir", str(sharded_dir)), ("bfloat16",), None).model
    base = next_token_logprobs(source_model, chat, encode_prompts(chat, PROMPTS), 4)
    assert (searched.exp() * (searched - base)).sum(-1).max() > 1e-2  # ten times that bound


def test_search_on_4bit_weights_exports_full_precision(tmp_path, sharded_dir):
    pytest.importorskip("bitsandbytes")
    full = load_model(ModelSource("dir", str(sharded_dir)), ("float32",), None)
    loaded = load_model(
        ModelSource("dir", str(sharded_dir)), ("float32",), None, quantization="bnb-4bit"
    )
    o_proj = loaded.model.model.layers[0].self_attn.o_proj
    assert type(o_proj).__name__ == "Linear4bit" and o_proj.weight.dtype == torch.uint8
    ablator = Ablator(loaded.model)
    directions = _directions(loaded.model)
    chat = ChatFormatter(full.tokenizer, None)
    encoded = encode_prompts(chat, PROMPTS)
    base_q = next_token_logprobs(loaded.model, chat, encoded, 4)
    ablator.apply(TRIAL, directions)
    searched_q = next_token_logprobs(loaded.model, chat, encoded, 4)
    assert (searched_q.exp() * (searched_q - base_q)).sum(-1).max() > 1e-3  # the delta acts

    out = tmp_path / "model"
    check = _export(loaded, ablator, directions, out, quantization="bnb-4bit")
    assert check["how"] == "merged shard by shard" and check["max_kl"] < 0.1
    # The export is full precision (the source's bfloat16), and equals the full-precision search.
    exported = _tensors(out)
    assert {t.dtype for _, t in exported.values()} == {torch.bfloat16}
    Ablator(full.model).apply(TRIAL, directions)
    searched = next_token_logprobs(full.model, chat, encoded, 4)
    back = load_model(ModelSource("dir", str(out)), ("float32",), None, for_ablation=False)
    got = next_token_logprobs(back.model, chat, encoded, 4)
    assert (searched.exp() * (searched - got)).sum(-1).max() < 1e-3


def test_source_without_safetensors_is_saved_from_memory(tmp_path):
    tok = make_tokenizer()
    src = tmp_path / "bin"
    model = make_model("llama", len(tok))
    model.save_pretrained(src)  # then as the older .bin format only
    (src / "model.safetensors").unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    tok.save_pretrained(src)
    assert not list(src.glob("*.safetensors"))
    loaded = load_model(ModelSource("dir", str(src)), ("float32",), None)
    check = _export(loaded, Ablator(loaded.model), _directions(loaded.model), tmp_path / "m")
    assert check["how"] == "saved from memory" and check["max_kl"] < 1e-4
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert not list((tmp_path / "m").glob("*.bin"))


def test_a_failed_check_keeps_nothing(tmp_path, sharded_dir):
    """Files that changed under the run give an export unlike the search: nothing is kept."""
    src = tmp_path / "src"
    shutil.copytree(sharded_dir, src)
    loaded = load_model(ModelSource("dir", str(src)), ("bfloat16",), None)
    tok = make_tokenizer()
    other = _llama64(len(tok), seed=1)
    other.save_pretrained(src, max_shard_size="100KB")  # same names and shapes, other weights
    with pytest.raises(UserError, match="does not answer like the searched one"):
        _export(loaded, Ablator(loaded.model), _directions(loaded.model), tmp_path / "m")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".m", "m"))]


def test_after_a_4bit_search_the_figures_are_of_the_shipped_full_precision_model(
    tmp_path, sharded_dir
):
    """The search ran on 4-bit weights; what ships is the merged full-precision model, so that
    is what the "after" figures measure (the re-quantized reload's stay beside them)."""
    pytest.importorskip("bitsandbytes")
    from abfleet.job.spec import load_job
    from abfleet.worker.jobrun import LogReporter, run_job
    from abfleet.worker.rundir import RunDir
    from conftest import write_job

    job_file = write_job(tmp_path / "job", str(sharded_dir), n_trials=2)
    text = job_file.read_text().replace(
        'dtypes = ["float32"]', 'dtypes = ["float32"]\nquantization = "bnb-4bit"'
    )
    job_file.write_text(text)
    run = RunDir(tmp_path / "run")
    result = run_job(load_job(str(job_file)), run, LogReporter())
    assert result.state == "done"
    record = json.loads((run.model_dir / RUN_FILE).read_text())
    check = record["load_check"]
    assert check["measured"] == "shipped (float32)"
    # The merge is proven against the full-precision source with the trial's deltas, as tightly
    # as an unquantized export; the re-quantized reload's distance is recorded beside it.
    assert check["max_kl"] < 0.01
    assert 0 <= check["requantized_kl_to_searched"] < 5
    shipped, requantized = check["figures"], check["figures_requantized"]
    assert record["after"]["kl"] == shipped["kl"] != requantized["kl"]
    assert "kl" in record["after_search"]  # the search's own figures, kept apart
    assert "measured on the shipped (float32) weights" in (run.model_dir / "README.md").read_text()
    assert not record["warnings"]


def _search_state(loaded):
    """The Ablator, chat format and release() an export takes from a search."""
    ablator = Ablator(loaded.model)

    def release():
        ablator.detach()
        loaded.model = None

    return ablator, ChatFormatter(loaded.tokenizer, None), release


def test_a_non_finite_check_is_refused_and_keeps_nothing(tmp_path, sharded_dir):
    """NaN compares False with every limit: an export whose reload gives NaN is refused."""
    loaded = load_model(ModelSource("dir", str(sharded_dir)), ("float32",), None)
    ablator, chat, release = _search_state(loaded)

    def reload_broken(folder):
        back = load_model(ModelSource("dir", str(folder)), ("float32",), None, for_ablation=False)
        with torch.no_grad():
            back.model.lm_head.weight[0, 0] = float("nan")
        return back

    out = tmp_path / "m"
    with pytest.raises(UserError, match="non-finite figures"):
        export_model(
            loaded,
            ablator,
            TRIAL,
            _directions(loaded.model),
            chat,
            out,
            {"job": "test"},
            PROMPTS,
            reload_broken,
            release,
        )
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".m", "m"))]


def test_a_shipped_model_too_large_to_measure_says_so_in_the_record(tmp_path, sharded_dir):
    pytest.importorskip("bitsandbytes")
    loaded = load_model(
        ModelSource("dir", str(sharded_dir)), ("float32",), None, quantization="bnb-4bit"
    )
    ablator, chat, release = _search_state(loaded)

    def reload(folder):
        return load_model(
            ModelSource("dir", str(folder)),
            ("float32",),
            None,
            for_ablation=False,
            quantization="bnb-4bit",
        )

    export_model(
        loaded,
        ablator,
        TRIAL,
        _directions(loaded.model),
        chat,
        tmp_path / "m",
        {"job": "test", "warnings": []},
        PROMPTS,
        reload,
        release,
        quantized=True,
        full_reference=lambda encoded: None,  # as when full precision does not fit
    )
    record = json.loads((tmp_path / "m" / RUN_FILE).read_text())
    assert record["load_check"]["measured"] == "re-quantized"
    [warning] = record["warnings"]
    assert "re-quantized as it was searched" in warning
