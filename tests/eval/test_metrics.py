"""ROUGE, BLEU and chrF equal the packages' own results; answer extraction and majority vote."""

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from flaxlm.eval.generation import answer_metrics, extractor
from flaxlm.eval.metrics import bootstrap, corpus_bleu, corpus_chrf, mean, rouge

PREDICTIONS = ["the cat sat on the mat", "a quick brown fox", "hello there world"]
REFERENCES = [["the cat is on the mat", "there is a cat on the mat"], ["the quick brown fox"],
              ["hello world"]]


def test_rouge_equals_rouge_score():
    ours = rouge(PREDICTIONS, REFERENCES)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for i, (prediction, refs) in enumerate(zip(PREDICTIONS, REFERENCES)):
        best = {k: max(scorer.score(r, prediction)[k].fmeasure for r in refs)
                for k in ("rouge1", "rouge2", "rougeL")}
        for kind, value in best.items():
            assert ours[kind][i] == pytest.approx(value, abs=1e-12)
    assert ours["rougeL"][0] == pytest.approx(2 * (5 / 6) * (5 / 6) / (5 / 6 + 5 / 6))


def test_bleu_and_chrf_equal_sacrebleu():
    streams = [[r[0] for r in REFERENCES], [REFERENCES[0][1], None, None]]
    assert corpus_bleu(PREDICTIONS, REFERENCES) == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, streams).score, abs=1e-12)
    assert corpus_chrf(PREDICTIONS, REFERENCES) == pytest.approx(
        sacrebleu.corpus_chrf(PREDICTIONS, streams).score, abs=1e-12)
    assert corpus_bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == \
        pytest.approx(100.0)


def test_mean_and_bootstrap_standard_errors():
    m = mean([1.0, 0.0, 1.0, 1.0])
    assert m.value == 0.75 and m.stderr == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
    values = np.arange(20.0)
    b = bootstrap(lambda i: float(values[i].mean()), 20, seed=3)
    assert b.value == pytest.approx(9.5) and b.stderr == pytest.approx(
        values.std(ddof=1) / np.sqrt(20), rel=0.15)
    assert bootstrap(lambda i: float(values[i].mean()), 20, seed=3) == b  # seeded


def test_self_consistency_majority_and_single_sample_accuracy():
    extract = extractor(r"answer is (\d+)")
    samples = [["the answer is 4", "answer is 5", "the answer is 4", "no idea"],
               ["answer is 7", "answer is 8", "answer is 8", "answer is 7"],
               ["answer is 1", "answer is 2", "answer is 2", "answer is 3"]]
    references = [["4"], ["The answer is 7"], ["1"]]
    out = answer_metrics(samples, references, extract, n=4)
    # majority: 4 (right); 7 vs 8 tie -> the first seen, 7 (right); 2 (wrong)
    assert out["maj@4"].value == pytest.approx(2 / 3)
    # single samples right: 2/4, 2/4, 1/4
    assert out["acc@1"].value == pytest.approx(np.mean([0.5, 0.5, 0.25]))
    single = answer_metrics([s[:1] for s in samples], references, extract, n=1)
    assert single["extract_match"].value == pytest.approx(1.0)
