"""Compare flaxlm greedy tokens with HF, allowing a different token only at a float tie.

flaxlm's logits agree with HF's within the parity tolerance `tol` (tests/model:
1e-4 on tiny models, 2e-4 on SmolLM2). flaxlm can prefer token a over HF's
argmax b only if a's logit plus `tol` reaches b's logit minus `tol`: HF's logit
of a is within 2 * tol of HF's maximum. So flaxlm's whole sequence is fed to the
HF model (teacher forcing), and at every position flaxlm's token must be HF's
greedy choice, or its runner-up within 2 * tol; after such a flip the rest must
still be HF-greedy along flaxlm's own sequence. Without a flip the sequence must
be exactly HF's `generate(do_sample=False)`.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from tests.model.test_hf_parity import ATOL as TINY_TOL  # noqa: F401  (re-exported)
from tests.model.test_smollm2 import ATOL as SMOLLM2_TOL  # noqa: F401


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread: on 2 cores beside JAX's threads, 2 torch threads run the
    reference ~10x slower (measured on SmolLM2 greedy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hf_greedy(hf_model, prompt: list[int], max_new: int, eos: int | None) -> list[int]:
    """HF's greedy tokens for one unpadded prompt (cut after eos)."""
    ids = torch.tensor([prompt])
    with torch.no_grad(), one_torch_thread():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
            eos_token_id=eos, pad_token_id=eos if eos is not None else 0, top_k=None,
            top_p=None, temperature=None)
    tokens = out[0, len(prompt):].tolist()
    return tokens[:tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


def teacher_forced_logits(hf_model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """HF's logits for each of `tokens` given the prompt and the tokens before it [n, vocab]."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad(), one_torch_thread():
        logits = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    return logits[len(prompt) - 1:-1].float().numpy()


def check_greedy(ours: list[int], ref: list[int], logits: np.ndarray, *, tol: float,
                 max_new: int, eos: int | None, label: str) -> list[int]:
    """Assert flaxlm's greedy `ours` against HF's greedy `ref` and HF's teacher-forced
    `logits` along `ours` [len(ours), vocab]; returns the positions where flaxlm took
    HF's runner-up within the float tie 2 * tol (each is printed)."""
    flips = []
    for k, token in enumerate(ours):
        best = int(np.argmax(logits[k]))
        gap = float(logits[k, best] - logits[k, token])
        assert gap <= 2 * tol, (
            f"{label}: token {k} is {token}, HF's logit of it is {gap:.2e} below HF's "
            f"greedy {best}: more than 2 x {tol:g}, not a tie")
        if token != best:
            flips.append(k)
            print(f"{label}: float tie at token {k} (HF gap {gap:.1e}), {token} vs HF {best}")
    ended = eos is not None and eos in ours
    assert not ended or ours.index(eos) == len(ours) - 1, f"{label}: tokens after eos"
    assert ended or len(ours) == max_new, f"{label}: {len(ours)} tokens, no eos"
    if not flips:
        assert ours == ref, f"{label}: HF greedy along flaxlm's tokens, yet {ours} vs HF {ref}"
    return flips


def compare_greedy(hf_model, prompt: list[int], ours: list[int], *, tol: float, max_new: int,
                   eos: int | None = None, label: str) -> list[int]:
    """Check flaxlm's greedy tokens for `prompt` against the HF model (see check_greedy)."""
    ref = hf_greedy(hf_model, prompt, max_new, eos)
    logits = teacher_forced_logits(hf_model, prompt, ours)
    return check_greedy(ours, ref, logits, tol=tol, max_new=max_new, eos=eos, label=label)
