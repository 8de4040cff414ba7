"""The real SmolLM2: loglikelihood against transformers' own float32 load of the same GGUF."""

import numpy as np
import pytest
import torch

from flaxlm.infer.llm import LLM
from flaxlm.infer.scoring import encode_pair

TOL = 2e-4  # per token; SmolLM2's logits agree with transformers' to 2e-4 (tests/model)


@pytest.fixture(scope="module")
def llm(smollm2):
    model, tokenizer = smollm2
    return LLM(model, tokenizer)


def test_loglikelihood_matches_transformers(llm, smollm2_hf):
    context = ("The following are multiple choice questions (with answers) about geography.\n\n"
               "What is the capital of France?\nA. Berlin\nB. Madrid\nC. Paris\nD. Rome\nAnswer:")
    requests = [(context, " C"), (context, " A"), (context, " Paris"), (context, " Madrid"),
                ("The quick brown fox", " jumps over the lazy dog.")]
    results = llm.loglikelihood(requests)
    for (ctx, cont), got in zip(requests, results):
        ctx_ids, cont_ids = encode_pair(llm.tokenizer, ctx, cont)
        with torch.no_grad():
            logits = smollm2_hf(torch.tensor([ctx_ids + cont_ids[:-1]])).logits[0].float()
        lp = torch.log_softmax(logits, -1).numpy()
        ref = [lp[len(ctx_ids) - 1 + j, t] for j, t in enumerate(cont_ids)]
        np.testing.assert_allclose(got.token_logprobs, ref, atol=TOL, rtol=0)
