"""Generation on tiny random models: HF greedy parity, loop invariants, settings, bad input."""

import numpy as np
import pytest

from flaxlm.infer.llm import LLM
from flaxlm.infer.sampling import SamplingParams
from flaxlm.model import ConfigError, FlaxlmError
from tests.hf_models import make_hf_model, save_tokenizer
from tests.infer.greedy_reference import compare_greedy, hf_greedy

NEW = 32
PROMPT_LENGTHS = (5, 13, 30)


@pytest.fixture(scope="module", params=["llama-gqa", "gpt2", "mistral-window"])
def pair(request, tmp_path_factory):
    hf_model = make_hf_model(request.param, seed=3)
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, hf_model.config.vocab_size)
    return request.param, hf_model, LLM.load(directory)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_hf_model("llama-gqa", seed=5).save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, 320)
    return LLM.load(directory)


def _prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in PROMPT_LENGTHS]


GREEDY = SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True)


def test_greedy_matches_hf_batched(pair):
    name, hf_model, llm = pair
    prompts = _prompts(llm.config.vocab_size)
    results = llm.generate(prompts, GREEDY)
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        ref, ref_logits = hf_greedy(hf_model, prompt, NEW, eos=None)
        assert len(result.token_ids) == NEW and result.finish_reason == "length"
        compare_greedy(result.token_ids, ref, ref_logits, f"{name} prompt {i}")


def test_greedy_stops_at_eos_like_hf(pair):
    name, hf_model, llm = pair
    prompt = _prompts(llm.config.vocab_size, seed=1)[1]
    free, _ = hf_greedy(hf_model, prompt, NEW, eos=None)
    eos = free[7]  # a token greedy decoding really produces: make it the EOS
    ref, ref_logits = hf_greedy(hf_model, prompt, NEW, eos=eos)
    result = llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=NEW,
                                                   stop_token_ids=(eos,), ignore_eos=True))[0]
    assert result.finish_reason == "stop" and result.token_ids[-1] == eos
    compare_greedy(result.token_ids, ref, ref_logits, f"{name} eos")


def test_padded_batch_equals_each_prompt_alone(llm):
    prompts = _prompts(320, seed=2)
    for params in (GREEDY, SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=NEW, seed=7,
                                          ignore_eos=True)):
        together = llm.generate(prompts, params)
        for prompt, result in zip(prompts, together):
            assert llm.generate([prompt], params)[0].token_ids == result.token_ids


def test_while_loop_and_streaming_agree(llm):
    prompt = "The quick brown fox"
    for params in (GREEDY, SamplingParams(temperature=1.0, top_k=50, max_new_tokens=NEW, seed=3,
                                          ignore_eos=True, repetition_penalty=1.3)):
        looped = llm.generate(prompt, params)[0]
        streamed = "".join(llm.stream(prompt, params))
        assert streamed == looped.text


