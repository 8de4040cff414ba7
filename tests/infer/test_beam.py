"""Beam search against transformers' `generate(num_beams=K, do_sample=False)`.

Identical hypotheses, in the same order, with the same scores: on tiny random
llama and gpt2 models over the grid of beams x length penalty x early-stopping
mode x returned sequences, with and without eos being reached (one or two eos
ids), min_new_tokens, three prompts of different lengths per batch (prompts
drawn anew per case); and on the real SmolLM2 for a few cases. A differing
result is accepted only where HF's own decision was a float tie (see
beam_reference), and it is printed.

A score is `sum_logprobs / len ** length_penalty`, a sum of `len` logprobs that
each carry float32 noise (~1e-5 on SmolLM2). Scores are compared at 1e-4 per
token: |diff| <= 1e-4 * max(1, len ** (1 - length_penalty)), which is 1e-4 for
a penalty >= 1 (HF's default 1 scores the mean logprob) and grows with the
length below it (penalty 0 scores the plain sum; -1 multiplies it by the length,
where float32 itself resolves a score of ~2000 to ~1e-4 only).
"""

import numpy as np
import pytest

from flaxlm.infer.beam import run_beam_batch
from flaxlm.infer.llm import LLM
from flaxlm.infer.sampling import SamplingParams
from flaxlm.model import ConfigError
from tests.hf_models import make_hf_model, save_tokenizer
from tests.infer.beam_reference import TIE, hf_beam
from tests.infer.greedy_reference import compare_greedy, hf_greedy

NEW = 24  # one new-token bucket (17..32) for every case
PROMPT_LENGTHS = (5, 13, 30)  # one prompt bucket (32), one batch bucket (4)
PENALTIES = (0.0, 1.0, 2.0, -1.0)
MODES = (False, True, "never")


SEEDS = {"llama-gqa": 0, "gpt2": 1}  # weights; prompts are drawn per case


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (HF model, flaxlm LLM of the same weights, their directory), built once."""
    built = {}

    def get(name):
        if name not in built:
            hf_model = make_hf_model(name, seed=SEEDS[name])
            directory = tmp_path_factory.mktemp(name)
            hf_model.save_pretrained(directory, safe_serialization=True)
            save_tokenizer(directory, hf_model.config.vocab_size)
            built[name] = hf_model, LLM.load(directory), directory
        return built[name]

    return get


@pytest.fixture(scope="module")
def llama(tiny):
    return tiny("llama-gqa")


def _prompts(vocab, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in PROMPT_LENGTHS]


def _params(num_beams, eos, **settings):
    """Beam settings with `eos` (a tuple of ids, maybe empty) as the only eos ids."""
    return SamplingParams(num_beams=num_beams, max_new_tokens=NEW, ignore_eos=True,
                          stop_token_ids=eos, **settings)


def compare(ours, hf_model, prompts, params, eos, label) -> list[str]:
    """Assert flaxlm's results (R best hypotheses and scores per prompt) equal HF's;
    returns the reports of accepted float-tie divergences."""
    reports = []
    for i, (prompt, result) in enumerate(zip(prompts, ours)):
        ref = hf_beam(hf_model, prompt, num_beams=params.num_beams,
                      num_return=params.num_return_sequences, max_new=params.max_new_tokens,
                      eos=eos, length_penalty=params.length_penalty,
                      early_stopping=params.early_stopping, min_new=params.min_new_tokens)
        hyps = [o.token_ids for o in result.outputs]
        scores = np.array([o.score for o in result.outputs])
        lengths = np.array([len(h) for h in hyps], np.float64)
        tolerance = TIE * np.maximum(1.0, lengths ** (1 - params.length_penalty))
        same = hyps == ref.hypotheses and bool(np.all(np.abs(scores - ref.scores) <= tolerance))
        if not same:
            where = f"{label} prompt {i}"
            assert ref.margin < TIE, (f"{where}: flaxlm {hyps} {scores.tolist()} vs HF "
                                      f"{ref.hypotheses} {ref.scores}; HF's closest call was "
                                      f"{ref.margin:.1e} apart, not a tie")
            reports.append(f"{where}: float tie (HF margin {ref.margin:.1e}), results differ")
            print(reports[-1])
            continue
        for out in result.outputs:
            ends = out.token_ids[-1] in eos
            assert out.finish_reason == ("stop" if ends else "length")
    return reports


def check(llm, hf_model, prompts, params, eos, label):
    """Generate with flaxlm and compare with HF; returns flaxlm's results."""
    results = llm.generate(prompts, params)
    compare(results, hf_model, prompts, params, eos, label)
    return results


