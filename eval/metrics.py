"""Metrics and their standard errors: means, bootstrap, ROUGE (rouge-score), BLEU and chrF (sacrebleu).

Scales are each library's own: ROUGE F1 in [0, 1], BLEU and chrF in [0, 100].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclasses.dataclass(frozen=True)
class Metric:
    value: float
    stderr: float | None = None  # None: not estimable (a single example)

    def to_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "stderr": self.stderr}


def mean(values: Sequence[float]) -> Metric:
    """The mean and its standard error (sample standard deviation / sqrt(n), as lm-eval)."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return Metric(float(x.mean()) if len(x) else math.nan, None)
    return Metric(float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))))


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, seed: int = 0,
              resamples: int = BOOTSTRAP_RESAMPLES) -> Metric:
    """statistic(indices) over all n examples, its stderr the standard deviation over
    `resamples` resamples of the examples with replacement (seeded: reproducible)."""
    value = statistic(np.arange(n))
    if n < 2:
        return Metric(value, None)
    rng = np.random.default_rng(seed)
    draws = [statistic(rng.integers(0, n, n)) for _ in range(resamples)]
    return Metric(value, float(np.std(draws, ddof=1)))


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Per-example ROUGE-1/2/L F1 (rouge-score, Porter stemming), the best over references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out: dict[str, list[float]] = {kind: [] for kind in ROUGE_TYPES}
    for prediction, refs in zip(predictions, references):
        scores = scorer.score_multi(list(refs), prediction)
        for kind in ROUGE_TYPES:
            out[kind].append(scores[kind].fmeasure)
    return out


def _streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-example reference lists -> sacrebleu's reference streams (None where one has fewer)."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), _streams(references)).score)


def corpus_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), _streams(references)).score)


def corpus_metric(fn, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Metric:
    """A corpus-level score with a bootstrap standard error over examples."""
    preds, refs = list(predictions), list(references)
    return bootstrap(lambda idx: fn([preds[i] for i in idx], [refs[i] for i in idx]), len(preds),
                     resamples=200)
