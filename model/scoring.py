"""Scoring a prompt with one jit-compiled forward pass."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.model.decoder import Decoder
from flaxlm.model.errors import ConfigError


@functools.partial(jax.jit, static_argnames=("graphdef", "k"))
def _top_k_next(graphdef, state, tokens, k):
    logits = nnx.merge(graphdef, state)(tokens)[:, -1]  # [batch, vocab]
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.lax.top_k(probs, k)


def next_token_distribution(model: Decoder, ids: list[int], k: int = 10
                            ) -> list[tuple[int, float]]:
    """The k most likely next tokens after `ids`, as (token id, probability)."""
    cfg = model.config
    if not ids:
        raise ConfigError("the prompt encodes to no tokens")
    if len(ids) > cfg.max_seq_len:
        raise ConfigError(f"the prompt has {len(ids)} tokens, more than the model's "
                          f"context of {cfg.max_seq_len}")
    if max(ids) >= cfg.vocab_size or min(ids) < 0:
        raise ConfigError(f"token ids must lie in [0, {cfg.vocab_size}), got {min(ids)}..{max(ids)}")
    graphdef, state = nnx.split(model)
    probs, top = _top_k_next(graphdef, state, jnp.asarray([ids], jnp.int32),
                             min(k, cfg.vocab_size))
    return [(int(i), float(p)) for i, p in zip(top[0], probs[0])]
