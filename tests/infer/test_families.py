"""Generation and beam search on every model family against transformers' `generate`.

One tiny random model per family (tests/hf_models.py), loaded from its HF
directory into the compiled engine: greedy tokens equal HF's (a divergence only
at a float tie of HF's own logits, see greedy_reference), and beam search gives
HF's hypotheses and scores (see beam_reference). Phi-3's prompts are longer than
its original_max_position_embeddings (32), so both sides use the long LongRoPE
factors from the first token: HF recomputes its whole cache when a generation
crosses that length, which flaxlm's fixed cache does not.
"""

import numpy as np
import pytest

from flaxlm.infer.beam import BeamParams
from flaxlm.infer.llm import LLM
from flaxlm.infer.sampling import SamplingParams
from tests.hf_models import make_hf_model, save_tokenizer
from tests.infer.greedy_reference import TINY_TOL, compare_greedy
from tests.infer.test_beam import compare

FAMILIES = ["qwen3-window", "gemma2-softcap", "gemma3-local-global", "phi3-longrope",
            "smollm3-nope", "mixtral-moe", "qwen3-moe"]
NEW = 12
PROMPT_LENGTHS = (40, 33)  # past the sliding windows (24); past Phi-3's 32


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    hf_model = make_hf_model(request.param, seed=4)
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, hf_model.config.vocab_size)
    rng = np.random.default_rng(len(request.param))
    prompts = [rng.integers(1, hf_model.config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    return request.param, hf_model, LLM.load(directory), prompts


def test_greedy_matches_hf(family):
    name, hf_model, llm, prompts = family
    results = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=NEW,
                                                   ignore_eos=True))
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        assert len(result.token_ids) == NEW
        compare_greedy(hf_model, prompt, result.token_ids, tol=TINY_TOL, max_new=NEW,
                       label=f"{name} prompt {i}")


def test_beam_search_matches_hf(family):
    name, hf_model, llm, prompts = family
    params = BeamParams(num_beams=3, num_return_sequences=2, max_new_tokens=NEW,
                        ignore_eos=True, length_penalty=1.0)
    excused = compare(llm.generate(prompts, params), llm, hf_model, prompts, params, (),
                      f"{name} beams")
    print(f"{name}: {len(excused)} of {len(prompts)} prompts excused as float ties")
    assert len(excused) <= 1, excused
