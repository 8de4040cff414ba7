"""HF beam search as the reference, and a replay of HF's choices that measures their margins.

`hf_beam` runs transformers' `generate(num_beams=K, do_sample=False, ...)` on one
unpadded prompt. `replay` re-runs HF's selection rules in numpy on the
log-probabilities HF itself produced (`output_scores=True`) and records how far
apart the candidates were at every decision that mattered (the K-th vs the next
continuation, the K-th vs the next finished hypothesis, the early-stop test, the
order of the returned hypotheses). A flaxlm result that differs from HF's is
accepted only when that margin is below `TIE`: a float tie, not a bug.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

NEG = np.float32(-1e9)
TIE = 1e-4


@dataclasses.dataclass
class Reference:
    hypotheses: list[list[int]]  # the R best generated sequences (cut after eos), best first
    scores: list[float]          # their sequences_scores
    margin: float                # the closest call among HF's decisions


def hf_beam(hf_model, prompt: list[int], *, num_beams: int, num_return: int, max_new: int,
            eos: tuple[int, ...], length_penalty: float, early_stopping, min_new: int = 0
            ) -> Reference:
    """HF's R best hypotheses of one prompt; `eos` may be empty (none)."""
    ids = torch.tensor([prompt])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 cores beside JAX's threads, 2 torch threads run ~6x slower
    try:
        with torch.no_grad():
            out = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                min_new_tokens=min_new or None, num_beams=num_beams, do_sample=False,
                num_return_sequences=num_return, length_penalty=length_penalty,
                early_stopping=early_stopping, eos_token_id=list(eos) or None,
                pad_token_id=eos[0] if eos else 0, output_scores=True,
                return_dict_in_generate=True, top_k=None, top_p=None, temperature=None)
    finally:
        torch.set_num_threads(threads)
    hyps = [_cut(s[len(prompt):], eos) for s in out.sequences.tolist()]
    steps = [s.float().numpy() for s in out.scores]  # each [beams, vocab]
    replayed = replay(steps, num_beams=num_beams, num_return=num_return, max_new=max_new,
                      eos=eos, length_penalty=length_penalty,
                      early_stopping=early_stopping)
    scores = out.sequences_scores.tolist()
    if replayed.margin > 0:  # else an exact tie in HF's choices: the replay may order it otherwise
        assert replayed.hypotheses == hyps, "the replay of HF's beam search disagrees with HF"
        np.testing.assert_allclose(replayed.scores, scores, rtol=1e-6)
    return Reference(hypotheses=hyps, scores=scores, margin=replayed.margin)


def _cut(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[:ends[0] + 1] if ends else tokens


def _gap(a, b) -> float:
    """|a - b| for two live scores (not masked to about -1e9), else inf."""
    if a < NEG / 2 or b < NEG / 2 or not np.isfinite(a) or not np.isfinite(b):
        return float("inf")
    return float(abs(a - b))


def replay(steps: list[np.ndarray], *, num_beams: int, num_return: int, max_new: int,
           eos: tuple[int, ...], length_penalty: float, early_stopping) -> Reference:
    """HF's `_beam_search` rules on HF's per-step log-probabilities, one prompt."""
    k = num_beams
    running = np.full(k, NEG, np.float32)
    running[0] = 0
    running_tokens: list[list[int]] = [[] for _ in range(k)]
    fin_scores = np.full(k, NEG, np.float32)
    fin_tokens: list[list[int]] = [[] for _ in range(k)]
    fin_flags = np.zeros(k, bool)
    improvable, margins = True, [float("inf")]
    for t, logprobs in enumerate(steps):  # logprobs [beams, vocab]
        vocab = logprobs.shape[1]
        acc = (logprobs + running[:, None]).astype(np.float32).ravel()  # [beams * vocab]
        ends = np.isin(np.arange(acc.size) % vocab, eos) | (t + 1 >= max_new)
        order = np.argsort(-acc, kind="stable")
        if ends[order[k - 1]] or ends[order[k]]:  # which continuations may finish
            margins.append(_gap(acc[order[k - 1]], acc[order[k]]))
        top = order[:k]
        extend = lambda i: running_tokens[i // vocab] + [int(i % vocab)]  # noqa: E731
        penalized = acc[top] / ((t + 1) ** length_penalty) + (~ends[top]).astype(np.float32) * NEG
        merged = np.concatenate([fin_scores, penalized.astype(np.float32)])
        merged_tokens = fin_tokens + [extend(i) for i in top]
        merged_flags = np.concatenate([fin_flags, ends[top]])
        best = np.argsort(-merged, kind="stable")
        margins.append(_gap(merged[best[k - 1]], merged[best[k]]))
        fin_scores, fin_flags = merged[best[:k]], merged_flags[best[:k]]
        fin_tokens = [merged_tokens[i] for i in best[:k]]

        masked = acc + ends.astype(np.float32) * NEG
        chosen = np.argsort(-masked, kind="stable")
        if t + 1 < max_new:
            margins.append(_gap(masked[chosen[k - 1]], masked[chosen[k]]))
        running = masked[chosen[:k]]
        if np.any((running[:-1] == running[1:]) & (running[1:] > NEG / 2)):
            margins.append(0.0)  # an exact tie: which row of HF's next scores is which beam is lost
        running_tokens = [extend(i) for i in chosen[:k]]

        length = max_new if early_stopping == "never" and length_penalty > 0 else t + 1
        best_possible = running[0] / (length ** length_penalty)
        if fin_flags.all():
            margins.append(_gap(best_possible, fin_scores.min()))
        worst = np.where(fin_flags, fin_scores.min(), NEG)
        improvable = improvable and bool(np.any(best_possible > worst))
        if not improvable or (early_stopping is True and fin_flags.all()) or t + 1 >= max_new:
            break
    for a, b in zip(fin_scores[:num_return], fin_scores[1:num_return + 1]):
        margins.append(_gap(a, b))
    return Reference(hypotheses=fin_tokens[:num_return], scores=fin_scores[:num_return].tolist(),
                     margin=min(margins))
