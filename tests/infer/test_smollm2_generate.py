"""Generation with the real SmolLM2-135M-Instruct against transformers."""

import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.infer.llm import LLM
from flaxlm.infer.sampling import SamplingParams
from flaxlm.model import KVCache
from tests.infer.greedy_reference import SMOLLM2_TOL, compare_greedy

NEW = 32
QUESTIONS = ["What is the capital of France?",
             "Write a haiku about the sea.",
             "List three uses of a paperclip, briefly, and explain why each one works."]


@pytest.fixture(scope="module")
def llm(smollm2):
    model, tokenizer = smollm2
    return LLM(model, tokenizer)


def test_greedy_matches_hf_single_and_batched(llm, smollm2_hf):
    prompts = [llm.chat_prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 3  # different lengths in one batch
    params = SamplingParams(temperature=0, max_new_tokens=NEW)
    batched = llm.generate(prompts, params)
    single = llm.generate(prompts[0], params)[0]
    assert single.token_ids == batched[0].token_ids
    eos = llm.tokenizer.eos_token_id
    for i, (prompt, result) in enumerate(zip(prompts, batched)):
        compare_greedy(smollm2_hf, prompt, result.token_ids, tol=SMOLLM2_TOL, max_new=NEW,
                       eos=eos, label=f"SmolLM2 question {i}")
        assert result.finish_reason == ("stop" if result.token_ids[-1] == eos else "length")
    assert "Paris" in batched[0].text


def test_cached_decode_equals_full_forward(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog because it was")
    full = np.asarray(model(jnp.asarray([ids])))[0]
    prompt_len = 6
    cache = KVCache.init(model.config, batch_size=1, max_len=32)
    logits, cache = model(jnp.asarray([ids[:prompt_len]]), cache=cache)
    steps = [np.asarray(logits)[0]]
    for t in ids[prompt_len:]:
        logits, cache = model(jnp.asarray([[t]]), cache=cache)
        steps.append(np.asarray(logits)[0])
    stepped = np.concatenate(steps)
    assert np.abs(stepped - full).max() <= 2e-4
