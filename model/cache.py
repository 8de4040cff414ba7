"""The KV cache: an explicit, fixed-shape pytree passed into and out of the model.

Arrays are [batch, kv_heads, max_len, head_dim], so each head's keys and values
are contiguous [max_len, head_dim] matrices that attention multiplies in place
(with the sequence axis second, XLA:CPU copied every layer's cache into this
layout at every decode step). Slot s of a row holds the keys/values of the
token at position s of that row:
prompts are right-padded, and `lengths[b]` counts the valid slots of row b.
A step writes its new keys/values at slots `lengths[b] ...` of each row and
attends to slots `< lengths[b] + new tokens`, so rows of different lengths
share one program.
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
    lengths: jax.Array  # [batch] int32, valid slots per row

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
        return cls(layers=layers, lengths=jnp.zeros((batch_size,), jnp.int32))

    def constrained(self) -> KVCache:
        """This cache sharded on batch and kv heads (inside `sharding.use_sharding`)."""
        layers = tuple(LayerCache(k=constrain(c.k, CACHE_LOGICAL_AXES),
                                  v=constrain(c.v, CACHE_LOGICAL_AXES)) for c in self.layers)
        return KVCache(layers=layers, lengths=constrain(self.lengths, ("batch",)))


CACHE_LOGICAL_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")


def write_rows(buffer: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
    """Write update [b, heads, t, h] into buffer [b, heads, s, h] at slot starts[b] of each row."""
    def one(row, upd, start):
        return jax.lax.dynamic_update_slice_in_dim(row, upd.astype(row.dtype), start, axis=1)
    return jax.vmap(one)(buffer, update, starts)
