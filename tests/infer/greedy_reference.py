"""Compare flaxlm greedy tokens with HF `generate(do_sample=False)`, allowing only float ties."""

from __future__ import annotations

import numpy as np
import torch

TIE = 1e-3  # HF top-2 logits closer than this are a float tie: either token is right


def hf_greedy(hf_model, prompt: list[int], max_new: int, eos: int | None):
    """HF greedy tokens and raw per-step logits for one unpadded prompt."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
            eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
            output_logits=True, return_dict_in_generate=True, top_k=None, top_p=None,
            temperature=None)
    tokens = out.sequences[0, len(prompt):].tolist()
    logits = torch.stack(out.logits, dim=1)[0].float().numpy()  # [steps, vocab]
    if eos is not None and eos in tokens:
        tokens = tokens[:tokens.index(eos) + 1]
    return tokens, logits


def compare_greedy(ours: list[int], ref: list[int], ref_logits: np.ndarray, label: str) -> str | None:
    """Assert equality up to the first divergence, which must be a float tie in HF's
    logits. Returns a report of an allowed divergence, None when identical."""
    for k, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            top2 = np.sort(ref_logits[k])[-2:]
            gap = float(top2[1] - top2[0])
            assert gap < TIE, (f"{label}: token {k} differs ({a} vs HF {b}) and HF's top-2 "
                               f"logits are {gap:.2e} apart, not a tie")
            report = f"{label}: float tie at step {k} (HF top-2 gap {gap:.1e}), tokens {a} vs {b}"
            print(report)
            return report
    assert len(ours) == len(ref), f"{label}: {len(ours)} tokens vs HF's {len(ref)}"
    return None
