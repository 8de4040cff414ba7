"""Causal self-attention with GQA/MQA, RoPE, q/k norms, soft-capping, sliding windows
and the KV cache."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.model.cache import LayerCache, write
from flaxlm.model.layers import Einsum, Norm, NormSpec
from flaxlm.model.rope import RopeTable, apply_rope

# Large negative instead of -inf: a fully masked row (a padding query) then
# gives a uniform distribution instead of NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def attention_mask(q_positions: jax.Array, q_segments: jax.Array,
                   kv_positions: jax.Array, kv_segments: jax.Array,
                   sliding_window: int | None) -> jax.Array:
    """Boolean mask [batch, q_len, kv_len]: causal by position, same non-zero segment.

    Segment 0 marks padding; equal positive segment ids mark tokens of one
    document (1 everywhere for an ordinary batch).
    """
    q_pos = q_positions[:, :, None]
    kv_pos = kv_positions[:, None, :]
    mask = (kv_pos <= q_pos) & (kv_segments[:, None, :] == q_segments[:, :, None])
    mask &= kv_segments[:, None, :] != 0
    if sliding_window is not None:
        mask &= q_pos - kv_pos < sliding_window
    return mask


class CausalMask(NamedTuple):
    """A self-attention mask [b, t, t] under which no query attends to a key after it in
    the row (the Decoder's masks from segment ids: causal by index as well as by position).
    Attention then skips those keys: `dot_product_attention(causal=True)`."""

    mask: jax.Array


# Query blocks of a causal self-attention: at least _MIN_BLOCK rows (each block's dots stay
# matrix products, many times the 8- or 16-lane f32 vector width), at most _MAX_BLOCKS of
# them (n blocks compute (n + 1) / 2n of the full scores: 8 keep 7/8 of the possible
# saving of one half, and a statically unrolled loop of 8 keeps the program small).
_MIN_BLOCK, _MAX_BLOCKS = 64, 8
# Blocked from 4 blocks on (3/8 of the scores skipped): measured (docs/benchmarks.md) a
# 20-27% faster tiny train step at 256 tokens, and no difference at 128 (2 blocks, 1/4
# of attention's scores skipped: lost in SmolLM2's step, where attention is ~16%).
_MIN_SEQ = 4 * _MIN_BLOCK


def query_blocks(t: int) -> tuple[tuple[int, int], ...]:
    """[start, stop) of each query block of a causal self-attention over t tokens: a power
    of two rows each (the last may be shorter); one block (no blocking) when t < 256."""
    if t < _MIN_SEQ:
        return ((0, t),)
    size = max(_MIN_BLOCK, 1 << max(0, -(-t // _MAX_BLOCKS) - 1).bit_length())
    return tuple((a, min(a + size, t)) for a in range(0, t, size))


def _unwrapped(mask) -> tuple[jax.Array, bool]:
    """(the boolean mask, whether it is a `CausalMask`)."""
    return (mask.mask, True) if isinstance(mask, CausalMask) else (mask, False)


def _in_query_blocks(attend, q, k, v, mask):
    """`attend(q, k, v, mask)` of a causal self-attention, one call per `query_blocks`
    block [a, z): its queries against the keys and values up to z, outputs concatenated."""
    return jnp.concatenate([attend(q[:, a:z], k[:, :, :z], v[:, :, :z], mask[:, a:z, :z])
                            for a, z in query_blocks(q.shape[1])], axis=1)


def _grouped(q: jax.Array, kv_heads: int, scale: float) -> jax.Array:
    """q [b, t, heads, h] -> [b, kv_heads, group * t, h], scaled: each kv head's query rows."""
    b, t, n, h = q.shape
    g = n // kv_heads
    return (q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4)
            .reshape(b, kv_heads, g * t, h) * scale)


def _ungrouped(out: jax.Array, t: int) -> jax.Array:
    """[b, kv_heads, group * t, h] -> [b, t, heads, h]."""
    b, kv_heads, gt, h = out.shape
    g = gt // t
    return out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, kv_heads * g, h)


_BATCH_DIMS = ((0, 1), (0, 1))


