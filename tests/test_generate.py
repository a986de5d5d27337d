"""The pruning greedy decoder against transformers' own generate(), and the marker rules."""

from __future__ import annotations

import pytest
import torch

from abfleet.core.chat import ChatFormatter
from abfleet.core.generate import encode_prompts, greedy_generate
from abfleet.core.markers import MarkerMatcher, is_degenerate
from conftest import make_model

PROMPTS = ["hi", "tell me a long story about cats", "x", "what is two plus two?", "ok then", "why"]


def hf_greedy(model, chat, prompt, max_new_tokens):
    ids = torch.tensor([encode_prompts(chat, [prompt])[0]])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=[
            chat.tokenizer.eos_token_id,
            chat.tokenizer.convert_tokens_to_ids("<|im_end|>"),
        ],
        pad_token_id=chat.tokenizer.pad_token_id,
    )
    return chat.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["llama", "qwen2_moe"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_batched_left_padded_greedy_equals_unbatched_generate(kind, batch_size, tokenizer):
    model = make_model(kind, len(tokenizer), seed=2)
    chat = ChatFormatter(tokenizer, "You are a helpful assistant.")
    ours = greedy_generate(model, chat, PROMPTS, max_new_tokens=12, batch_size=batch_size)
    for prompt, gen in zip(PROMPTS, ours, strict=True):
        assert gen.text == hf_greedy(model, chat, prompt, 12), prompt


def test_rows_leave_the_batch_when_they_match_without_changing_the_others(tokenizer):
    model = make_model("llama", len(tokenizer), seed=4)
    chat = ChatFormatter(tokenizer, None)
    full = greedy_generate(model, chat, PROMPTS, max_new_tokens=14, batch_size=6)
    # Stop each row as soon as its text reaches 3 characters: most rows leave early.
    stopped = greedy_generate(model, chat, PROMPTS, 14, 6, stop=lambda text: len(text) >= 3)
    assert any(g.stopped for g in stopped)
    for a, b in zip(full, stopped, strict=True):
        if b.stopped:
            assert a.text.startswith(b.text) and len(b.text) >= 3
        else:
            assert a.text == b.text


def _decode_steps(model):
    """Counts the model's one-token decode calls (prefills are longer)."""
    steps = [0]

    def count(_module, _args, kwargs):
        steps[0] += kwargs["input_ids"].shape[1] == 1

    return steps, model.register_forward_pre_hook(count, with_kwargs=True)


def test_waiting_prompts_take_the_places_of_rows_that_left(tokenizer, monkeypatch):
    import abfleet.core.generate as generate

    model = make_model("llama", len(tokenizer), seed=4)
    chat = ChatFormatter(tokenizer, None)
    prompts = PROMPTS * 3
    full = greedy_generate(model, chat, prompts, 14, 1)
    # Most rows leave after 3 characters; the answers to the shortest prompt run the whole
    # budget, so the first batch (shortest prompts first) holds its places for 14 steps.
    shortest = min(range(len(prompts)), key=lambda i: len(prompts[i]))
    long_answer = full[shortest].text
    assert full[shortest].new_tokens == 14 and not full[shortest].ended

    def stop(text: str) -> bool:
        return len(text) >= 3 and not long_answer.startswith(text)

    alone = [greedy_generate(model, chat, [p], 14, 1, stop=stop)[0] for p in prompts]
    steps, handle = _decode_steps(model)
    joined = greedy_generate(model, chat, prompts, 14, 8, stop=stop)
    joined_steps = steps[0]
    monkeypatch.setattr(generate, "JOIN_GROUPS", 1)  # one full batch after another
    steps[0] = 0
    sequential = greedy_generate(model, chat, prompts, 14, 8, stop=stop)
    handle.remove()
    assert joined == alone == sequential  # text, token count, ended and stopped, per prompt
    assert any(g.stopped for g in joined) and any(not g.stopped for g in joined)
    assert joined_steps < steps[0]


def test_sliding_window_caches_are_not_joined():
    import transformers as tf

    from abfleet.core.generate import _joinable

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    llama = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(intermediate_size=48, **common))
    gemma = tf.AutoModelForCausalLM.from_config(
        tf.Gemma3TextConfig(intermediate_size=48, head_dim=8, sliding_window=16, **common)
    )
    assert _joinable(llama) and not _joinable(gemma)


def test_system_prompt_goes_through_the_template(tokenizer):
    chat = ChatFormatter(tokenizer, "Be brief.")
    text = chat.format("hello")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert chat.turn_end_text() == "<|im_end|>"


def test_tokenizer_without_chat_template_is_refused(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        ChatFormatter(plain, None)


def test_marker_matching_normalizes_case_and_apostrophes():
    m = MarkerMatcher(["i can't", "sorry"])
    assert m.matches("I CAN\u2019T do that")
    assert m.matches("So SORRY")
    assert not m.matches("Sure, here it is")
    assert m.is_refusal("   ")  # empty answers count as refusals
    with pytest.raises(ValueError):
        MarkerMatcher(["  "])


@pytest.mark.parametrize(
    ("text", "degenerate"),
    [
        ("", True),
        ("   \n ", True),
        ("the the the the the the", True),
        ("Here is how: step step step step step step step", True),
        ("I like it. I like it. I like it. I like it.", True),
        ("!!!!!!!!!!!!!!", True),
        ("abcabcabcabcabc", True),
        ("To make bread, mix flour, water, salt and yeast, then knead.", False),
        ("1. Mix. 2. Knead. 3. Bake.", False),
        ("Yes, yes, I see what you mean about the weather today.", False),
        ("no", False),
    ],
)
def test_degenerate_detection(text, degenerate):
    assert is_degenerate(text) is degenerate


@pytest.mark.parametrize("kind", ["llama", "qwen2_moe"])
def test_a_shared_prefix_runs_once_and_changes_no_logit(kind, tokenizer):
    """The chat template and system prompt every prompt starts with are computed once per batch
    and shared through the cache: fewer tokens through the model, the same distributions."""
    import torch.nn.functional as F

    from abfleet.core.generate import (
        MIN_SHARED_PREFIX,
        make_batches,
        next_token_logprobs,
        pad_token_id,
    )

    model = make_model(kind, len(tokenizer), seed=3)
    chat = ChatFormatter(tokenizer, "You are a helpful assistant.")
    encoded = encode_prompts(chat, PROMPTS)
    batches = make_batches(encoded, 4, pad_token_id(tokenizer), torch.device("cpu"), True)
    assert all(b.prefix is not None and b.prefix.shape[1] >= MIN_SHARED_PREFIX for b in batches)

    seen = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].numel())
    )
    try:
        shared = next_token_logprobs(model, chat, encoded, 4)
    finally:
        hook.remove()
    padded_without_sharing = sum(
        len(b.rows) * (b.position_ids[:, -1].max().item() + 1) for b in batches
    )  # every row of a batch padded to its longest prompt
    assert sum(seen) < 0.7 * padded_without_sharing

    with torch.no_grad():
        alone = torch.stack(
            [
                F.log_softmax(model(input_ids=torch.tensor([e])).logits[0, -1].float(), -1)
                for e in encoded
            ]
        )
    assert torch.allclose(shared, alone, atol=1e-4)
