"""The decoder: one Flax NNX module for the Llama and GPT-2 families."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.model.attention import Attention, attention_mask
from flaxlm.model.cache import KVCache
from flaxlm.model.config import ModelConfig
from flaxlm.model.int8 import int8_matmul
from flaxlm.model.layers import Embedder, Mlp, Norm, make_param, rope_inv_freq
from flaxlm.model.sharding import constrain


ACTIVATION_AXES = ("batch", "seq", "embed")  # block inputs and outputs [batch, seq, embed]

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _call_block(block, *args):
    return block(*args)


def _remat(policy: str):
    """`_call_block`, rematerialized in the backward pass by `policy` (ModelConfig.remat)."""
    if policy == "none":
        return _call_block
    return nnx.remat(_call_block, policy=_REMAT_POLICIES[policy])


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.attn_norm = Norm(cfg.embed_dim, cfg.norm_kind, cfg.norm_eps, **dt)
        self.attn = Attention(embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
                              num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                              qkv_bias=cfg.attn_qkv_bias, out_bias=cfg.dense_bias, **dt)
        self.mlp_norm = Norm(cfg.embed_dim, cfg.norm_kind, cfg.norm_eps, **dt)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_dim, gated=cfg.gated_mlp, bias=cfg.dense_bias,
                       activation=cfg.activation, **dt)

    def __call__(self, x, positions, mask, inv_freq, cache=None, write_at=None):
        h, cache = self.attn(self.attn_norm(x), positions, mask, inv_freq, cache, write_at)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache


class Decoder(nnx.Module):
    """A decoder-only language model.

    `model(tokens, positions=None, attention_mask=None, cache=None)`:
      tokens         [batch, seq] int token ids.
      positions      [batch, seq] positions; by default counted over the
                     non-padding tokens (so left padding does not shift them),
                     continuing from `cache.lengths` when a cache is given.
      attention_mask [batch, seq]: 0 marks padding; equal positive values mark
                     one document (segment ids of packed sequences). Or an
                     explicit boolean mask [batch, seq, seq] (query, key) with
                     `positions` given, for masks segment ids cannot express
                     (several continuations sharing one context in a row).
      cache          a `KVCache`; the new tokens' keys/values are written at
                     slots `cache.lengths` of each row (prompts right-padded).
    Returns logits [batch, seq, vocab] in float32, and the updated cache when
    one was given.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        self.embed = Embedder(config.vocab_size, config.embed_dim, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.pos_embed = (
            make_param(rngs, jax.nn.initializers.normal(stddev=0.01),
                       (config.max_seq_len, config.embed_dim), (None, "embed"), param_dtype)
            if not config.uses_rope else None)
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = Norm(config.embed_dim, config.norm_kind, config.norm_eps,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (
            None if config.tie_embeddings else
            make_param(rngs, jax.nn.initializers.normal(stddev=config.embed_dim ** -0.5),
                       (config.embed_dim, config.vocab_size), ("embed", "vocab"), param_dtype))
        # Set with an int8 lm_head [vocab, embed] (flaxlm.model.quant): scales [vocab, groups].
        self.lm_head_scale = None

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, cache: KVCache | None = None):
        x, new_cache = self.hidden(tokens, positions, attention_mask, cache)
        logits = self.logits(x)
        return logits if cache is None else (logits, new_cache)

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None, cache: KVCache | None = None
               ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [batch, seq, embed] and the updated cache (or None)."""
        cfg = self.config
        segments = (jnp.ones_like(tokens, dtype=jnp.int32) if attention_mask is None
                    else attention_mask.astype(jnp.int32))
        start = cache.lengths if cache is not None else jnp.zeros(tokens.shape[0], jnp.int32)
        if positions is None:
            if segments.ndim == 3:
                raise ValueError("an explicit [batch, seq, seq] attention mask needs positions")
            positions = start[:, None] + jnp.maximum(jnp.cumsum(segments != 0, axis=1) - 1, 0)
        mask, new_lengths = self._mask(positions, segments, cache)

        x = self.embed(tokens)  # [batch, seq, embed]
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
        inv_freq = (rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
                    if cfg.uses_rope else None)
        x = constrain(x, ACTIVATION_AXES)
        new_layers = []
        call_block = _call_block if cache is not None else _remat(cfg.remat)
        for i, block in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x, layer_cache = call_block(block, x, positions, mask, inv_freq, layer_cache, start)
            x = constrain(x, ACTIVATION_AXES)
            new_layers.append(layer_cache)
        x = self.final_norm(x)
        if cache is None:
            return x, None
        return x, KVCache(layers=tuple(new_layers), lengths=new_lengths)

    def _mask(self, positions, segments, cache):
        window = self.config.sliding_window
        if segments.ndim == 3:  # an explicit [batch, q, kv] mask
            if cache is not None:
                raise ValueError("an explicit [batch, seq, seq] attention mask takes no cache")
            mask = segments != 0
            if window is not None:
                mask &= positions[:, :, None] - positions[:, None, :] < window
            return mask, None
        if cache is None:
            return attention_mask(positions, segments, positions, segments, window), None
        new_lengths = cache.lengths + jnp.sum(segments != 0, axis=1, dtype=jnp.int32)
        slots = jnp.arange(cache.max_len, dtype=jnp.int32)[None, :]
        slots = jnp.broadcast_to(slots, (segments.shape[0], cache.max_len))
        kv_segments = (slots < new_lengths[:, None]).astype(jnp.int32)
        q_segments = (segments != 0).astype(jnp.int32)
        return attention_mask(positions, q_segments, slots, kv_segments, window), new_lengths

    def logits(self, x: jax.Array) -> jax.Array:
        """Output logits [..., vocab] (float32) from final hidden states [..., embed]."""
        if self.lm_head is None:
            return self.embed.attend(x)
        if self.lm_head_scale is not None:
            return int8_matmul(x.astype(self.config.dtype), self.lm_head[...],
                               self.lm_head_scale[...])
        dtype = jnp.dtype(self.config.dtype)
        return jnp.einsum("...d,dv->...v", x.astype(dtype), self.lm_head[...].astype(dtype),
                          preferred_element_type=jnp.float32)
