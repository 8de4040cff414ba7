"""The real embedded SmolLM2-135M-Instruct GGUF: flaxlm against transformers' GGUF loader."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from flaxlm.model import load, save_hf

# HF's own float32 run differs from its float64 run by ~6e-5 here (logits reach ~36).
ATOL = 2e-4
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a land far, far away, there lived a small dragon who",
]
CHAT = [{"role": "user", "content": "Name three primary colours."}]


@pytest.fixture(scope="module")
def flaxlm_model(smollm2):
    return smollm2


@pytest.fixture(scope="module")
def hf_model(smollm2_hf):
    return smollm2_hf


def _hf_logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.logits[0].numpy()


def _prompts(tokenizer):
    return [tokenizer.encode(p) for p in PROMPTS] + [
        tokenizer.encode(tokenizer.apply_chat_template(CHAT))]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask)


def _logits(model, prompts):
    """flaxlm's logits of each prompt, from one jitted forward of the right-padded batch
    (padding changes nothing: tests/model/test_hf_parity.py)."""
    ids = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)], mask[row, :len(prompt)] = prompt, 1
    out = np.asarray(_forward(*nnx.split(model), jnp.asarray(ids), jnp.asarray(mask)))
    return [out[row, :len(prompt)] for row, prompt in enumerate(prompts)]


@pytest.fixture(scope="module")
def ours(flaxlm_model):
    """(prompt ids, flaxlm's logits) of every prompt."""
    model, tokenizer = flaxlm_model
    prompts = _prompts(tokenizer)
    return prompts, _logits(model, prompts)


def test_logits_match_transformers(ours, hf_model):
    worst = 0.0
    for ids, logits in zip(*ours):
        ref = _hf_logits(hf_model, ids)
        worst = max(worst, float(np.abs(logits - ref).max()))
        np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))
    print(f"SmolLM2 GGUF: max abs logit diff vs transformers {worst:.2e}")
    assert worst <= ATOL


def test_save_hf_round_trip(flaxlm_model, ours, tmp_path):
    model, tokenizer = flaxlm_model
    save_hf(model, tokenizer, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for ids, logits, text in zip(*ours, PROMPTS):
        assert hf_tokenizer(text)["input_ids"] == ids
        np.testing.assert_allclose(_hf_logits(reloaded, ids), logits, atol=ATOL, rtol=0)
    assert hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) \
        == tokenizer.apply_chat_template(CHAT)
    # and flaxlm reads its own output back bit for bit
    again, again_tokenizer = load(tmp_path)
    for a, b in zip(_logits(again, ours[0]), ours[1]):
        np.testing.assert_array_equal(a, b)
    assert again_tokenizer.eos_token_ids == tokenizer.eos_token_ids