def _eos_that_beams_reach(llm, prompts, num_beams, count=1):
    """`count` tokens the best hypothesis of prompt 0 produces early on: make them the eos."""
    best = llm.generate(prompts, _params(num_beams, ()))[0].token_ids
    fresh = [t for i, t in enumerate(best) if i >= 3 and t not in best[:i]] + best[3:]
    return tuple(dict.fromkeys(fresh))[:count]


@pytest.mark.parametrize("num_beams", [2, 4, 8])
@pytest.mark.parametrize("name", list(SEEDS))
def test_matches_hf_grid(tiny, name, num_beams):
    hf_model, llm, _ = tiny(name)
    vocab = llm.config.vocab_size
    ended = []
    for j in range(2):  # no eos: every hypothesis runs to max_new_tokens
        penalty = PENALTIES[(num_beams + j) % 4]
        prompts = _prompts(vocab, seed=100 * num_beams + j)
        params = _params(num_beams, (), length_penalty=penalty, early_stopping=MODES[j],
                         num_return_sequences=num_beams)
        check(llm, hf_model, prompts, params, (), f"{name} K={num_beams} lp={penalty}")
    for j, mode in enumerate(MODES):
        prompts = _prompts(vocab, seed=1000 * num_beams + j)
        eos = _eos_that_beams_reach(llm, prompts, num_beams, count=2 if mode is True else 1)
        for penalty in PENALTIES:
            returned = num_beams if penalty != 1.0 else 1
            params = _params(num_beams, eos, length_penalty=penalty, early_stopping=mode,
                             num_return_sequences=returned)
            label = f"{name} K={num_beams} eos={eos} lp={penalty} early_stopping={mode}"
            results = check(llm, hf_model, prompts, params, eos, label)
            ended += [o.finish_reason for r in results for o in r.outputs]
    params = _params(num_beams, eos, min_new_tokens=8, num_return_sequences=num_beams)
    check(llm, hf_model, prompts, params, eos, f"{name} K={num_beams} min_new_tokens=8")
    assert "stop" in ended and "length" in ended  # eos was reached, and not always


def test_a_real_divergence_fails(llama):
    """The comparison is not vacuous: flaxlm's hypotheses in another order, where HF's
    choices were no tie, fail it."""
    hf_model, llm, _ = llama
    prompts = _prompts(llm.config.vocab_size, seed=11)
    params = _params(4, (), num_return_sequences=4)
    results = llm.generate(prompts, params)
    ref = hf_beam(hf_model, prompts[0], num_beams=4, num_return=4, max_new=NEW, eos=(),
                  length_penalty=1.0, early_stopping=False)
    assert ref.margin >= TIE
    results[0].outputs.reverse()
    with pytest.raises(AssertionError, match="not a tie"):
        compare(results[:1], hf_model, prompts[:1], params, (), "reversed")


def test_one_beam_is_greedy(llama):
    """The beam program with K=1 (early_stopping=False) chooses greedy's tokens, and its
    score is greedy's summed logprob over the length; num_beams=1 through `generate` is
    the greedy path itself."""
    hf_model, llm, _ = llama
    prompts = _prompts(llm.config.vocab_size, seed=7)
    free = hf_greedy(hf_model, prompts[1], NEW, eos=None)[0]
    eos = free[6]
    params = SamplingParams(temperature=0, num_beams=1, max_new_tokens=NEW, ignore_eos=True,
                            stop_token_ids=(eos,))
    greedy = llm.generate(prompts, params)
    beams, _ = run_beam_batch(llm.programs, llm.tokenizer, llm._rows(prompts, params))
    for i, (prompt, g, b) in enumerate(zip(prompts, greedy, beams)):
        ref, ref_logits = hf_greedy(hf_model, prompt, NEW, eos=eos)
        compare_greedy(g.token_ids, ref, ref_logits, f"greedy prompt {i}")
        assert b[0].token_ids == g.token_ids and b[0].finish_reason == g.finish_reason
        expected = g.outputs[0].cumulative_logprob / len(g.token_ids)
        assert b[0].score == pytest.approx(expected, abs=1e-4)
    assert any(g.finish_reason == "stop" for g in greedy)


