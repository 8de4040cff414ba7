"""Sentence embeddings from the final hidden states, one compiled program per bucket."""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.infer.engine import Programs
from flaxlm.infer.generate import MIN_PROMPT_BUCKET, bucket
from flaxlm.model.decoder import Decoder

POOLINGS = ("mean", "last")


def pool(model: Decoder, tokens: jax.Array, lengths: jax.Array, *, pooling: str) -> jax.Array:
    """tokens [batch, seq] right-padded, lengths [batch] -> [batch, embed] float32: the mean of
    the final (normed) hidden states over real tokens, or the last real token's."""
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]  # [batch, seq]
    hidden, _ = model.hidden(tokens, attention_mask=mask.astype(jnp.int32))
    hidden = hidden.astype(jnp.float32)
    if pooling == "last":
        return jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    total = jnp.sum(jnp.where(mask[:, :, None], hidden, 0.0), axis=1)
    return total / lengths[:, None].astype(jnp.float32)


def padded_batches(ids: Sequence[Sequence[int]], max_rows: int
                   ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """(indices, tokens [rows, seq] right-padded, lengths [rows]) over `ids` sorted by length,
    rows and seq rounded up to powers of two (one compiled program per bucket); padding
    rows have length 1."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), max_rows):
        chunk = order[start:start + max_rows]
        seq = bucket(max(len(ids[i]) for i in chunk), MIN_PROMPT_BUCKET)
        tokens = np.zeros((bucket(len(chunk), 1), seq), np.int32)
        lengths = np.ones((tokens.shape[0],), np.int32)
        for row, i in enumerate(chunk):
            tokens[row, :len(ids[i])] = ids[i]
            lengths[row] = len(ids[i])
        yield chunk, tokens, lengths


def embed_ids(programs: Programs, ids: Sequence[Sequence[int]], *, pooling: str, normalize: bool,
              max_rows: int) -> np.ndarray:
    """[n, embed] float32 for token-id lists (each non-empty and within the context),
    sorted by length into power-of-two buckets of rows and lengths."""
    program = programs.program("embed", pool, static_argnames=("pooling",))
    out = np.zeros((len(ids), programs.config.embed_dim), np.float32)
    for chunk, tokens, lengths in padded_batches(ids, max_rows):
        pooled = np.asarray(program(programs.state, tokens, lengths, pooling=pooling))
        out[chunk] = pooled[:len(chunk)]
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out
