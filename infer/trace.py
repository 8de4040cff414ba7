"""A look inside: every layer's residual stream and attention probabilities, and the logit
lens, for token batches (one compiled program per bucket, as generation)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.infer.embedding import padded_batches
from flaxlm.infer.engine import Programs
from flaxlm.model.decoder import Decoder


@dataclasses.dataclass
class TraceResult:
    """One text's forward pass, seen from inside (n = its tokens).

    residual[i] is the residual stream [n, hidden] after i blocks (residual[0] the
    embeddings; the last, after every block, before the final norm). attention[l, h] is
    layer l's head h attention probabilities [n queries, n keys] (rows sum to 1).
    With logit_lens=k: lens_ids / lens_logprobs [layers + 1, n, k], the top-k next tokens
    read from each residual through the final norm and the LM head (the last row equals
    the model's own prediction).
    """

    token_ids: list[int]
    tokens: list[str]
    logits: np.ndarray          # [n, vocab] float32
    residual: np.ndarray        # [layers + 1, n, hidden]
    attention: np.ndarray       # [layers, heads, n, n] float32
    lens_ids: np.ndarray | None = None
    lens_logprobs: np.ndarray | None = None


def trace_batch(model: Decoder, tokens: jax.Array, lengths: jax.Array, *, lens_k: int):
    """tokens [batch, seq] right-padded, lengths [batch] -> (Trace, lens top-k or None)."""
    mask = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)
    inside = model.trace(tokens, attention_mask=mask)
    if not lens_k:
        return inside, None

    def lens(residual):  # one layer at a time: [batch, seq, vocab] is the peak
        logprobs = jax.nn.log_softmax(model.logits(model.final_norm(residual)), axis=-1)
        values, ids = jax.lax.top_k(logprobs, lens_k)
        return ids, values

    return inside, jax.lax.map(lens, inside.residual)


def trace_ids(programs: Programs, ids: Sequence[Sequence[int]], *, logit_lens: int,
              max_rows: int, token_text) -> list[TraceResult]:
    """TraceResult per token-id list (each non-empty, within the context), batched by length
    into power-of-two buckets of rows and lengths."""
    program = programs.program("trace", trace_batch, static_argnames=("lens_k",))
    results: list[TraceResult | None] = [None] * len(ids)
    for chunk, tokens, lengths in padded_batches(ids, max_rows):
        inside, lens = jax.device_get(program(programs.state, tokens, lengths,
                                              lens_k=logit_lens))
        for row, i in enumerate(chunk):
            n = len(ids[i])
            results[i] = TraceResult(
                token_ids=[int(t) for t in ids[i]], tokens=[token_text(t) for t in ids[i]],
                logits=np.asarray(inside.logits[row, :n], np.float32),
                residual=np.asarray(inside.residual[:, row, :n]),
                attention=np.asarray(inside.attention[:, row, :, :n, :n]),
                lens_ids=None if lens is None else np.asarray(lens[0][:, row, :n]),
                lens_logprobs=None if lens is None else np.asarray(lens[1][:, row, :n]))
    return results
