"""HF beam search as the reference, a replay of its decisions, and where another search departs.

`hf_beam` runs transformers' `generate(num_beams=K, do_sample=False, ...)` on one
unpadded prompt, recording which sequence each of HF's beam rows holds at every
step. `replay` re-runs HF's selection rules in numpy on the log-probabilities HF
itself produced and keeps HF's state after every step: the running beams with
their summed logprobs, the finished hypotheses best first, and whether the search
is done. It must reproduce HF's rows at every step and HF's result.

`first_difference` walks flaxlm's states (from `flaxlm.infer.beam.beam_steps`)
beside HF's and stops at the first step whose outcome differs. Both searches
entered that step in the same state, so only that step's decisions can explain
the difference, and its margin is measured in HF's own numbers: how far HF's
scores were from choosing what flaxlm chose. A differing result is a float tie,
not a bug, only when that margin is below `TIE`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from tests.infer.greedy_reference import one_torch_thread

NEG = np.float32(-1e9)
TIE = 1e-4

Seq = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Settings:
    num_beams: int
    num_return: int
    max_new: int
    eos: tuple[int, ...]
    length_penalty: float
    early_stopping: bool | str
    min_new: int = 0


@dataclasses.dataclass
class Step:
    """A search's state after one step, for one prompt."""

    running: dict[Seq, float]          # live running beams -> summed logprob
    finished: list[tuple[Seq, float]]  # finished hypotheses, best first, with scores
    done: bool


@dataclasses.dataclass
class Decision:
    """HF's step t: its inputs and outcome, enough to score any other outcome in HF's numbers."""

    t: int
    before: Step                       # HF's state entering the step
    logprobs: dict[Seq, np.ndarray]    # running beam -> its next-token logprobs [vocab]
    top: np.ndarray                    # the K + 1 best summed scores of all continuations
    after: Step
    stop_gap: float                    # |best running - worst finished| of the early-stop test


@dataclasses.dataclass
class Reference:
    hypotheses: list[list[int]]  # the R best generated sequences (cut after eos), best first
    scores: list[float]          # their sequences_scores
    decisions: list[Decision]    # HF's steps, replayed
    settings: Settings


@dataclasses.dataclass(frozen=True)
class Difference:
    step: int
    what: str      # which decision differs: "running", "finished" or "done"
    margin: float  # how far HF's scores were from flaxlm's outcome

    def __str__(self):
        return f"step {self.step} ({self.what} beams), HF margin {self.margin:.1e}"


class _Rows(LogitsProcessor):
    """Records the sequences of HF's beam rows at every step (changes nothing)."""

    def __init__(self, prompt_len: int):
        self.prompt_len, self.steps = prompt_len, []

    def __call__(self, input_ids, scores):
        self.steps.append([tuple(r) for r in input_ids[:, self.prompt_len:].tolist()])
        return scores


def hf_beam(hf_model, prompt: list[int], s: Settings) -> Reference:
    """HF's R best hypotheses of one prompt, and HF's search replayed; `s.eos` may be empty."""
    ids = torch.tensor([prompt])
    rows = _Rows(len(prompt))
    with torch.no_grad(), one_torch_thread():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.max_new,
            min_new_tokens=s.min_new or None, num_beams=s.num_beams, do_sample=False,
            num_return_sequences=s.num_return, length_penalty=s.length_penalty,
            early_stopping=s.early_stopping, eos_token_id=list(s.eos) or None,
            pad_token_id=s.eos[0] if s.eos else 0, output_scores=True,
            return_dict_in_generate=True, top_k=None, top_p=None, temperature=None,
            logits_processor=LogitsProcessorList([rows]))
    hyps = [cut(x[len(prompt):], s.eos) for x in out.sequences.tolist()]
    steps = [{} for _ in out.scores]  # per step: row sequence -> its logprobs (first row wins)
    for step, r, lp in zip(steps, rows.steps, out.scores):
        for q, row in zip(r, lp.float().numpy()):
            step.setdefault(q, row)

    def next_logprobs(t: int, seq: Seq) -> np.ndarray:
        assert seq in steps[t], f"the replay of HF's search runs {seq} at step {t}; HF does not"
        return steps[t][seq]

    decisions = replay(next_logprobs, s)
    assert len(decisions) == len(steps), "the replay of HF's beam search stops elsewhere"
    for t, d in enumerate(decisions):  # the replay's running beams are HF's rows at every step
        assert set(d.before.running) == set(steps[t]), f"replay and HF differ entering step {t}"
    scores = out.sequences_scores.tolist()
    final = decisions[-1].after.finished[:s.num_return]
    assert [list(q) for q, _ in final] == hyps, "the replay of HF's beam search disagrees with HF"
    np.testing.assert_allclose([x for _, x in final], scores, rtol=1e-6)
    return Reference(hypotheses=hyps, scores=scores, decisions=decisions, settings=s)