def test_same_seed_same_text_and_n_samples(llm):
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=11, n=4, ignore_eos=True)
    a = llm.generate("Hello", params)[0]
    b = llm.generate("Hello", params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len(a.outputs) == 4 and len({tuple(o.token_ids) for o in a.outputs}) > 1
    scores = [o.cumulative_logprob for o in a.outputs]
    assert scores == sorted(scores, reverse=True)  # best first
    assert a.text == a.outputs[0].text


def test_other_settings_compile_nothing_new(llm):
    llm.generate("The quick brown fox", SamplingParams(temperature=0, max_new_tokens=20))
    before = llm.num_compiled
    assert before > 0
    settings = [
        dict(temperature=0.7, top_k=5, top_p=0.9, seed=1),
        dict(temperature=1.3, min_p=0.2, repetition_penalty=1.2, presence_penalty=0.5,
             frequency_penalty=0.3, logit_bias={5: 3.0, 9: -100.0}, seed=2),
        dict(temperature=0, min_new_tokens=4, stop=["fox"], stop_token_ids=(3,)),
    ]
    for i, extra in enumerate(settings):
        # prompts of other lengths in the same bucket (<= 16 tokens), other max_new_tokens
        # in the same bucket (17..32)
        llm.generate("Hello, world! " * (i + 1), SamplingParams(max_new_tokens=17 + i, **extra))
    assert llm.num_compiled == before


def test_logprobs(llm):
    params = SamplingParams(temperature=0, max_new_tokens=8, logprobs=3, ignore_eos=True)
    out = llm.generate("The quick", params)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == len(out.top_logprobs) == 8
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 3 and max(top, key=top.get) == token  # greedy picks the top one
        assert lp == pytest.approx(top[token], abs=1e-6) and lp <= 0


def test_min_new_tokens_suppresses_eos(llm):
    prompt = "The quick brown fox"
    free = llm.generate(prompt, GREEDY)[0].token_ids
    k = next(k for k in range(2, NEW) if free[k] not in free[:k])  # first occurrence at k >= 2
    eos = free[k]
    early = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=NEW,
                                                stop_token_ids=(eos,)))[0]
    assert early.token_ids == free[:k + 1] and early.finish_reason == "stop"
    held = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=NEW, min_new_tokens=10,
                                               stop_token_ids=(eos,)))[0]
    assert eos not in held.token_ids[:10] and len(held.token_ids) >= 10


def test_stop_string_cuts_text(llm):
    prompt = "The quick brown fox"
    free = llm.generate(prompt, GREEDY)[0]
    assert len(free.text) > 12
    stop = free.text[6:10]
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True,
                                              stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.index(stop)]
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)]


def test_majority_vote(llm):
    from flaxlm.infer.llm import majority_vote

    answer, share = majority_vote(llm, "Hello", lambda text: len(text) % 2,
                                  SamplingParams(temperature=1.0, n=6, max_new_tokens=8, seed=4))
    texts = [o.text for o in llm.generate("Hello", SamplingParams(
        temperature=1.0, n=6, max_new_tokens=8, seed=4))[0].outputs]
    votes = [len(t) % 2 for t in texts]
    assert answer == max(set(votes), key=votes.count)
    assert share == pytest.approx(votes.count(answer) / 6)


@pytest.mark.parametrize("prompt, params, message", [
    ("", SamplingParams(), "prompt 0 is empty"),
    ([], SamplingParams(), "prompt 0 is empty"),
    ([5, 999], SamplingParams(), "outside the vocabulary"),
    ("hi " * 200, SamplingParams(max_new_tokens=100), "leaves room for"),
    ("hi", SamplingParams(logit_bias={400: 1.0}), "logit_bias"),
])
def test_bad_input_compiles_nothing(tmp_path, prompt, params, message):
    directory = tmp_path / "m"
    make_hf_model("gpt2").save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, 320)
    llm = LLM.load(directory)
    with pytest.raises(ConfigError, match=message):
        llm.generate([prompt] if not isinstance(prompt, str) else prompt, params)
    assert llm.num_compiled == 0


def test_truncation_only_when_asked(llm):
    long = list(range(1, 250))
    params = SamplingParams(temperature=0, max_new_tokens=16)
    with pytest.raises(ConfigError, match="pass truncate=True"):
        llm.generate([long], params)
    result = llm.generate([long], params, truncate=True)[0]
    assert result.prompt_token_ids == long[-(256 - 16):]


@pytest.mark.parametrize("setting, message", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=1.0), "min_p"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_settings(setting, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**setting)


def test_unknown_model():
    with pytest.raises(FlaxlmError, match="unknown model .nope."):
        LLM.load("nope")


def test_stream_reports_tokens_and_reason(llm):
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    stream = llm.stream("The quick", params)
    text = "".join(stream)
    assert stream.num_tokens == 12 and stream.finish_reason == "length"
    assert text == llm.generate("The quick", params)[0].text
    assert stream.ttft_s > 0 and stream.decode_tokens_per_s > 0