def _masked_logits(q: jax.Array, k: jax.Array, mask: jax.Array, t: int,
                   softcap: float | None) -> jax.Array:
    """Grouped q [b, kv, g * t, h], k [b, kv, s, h], mask [b, t, s] -> [b, kv, g, t, s] f32."""
    b, kv_heads, gt, _ = q.shape
    logits = jax.lax.dot_general(q, k.astype(q.dtype), (((3,), (3,)), _BATCH_DIMS),
                                 preferred_element_type=jnp.float32)  # [b, kv, g * t, s]
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    logits = logits.reshape(b, kv_heads, gt // t, t, k.shape[2])
    return jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)


def _weighted(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs [b, kv, g, t, s] f32, v [b, kv, s, h] -> [b, kv, g * t, h]."""
    b, kv_heads, g, t, s = probs.shape
    probs = probs.astype(v.dtype).reshape(b, kv_heads, g * t, s)
    return jax.lax.dot_general(probs, v, (((3,), (2,)), _BATCH_DIMS))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          scale: float, softcap: float | None = None, *,
                          return_probs: bool = False, causal: bool = False):
    """q [b, t, heads, h], k/v [b, kv_heads, s, h], mask [b, t, s] -> [b, t, heads, h]
    (and, with return_probs, the float32 attention probabilities [b, heads, t, s]).

    Two dots batched over (batch, kv head), each head's group of query heads
    stacked as rows: the keys and values are used where they lie, no copies.
    Queries are multiplied by `scale`; with `softcap` the logits become
    softcap * tanh(logits / softcap) before masking (Gemma 2).

    `causal`: the caller guarantees mask[:, i, j] is False for every key j > i (a
    `CausalMask`; s == t). The queries then go in `query_blocks`, each attending only to
    the keys up to its last row: about half the scores of the full product, the same
    numbers (a masked key adds exactly 0 to a softmax that has any unmasked key). A query
    with no key at all (padding) gets the mean of its block's visible values rather than of
    all values: an output nothing reads.
    """
    b, t, n, _ = q.shape
    if causal and not return_probs and len(query_blocks(t)) > 1:
        return _in_query_blocks(
            lambda *block: dot_product_attention(*block, scale, softcap), q, k, v, mask)
    logits = _masked_logits(_grouped(q, k.shape[1], scale), k, mask, t, softcap)
    probs32 = jax.nn.softmax(logits, axis=-1)  # [b, kv, g, t, s]
    out = _ungrouped(_weighted(probs32, v), t)
    if return_probs:  # query head kv * g + j attends with kv head kv
        return out, probs32.reshape(b, n, t, k.shape[2])
    return out


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: LayerCache,
                     masks: tuple[jax.Array, jax.Array], scale: float,
                     softcap: float | None = None) -> jax.Array:
    """Attention over the cache as it was and the new tokens' own keys/values, one softmax.

    q [b, t, heads, h]; k/v [b, kv_heads, t, h] of the new tokens; masks: ([b, t, slots]
    over the cache's slots, or None when the caller knows the cache is empty, [b, t, t] among
    the new tokens, or a `CausalMask`: then, with an empty cache, the new tokens' causal
    self-attention goes in query blocks as without a cache). The cache is only read here,
    so the write that follows is the only user of the written buffer and XLA makes it in
    place (reading the written cache instead made XLA:CPU fuse a second copy of the write
    into the attention dots, and copy every layer's cache at every decode step).
    """
    t = q.shape[1]
    if masks[0] is None:  # a cache known to be empty: self-attention among the new tokens
        mask, causal = _unwrapped(masks[1])
        attend = lambda *block: _fresh_attention(*block, scale, softcap)  # noqa: E731
        return (_in_query_blocks(attend, q, k, v, mask) if causal
                else attend(q, k, v, mask))
    grouped = _grouped(q, k.shape[1], scale)
    new = _masked_logits(grouped, k, masks[1], t, softcap)        # [b, kv, g, t, t]
    old = _masked_logits(grouped, cache.k, masks[0], t, softcap)  # [b, kv, g, t, slots]
    top = jnp.maximum(old.max(-1, keepdims=True), new.max(-1, keepdims=True))
    old, new = jnp.exp(old - top), jnp.exp(new - top)
    total = old.sum(-1) + new.sum(-1)  # [b, kv, g, t]
    out = _weighted(old, cache.v.astype(v.dtype)) + _weighted(new, v)  # [b, kv, g * t, h]
    return _normalized(out, total, t)


def _fresh_attention(q, k, v, mask, scale, softcap):
    """`cached_attention` of queries [b, t, heads, h] over keys/values [b, kv_heads, s, h]
    only (no cache slots), in the same order of operations: one query block of a prefill."""
    t = q.shape[1]
    new = _masked_logits(_grouped(q, k.shape[1], scale), k, mask, t, softcap)
    new = jnp.exp(new - new.max(-1, keepdims=True))
    return _normalized(_weighted(new, v), new.sum(-1), t)


def _normalized(out, total, t):
    """out [b, kv, g * t, h] / total [b, kv, g, t] -> [b, t, heads, h]."""
    b, kv_heads, g, _ = total.shape
    out = out / total.reshape(b, kv_heads, g * t, 1).astype(out.dtype)
    return _ungrouped(out, t)


class Attention(nnx.Module):
    """q/k/v projections, optional per-head q/k norms, RoPE from the caller's table,
    and the output projection. `query_scale` multiplies the queries (HF: head_dim
    ** -0.5, Gemma: query_pre_attn_scalar ** -0.5)."""

    def __init__(self, *, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qkv_bias: bool, out_bias: bool, qk_norm: NormSpec | None, query_scale: float,
                 softcap: float | None, dtype, param_dtype, rngs: nnx.Rngs):
        common = dict(fan_in=embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_scale, self.softcap = query_scale, softcap

        def qkv(heads: int, heads_axis: str) -> Einsum:
            return Einsum("btd,dnh->btnh", (embed_dim, heads, head_dim),
                          ("embed", heads_axis, "head_dim"),
                          bias_shape=(heads, head_dim) if qkv_bias else None,
                          bias_axes=(heads_axis, "head_dim"), **common)

        self.q_proj = qkv(num_heads, "heads")
        self.k_proj = qkv(num_kv_heads, "kv_heads")
        self.v_proj = qkv(num_kv_heads, "kv_heads")
        self.o_proj = Einsum("btnh,nhd->btd", (num_heads, head_dim, embed_dim),
                             ("heads", "head_dim", "embed"),
                             bias_shape=(embed_dim,) if out_bias else None,
                             bias_axes=("embed",), fan_in=num_heads * head_dim,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, axis_name="head_dim")
        self.q_norm = Norm(head_dim, qk_norm, **norm) if qk_norm is not None else None
        self.k_norm = Norm(head_dim, qk_norm, **norm) if qk_norm is not None else None

    def __call__(self, x: jax.Array, mask: jax.Array, rope: RopeTable | None,
                 cache: LayerCache | None = None, write_at: jax.Array | None = None, *,
                 return_probs: bool = False):
        """x [b, t, d], mask [b, t, t] or a `CausalMask` (with a cache: the pair of
        `cached_attention`); returns (out [b, t, d], updated cache or None), and with
        return_probs the attention probabilities [b, heads, t, t] third."""
        q = self.q_proj(x)  # [b, t, heads, h]
        k = self.k_proj(x)  # [b, t, kv_heads, h]
        v = self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv_heads, t, h]
        if cache is not None:  # mask: (over the cache's slots, among the new tokens)
            out = cached_attention(q, k, v, cache, mask, self.query_scale, self.softcap)
            # A zero that depends on the attention's output orders the write after the
            # read, so XLA can write the buffer in place (float x * 0 is not folded).
            after = out[:1, :1, :1, :1].astype(k.dtype) * 0
            cache = LayerCache(k=write(cache.k, k + after, write_at),
                               v=write(cache.v, v + after, write_at))
            return self.o_proj(out), cache
        mask, causal = _unwrapped(mask)
        if return_probs:
            out, probs = dot_product_attention(q, k, v, mask, self.query_scale, self.softcap,
                                               return_probs=True)
            return self.o_proj(out), cache, probs
        out = dot_product_attention(q, k, v, mask, self.query_scale, self.softcap,
                                    causal=causal)
        return self.o_proj(out), cache