def cut(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[:ends[0] + 1] if ends else tokens


def _gap(a, b) -> float:
    """a - b for two live scores (not masked to about -1e9), else inf."""
    if a < NEG / 2 or b < NEG / 2 or not np.isfinite(a) or not np.isfinite(b):
        return float("inf")
    return float(a - b)


# ------------------------------------------------------------------ the replay

def replay(next_logprobs: Callable[[int, Seq], np.ndarray], s: Settings) -> list[Decision]:
    """HF's `_beam_search` rules for one prompt; `next_logprobs(t, seq)` gives the running
    beam `seq`'s (processed) next-token logprobs at step t. One Decision per step run."""
    entering = Step(running={(): 0.0}, finished=[], done=False)
    decisions, improvable = [], True
    for t in range(s.max_new):
        logprobs = {seq: next_logprobs(t, seq) for seq in entering.running}
        decision, improvable = _replay_step(t, entering, logprobs, improvable, s)
        decisions.append(decision)
        if decision.after.done:
            break
        entering = decision.after
    return decisions


def _continuations(entering: Step, logprobs: dict[Seq, np.ndarray]):
    """All continuations of the running beams, in HF's flat order (beam-major; no dead beams):
    (parent beams, summed scores float32 [beams * vocab], vocabulary size)."""
    parents = list(entering.running)
    acc = [(logprobs[q] + np.float32(entering.running[q])).astype(np.float32) for q in parents]
    return parents, np.concatenate(acc), acc[0].size


def _replay_step(t, entering: Step, logprobs, improvable, s: Settings):
    k = s.num_beams
    parents, acc, vocab = _continuations(entering, logprobs)
    seq = lambda i: parents[i // vocab] + (int(i % vocab),)  # noqa: E731
    ends = np.isin(np.arange(acc.size) % vocab, s.eos) | (t + 1 >= s.max_new)
    order = np.argsort(-acc, kind="stable")
    fin = list(entering.finished)
    penalty = np.float32((t + 1) ** s.length_penalty)
    fin += [(seq(i), float(acc[i] / penalty)) for i in order[:k] if ends[i]]  # the candidates
    fin = sorted(fin, key=lambda f: -f[1])[:k]  # stable: earlier hypotheses first on a tie
    masked = np.where(ends, NEG + acc, acc).astype(np.float32)
    chosen = np.argsort(-masked, kind="stable")[:k]
    running = {seq(i): float(masked[i]) for i in chosen if masked[i] > NEG / 2}

    length = s.max_new if s.early_stopping == "never" and s.length_penalty > 0 else t + 1
    best_possible = masked[chosen[0]] / np.float32(length ** s.length_penalty)
    full = len(fin) == k
    worst = min(f[1] for f in fin) if full else float(NEG)
    stop_gap = abs(_gap(best_possible, worst)) if full else float("inf")
    improvable = improvable and bool(best_possible > worst)
    done = not improvable or (s.early_stopping is True and full) or t + 1 >= s.max_new
    after = Step(running=running, finished=fin, done=done)
    return Decision(t, entering, logprobs, acc[order[:k + 1]], after, stop_gap), improvable


# ------------------------------------------------------------------ where flaxlm departs

def steps_of(states, b: int) -> list[Step]:
    """Prompt b's states from `flaxlm.infer.beam.beam_steps`, up to the step it is done."""
    steps = []
    for state in states:
        t, hyps = int(state.step), state.hyps
        running = {tuple(state.running_tokens[b, k, :t].tolist()): float(score)
                   for k, score in enumerate(state.running_scores[b]) if score > NEG / 2}
        finished = [(tuple(hyps.tokens[b, k, :hyps.num_tokens[b, k]].tolist()),
                     float(hyps.scores[b, k]))
                    for k in range(hyps.scores.shape[1]) if hyps.finished[b, k]]
        steps.append(Step(running=running, finished=finished, done=bool(state.done[b])))
        if steps[-1].done:
            break
    return steps


def excuse(ref: Reference, hyps: list[list[int]], steps: list[Step], label: str) -> str:
    """Assert that flaxlm's hypotheses `hyps`, which differ from HF's, come from a float tie
    at the first step where flaxlm's search (`steps`) departs from HF's; returns a report."""
    ends_in = [list(q) for q, _ in steps[-1].finished[:len(hyps)]] if steps else []
    assert ends_in == hyps, f"{label}: flaxlm's stepped search does not end in its result"
    diff = first_difference(ref, steps)
    assert diff is not None, f"{label}: results differ from HF's, yet every decision agreed"
    assert diff.margin < TIE, (f"{label}: flaxlm {hyps} vs HF {ref.hypotheses}; they first "
                               f"differ at {diff}: not a tie")
    return f"{label}: float tie at {diff}"


def first_difference(ref: Reference, ours: list[Step]) -> Difference | None:
    """The first step where `ours` (flaxlm's states, one per step) differs from HF's, with
    HF's margin at that step's differing decision; None if every step agrees."""
    for t, d in enumerate(ref.decisions):
        if t >= len(ours):
            return Difference(t, "done", float("inf"))  # flaxlm stopped earlier: not HF's rule
        mine = ours[t]
        if set(mine.running) != set(d.after.running):
            return Difference(t, "running", _running_margin(d, mine, ref.settings))
        if [q for q, _ in mine.finished] != [q for q, _ in d.after.finished]:
            return Difference(t, "finished", _finished_margin(d, mine, ref.settings))
        if mine.done != d.after.done:
            return Difference(t, "done", d.stop_gap)
    if len(ours) > len(ref.decisions):
        return Difference(len(ref.decisions) - 1, "done", float("inf"))
    return None


def _acc(d: Decision, seq: Seq) -> float:
    """HF's summed score of a continuation of one of its running beams (-inf if none)."""
    parent = seq[:-1]
    if len(seq) != d.t + 1 or parent not in d.before.running:
        return float("-inf")
    lp = d.logprobs[parent][seq[-1]]
    return float(np.float32(lp + np.float32(d.before.running[parent])))


def _ends(seq: Seq, t: int, s: Settings) -> bool:
    return seq[-1] in s.eos or t + 1 >= s.max_new


def _running_margin(d: Decision, mine: Step, s: Settings) -> float:
    """How far HF's scores were from running flaxlm's beams instead of its own: the best
    of HF's beams that flaxlm dropped minus the worst of those flaxlm ran instead."""
    kept = [v for q, v in d.after.running.items() if q not in mine.running]
    taken = [float(NEG) if _ends(q, d.t, s) else _acc(d, q)
             for q in mine.running if q not in d.after.running]
    if len(kept) != len(taken):
        return float("inf")
    return max(0.0, _gap(max(kept), min(taken)))


def _hf_finished_score(d: Decision, seq: Seq, s: Settings) -> tuple[float, float]:
    """(HF's score of `seq` in step t's merge, how far it was from being a candidate there)."""
    old = dict(d.before.finished)
    if seq in old:
        return old[seq], 0.0
    acc = _acc(d, seq)
    if not _ends(seq, d.t, s) or not np.isfinite(acc):
        return float(NEG), float("inf")
    score = float(np.float32(acc / np.float32((d.t + 1) ** s.length_penalty)))
    return score, max(0.0, _gap(d.top[s.num_beams - 1], acc))


def _finished_margin(d: Decision, mine: Step, s: Settings) -> float:
    """Set and order differences of the finished hypotheses, in HF's scores."""
    ours = [q for q, _ in mine.finished]
    hf = dict(d.after.finished)
    kept = {q: v for q, v in hf.items() if q not in ours}  # HF's, not flaxlm's
    taken, margin = {}, 0.0  # flaxlm's, not HF's
    for q in ours:
        if q not in hf:
            taken[q], candidacy = _hf_finished_score(d, q, s)
            margin = max(margin, candidacy)
    if kept and taken:
        margin = max(margin, _gap(max(kept.values()), min(taken.values())))
    if len(kept) > len(taken):  # flaxlm dropped some of HF's without replacing them
        margin = max([margin] + [_drop_gap(d, q) for q in kept])
    common = [q for q in ours if q in hf]
    for i, a in enumerate(common):  # pairs flaxlm orders one way and HF the other
        for b in common[i + 1:]:
            margin = max(margin, hf[b] - hf[a])
    return margin


def _drop_gap(d: Decision, seq: Seq) -> float:
    """How far a new candidate of HF's was from falling out of the K best continuations."""
    if seq in dict(d.before.finished):
        return float("inf")  # a finished hypothesis only leaves for a better one
    return max(0.0, _gap(_acc(d, seq), d.top[-1]))


def hf_sequence_score(hf_model, prompt: list[int], tokens: list[int], s: Settings) -> float:
    """HF's beam score of one given hypothesis: its summed logprob / length ** penalty."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad(), one_torch_thread():
        logits = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    total = float(logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].sum())
    return total / len(tokens) ** s.length_penalty
