"""The KV cache: an explicit, fixed-shape pytree passed into and out of the model.

Arrays are [batch, kv_heads, max_len, head_dim], so each head's keys and values
are contiguous [max_len, head_dim] matrices that attention multiplies in place
(with the sequence axis second, XLA:CPU copied every layer's cache into this
layout at every decode step).

Every row writes at the same slots: a call with t new tokens per row writes
them at slots `end ... end + t - 1` of all rows with one `dynamic_update_slice`
at a scalar offset, which XLA performs in place (per-row offsets lower to a
scatter, which XLA:CPU expanded with copies of the whole buffer). Rows of
different lengths stay apart through `positions`: the position of the token in
each slot of each row, -1 for a slot that holds nothing (a shorter prompt's
padding, or a slot not yet written). Attention reads a slot when its position
is >= 0 and not after the query's, so a row's padding is a gap it never sees.
`lengths[b]` counts the tokens of row b (the next token's position), and `end`
advances by the longest row's new tokens, so a prompt written in chunks leaves
no gap in a single-row cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from flaxlm.model.config import ModelConfig
from flaxlm.model.sharding import constrain


@struct.dataclass
class LayerCache:
    k: jax.Array  # [batch, kv_heads, max_len, head_dim]
    v: jax.Array  # [batch, kv_heads, max_len, head_dim]


@struct.dataclass
class KVCache:
    layers: tuple[LayerCache, ...]
    lengths: jax.Array    # [batch] int32: tokens of each row (the next token's position)
    positions: jax.Array  # [batch, max_len] int32: the position held in each slot, -1 none
    end: jax.Array        # [] int32: slots written; the next tokens go to slots end...

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        layers = tuple(LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
                       for _ in range(config.num_layers))
        return cls(layers=layers, lengths=jnp.zeros((batch_size,), jnp.int32),
                   positions=jnp.full((batch_size, max_len), -1, jnp.int32),
                   end=jnp.zeros((), jnp.int32))

    def constrained(self) -> KVCache:
        """This cache sharded on batch and kv heads (inside `sharding.use_sharding`)."""
        layers = tuple(LayerCache(k=constrain(c.k, CACHE_LOGICAL_AXES),
                                  v=constrain(c.v, CACHE_LOGICAL_AXES)) for c in self.layers)
        return self.replace(layers=layers, lengths=constrain(self.lengths, ("batch",)),
                            positions=constrain(self.positions, ("batch", "cache_seq")))

    def written(self, new_positions: jax.Array, valid: jax.Array) -> KVCache:
        """The bookkeeping after writing tokens at positions new_positions [batch, t]
        where valid [batch, t] (layers unchanged: `write` does those)."""
        positions = jax.lax.dynamic_update_slice(
            self.positions, jnp.where(valid, new_positions, -1).astype(jnp.int32), (0, self.end))
        added = jnp.sum(valid, axis=1, dtype=jnp.int32)  # [batch]
        return self.replace(positions=positions, lengths=self.lengths + added,
                            end=self.end + jnp.max(added))

    def truncated(self, keep: jax.Array) -> KVCache:
        """The cache of a single row holding only its first `keep` tokens ([] int32):
        later slots are dropped and written again by the next call."""
        positions = jnp.where(self.positions < keep, self.positions, -1)
        return self.replace(positions=positions, lengths=jnp.minimum(self.lengths, keep),
                            end=jnp.minimum(self.end, keep))


CACHE_LOGICAL_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")


def write(buffer: jax.Array, update: jax.Array, end: jax.Array) -> jax.Array:
    """update [b, heads, t, h] written into buffer [b, heads, s, h] at slots end ... end + t - 1
    of every row: one in-place dynamic_update_slice."""
    return jax.lax.dynamic_update_slice(buffer, update.astype(buffer.dtype), (0, 0, end, 0))
