"""Scoring on tiny random models: loglikelihood, rolling windows, prompt logprobs and
embeddings against HF transformers' own forward pass; packing invariants; bad input."""

import re

import numpy as np
import pytest
import torch

from flaxlm.infer.llm import LLM
from flaxlm.infer.sampling import SamplingParams
from flaxlm.infer.scoring import encode_pair, rolling_items
from flaxlm.model import ConfigError
from tests.hf_models import make_hf_model, save_tokenizer

TOL = 1e-4     # per token, against HF (the bound)
PACKED = 1e-6  # the same request packed elsewhere: float32 reduction order only


@pytest.fixture(scope="module", params=["llama-gqa", "gpt2"])
def pair(request, tmp_path_factory):
    hf_model = make_hf_model(request.param, seed=4)
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, hf_model.config.vocab_size)
    return hf_model, LLM.load(directory)


def hf_logprobs(hf_model, ids):
    """log_softmax of HF's logits for one unpadded sequence: [len, vocab]."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1).numpy()


def hf_score(hf_model, context, continuation):
    lp = hf_logprobs(hf_model, list(context) + list(continuation)[:-1])
    at = [len(context) - 1 + j for j in range(len(continuation))]
    tokens = np.array([lp[p, t] for p, t in zip(at, continuation)])
    greedy = all(int(np.argmax(lp[p])) == t for p, t in zip(at, continuation))
    return tokens, greedy


def _requests(seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(1, 320, n).tolist()  # noqa: E731
    shared = ids(12)
    return [(ids(5), ids(3)), (shared, ids(1)), (shared, ids(1)), (shared, ids(4)),
            (shared, ids(6)), (ids(30), ids(2)), (ids(1), ids(9))]


def test_loglikelihood_matches_hf(pair):
    hf_model, llm = pair
    requests = _requests()
    for (context, continuation), got in zip(requests, llm.loglikelihood(requests)):
        ref, greedy = hf_score(hf_model, context, continuation)
        np.testing.assert_allclose(got.token_logprobs, ref, atol=TOL, rtol=0)
        assert got.num_tokens == len(continuation)
        assert got.logprob == pytest.approx(float(ref.sum()), abs=TOL * len(ref))
        assert got.is_greedy == greedy


def test_greedy_continuation_is_greedy(pair):
    hf_model, llm = pair
    context = _requests(1)[0][0]
    lp = hf_logprobs(hf_model, context)
    best = int(np.argmax(lp[-1]))
    second = int(np.argsort(lp[-1])[-2])
    got = llm.loglikelihood([(context, [best]), (context, [second])])
    assert got[0].is_greedy and not got[1].is_greedy


def test_strings_follow_harness_tokenization(pair):
    hf_model, llm = pair
    tok = llm.tokenizer
    context, continuation = "The quick brown ", "fox jumps"
    ctx_ids, cont_ids = encode_pair(tok, context, continuation)
    # whitespace moved: the context is encoded without its trailing space
    assert ctx_ids == tok.encode("The quick brown")
    whole = tok.encode("The quick brown fox jumps")
    assert cont_ids == whole[len(ctx_ids):]
    got = llm.loglikelihood([(context, continuation)])[0]
    ref, _ = hf_score(hf_model, ctx_ids, cont_ids)
    np.testing.assert_allclose(got.token_logprobs, ref, atol=TOL, rtol=0)
    # an empty context is the prefix token (EOS here: this tokenizer has no BOS)
    empty = llm.loglikelihood([("", "fox")])[0]
    ref, _ = hf_score(hf_model, [tok.eos_token_id], tok.encode("fox"))
    np.testing.assert_allclose(empty.token_logprobs, ref, atol=TOL, rtol=0)


def test_long_context_is_cut_from_the_left(pair):
    hf_model, llm = pair
    window = llm.config.max_seq_len
    rng = np.random.default_rng(7)
    context, continuation = rng.integers(1, 320, window + 40).tolist(), [5, 6, 7]
    got = llm.loglikelihood([(context, continuation)])[0]
    kept = (context + continuation)[-(window + 1):-len(continuation)]
    ref, _ = hf_score(hf_model, kept, continuation)
    np.testing.assert_allclose(got.token_logprobs, ref, atol=TOL, rtol=0)


def test_alone_batched_and_padded_agree(pair):
    _, llm = pair
    requests = _requests(2)
    together = llm.loglikelihood(requests)
    long = [(list(range(1, 300)), [3])]  # a longer row bucket for everything in the call
    padded = llm.loglikelihood(requests + long)[:len(requests)]
    for request, a, b in zip(requests, together, padded):
        alone = llm.loglikelihood([request])[0]
        for other in (a, b):
            np.testing.assert_allclose(other.token_logprobs, alone.token_logprobs,
                                       atol=PACKED, rtol=0)
            assert other.is_greedy == alone.is_greedy


def test_same_buckets_compile_nothing_new(pair):
    _, llm = pair
    llm.loglikelihood(_requests(3))
    before = llm.num_compiled
    assert llm.programs.compiled.get("score", 0) >= 1
    llm.loglikelihood(_requests(4))
    assert llm.num_compiled == before


def test_rolling_short_text_equals_one_forward_pass(pair):
    hf_model, llm = pair
    ids = np.random.default_rng(5).integers(1, 320, 40).tolist()
    prefix = llm.tokenizer.eos_token_id
    got = llm.loglikelihood_rolling([ids])[0]
    lp = hf_logprobs(hf_model, [prefix] + ids[:-1])
    ref = sum(lp[i, t] for i, t in enumerate(ids))
    assert got.num_tokens == len(ids)
    assert got.logprob == pytest.approx(float(ref), abs=TOL * len(ids))


def test_rolling_strided_equals_hand_written_reference(pair):
    hf_model, llm = pair
    ids = np.random.default_rng(6).integers(1, 320, 100).tolist()
    prefix, window, stride = llm.tokenizer.eos_token_id, 32, 12
    tokens = [prefix] + ids
    total, scored, forward = 0.0, 0, {}
    for i in range(1, len(tokens)):  # token i is in chunk (i - 1) // stride
        end = min(1 + ((i - 1) // stride + 1) * stride, len(tokens))  # the chunk's end
        start = max(0, end - 1 - window)  # inputs: up to `window` tokens before the last target
        if (start, end) not in forward:
            forward[start, end] = hf_logprobs(hf_model, tokens[start:end - 1])
        total += forward[start, end][i - 1 - start, tokens[i]]
        scored += 1
    assert scored == len(ids)
    got = llm.loglikelihood_rolling([ids], window=window, stride=stride)[0]
    assert got.num_tokens == len(ids)
    assert got.logprob == pytest.approx(total, abs=TOL * len(ids))
    disjoint = llm.loglikelihood_rolling([ids], window=window)[0]  # lm-eval's windows
    assert abs(disjoint.logprob - got.logprob) > 1e-2  # the windows really differ


def test_rolling_windows_score_every_token_once():
    ids = list(range(10, 60))
    for window, stride in ((8, 8), (8, 3), (16, 1), (64, 64)):
        items = rolling_items(ids, 1, window, stride)
        targets = [t for _, continuation in items for t in continuation]
        assert targets == ids
        for context, continuation in items:
            assert len(context) + len(continuation) - 1 <= window


def test_prompt_logprobs_match_hf(pair):
    hf_model, llm = pair
    prompt = np.random.default_rng(8).integers(1, 320, 20).tolist()
    params = SamplingParams(temperature=0, max_new_tokens=2, prompt_logprobs=3, ignore_eos=True)
    result = llm.generate([prompt], params)[0]
    lp = hf_logprobs(hf_model, prompt)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
    for i, entry in enumerate(result.prompt_logprobs[1:], 1):
        top = np.argsort(lp[i - 1])[::-1][:3]
        assert set(entry) == set(top.tolist()) | {prompt[i]}
        for token, value in entry.items():
            assert value == pytest.approx(float(lp[i - 1, token]), abs=TOL)
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True))[0]
    assert plain.prompt_logprobs is None and plain.token_ids == result.token_ids


def test_embeddings_match_hf_and_ignore_padding(pair):
    hf_model, llm = pair
    texts = ["hello", "The quick brown fox jumps over the lazy dog. " * 3]
    for pooling in ("mean", "last"):
        together = llm.embed(texts, pooling=pooling, normalize=False)
        alone = llm.embed(texts[:1], pooling=pooling, normalize=False)
        np.testing.assert_allclose(alone[0], together[0], atol=1e-5, rtol=0)
        ids = llm.tokenizer.encode(texts[1])
        with torch.no_grad():
            hidden = hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
        hidden = hidden[0].float().numpy()
        ref = hidden.mean(0) if pooling == "mean" else hidden[-1]
        np.testing.assert_allclose(together[1], ref, atol=1e-4, rtol=1e-4)
    unit = llm.embed(texts)
    assert unit.dtype == np.float32 and unit.shape == (2, llm.config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda llm: llm.loglikelihood([("context", "")]), "continuation is empty"),
    (lambda llm: llm.loglikelihood([("context", [1, 2])]), "both be strings"),
    (lambda llm: llm.loglikelihood([([1], [999])]), "outside the vocabulary"),
    (lambda llm: llm.loglikelihood([([], [3])]), "context has no tokens"),
    (lambda llm: llm.loglikelihood(["just a string"]), "(context, continuation) pair"),
    (lambda llm: llm.loglikelihood([([1], list(range(1, 300)))]), "more than the model's context"),
    (lambda llm: llm.loglikelihood_rolling(["text"], window=0), "window"),
    (lambda llm: llm.loglikelihood_rolling(["text"], window=16, stride=17), "stride"),
    (lambda llm: llm.loglikelihood_rolling([""]), "text 0 is empty"),
    (lambda llm: llm.embed(["hi"], pooling="max"), "pooling"),
    (lambda llm: SamplingParams(prompt_logprobs=21), "prompt_logprobs"),
])
def test_bad_input_names_the_problem(pair, call, message):
    _, llm = pair
    with pytest.raises(ConfigError, match=re.escape(message)):
        call(llm)