def test_other_beam_settings_compile_nothing_new(llama):
    llm = llama[1]
    llm.generate("The quick brown fox", SamplingParams(num_beams=4, max_new_tokens=20))
    before = llm.num_compiled
    for i, extra in enumerate([dict(length_penalty=2.0), dict(length_penalty=-0.5),
                               dict(early_stopping=True, min_new_tokens=3, num_return_sequences=4),
                               dict(early_stopping="never", stop_token_ids=(3, 4),
                                    ignore_eos=True, num_return_sequences=2)]):
        llm.generate(("Hello", "Hello, world!", "The lazy dog", "fox")[i],  # same prompt bucket
                     SamplingParams(num_beams=4, max_new_tokens=17 + i, **extra))
    assert llm.num_compiled == before


def test_results_best_first_with_scores(llama):
    llm = llama[1]
    params = SamplingParams(num_beams=4, num_return_sequences=3, max_new_tokens=20,
                            length_penalty=0.5)
    result = llm.generate("The quick brown fox", params)[0]
    assert len(result.outputs) == 3 and result.text == result.outputs[0].text
    scores = [o.score for o in result.outputs]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(o.token_ids) for o in result.outputs}) == 3
    for out in result.outputs:
        assert out.score == pytest.approx(out.cumulative_logprob / len(out.token_ids) ** 0.5,
                                          rel=1e-5)
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("settings, message", [
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=4, num_return_sequences=5), "num_return_sequences=5 must be <= num_beams=4"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(num_beams=2, temperature=0.7), "temperature=0.7 cannot be combined with num_beams"),
    (dict(num_beams=2, top_k=5), "top_k=5 cannot be combined"),
    (dict(num_beams=2, top_p=0.9), "top_p"),
    (dict(num_beams=2, repetition_penalty=1.2), "repetition_penalty"),
    (dict(num_beams=2, seed=1), "seed"),
    (dict(num_beams=2, n=2), "n=2"),
    (dict(num_beams=2, logprobs=1), "logprobs"),
    (dict(num_beams=2, stop=["x"]), "stop"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty"),
    (dict(length_penalty=2.0), "length_penalty=2.0 applies to beam search only"),
    (dict(early_stopping=True), "early_stopping"),
])
def test_bad_beam_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**settings)


def test_stream_rejects_beams(llama):
    with pytest.raises(ConfigError, match="stream cannot show beam search"):
        llama[1].stream("Hello", SamplingParams(num_beams=2))


def test_cli_beams(llama, capsys):
    from flaxlm.model.cli import main

    argv = ["generate", "--model", str(llama[2]), "--prompt", "The quick",
            "--num-beams", "4", "--num-return-sequences", "2", "--length-penalty", "0.5",
            "--early-stopping", "never", "--max-new-tokens", "6"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- beam") == 2 and "score" in out


# ------------------------------------------------------------------ the real SmolLM2

QUESTIONS = ["What is 2+2?", "Name a color of the sky, in one word, please."]
SMOL_NEW = 16


@pytest.fixture(scope="module")
def smol(smollm2):
    model, tokenizer = smollm2
    return LLM(model, tokenizer)


@pytest.mark.parametrize("penalty, mode, returned", [(1.0, False, 4), (2.0, "never", 1),
                                                      (0.0, True, 4)])
def test_smollm2_matches_hf(smol, smollm2_hf, penalty, mode, returned):
    prompts = [smol.chat_prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    eos = tuple(smol.tokenizer.eos_token_ids)
    params = SamplingParams(num_beams=4, num_return_sequences=returned, max_new_tokens=SMOL_NEW,
                            length_penalty=penalty, early_stopping=mode)
    if mode is False:  # through chat(), a batch of conversations
        results = smol.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params)
    else:
        results = smol.generate(prompts, params)
    compare(results, smollm2_hf, prompts, params, eos,
            f"SmolLM2 lp={penalty} early_stopping={mode}")
    if returned == 4:  # some hypotheses end in eos
        assert any(o.finish_reason == "stop" for r in results for o in r.outputs)
