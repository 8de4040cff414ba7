"""The decoder: one Flax NNX module for every supported architecture.

`Decoder` reads its `ModelConfig` once, at construction, and hands each block
only what it uses: the block gets its attention and MLP modules and its norm
settings; the RoPE table and attention mask of its layer kind are arguments of
each call. Everything architectural is static Python, so a Llama compiles to
the same program as before the other families existed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.model.attention import Attention, CausalMask, attention_mask
from flaxlm.model.cache import KVCache
from flaxlm.model.config import ModelConfig, RopeScaling, embed_scale
from flaxlm.model.int8 import int8_matmul
from flaxlm.model.layers import Embedder, Mlp, Norm, NormSpec, make_param
from flaxlm.model.moe import MoeMlp
from flaxlm.model.rope import rope_table
from flaxlm.model.scan import scan_layers
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
    """Pre-norm transformer block: x + post(attn(norm(x))), then x + post(mlp(norm(x)));
    the post-norms only where the architecture has them (Gemma 2/3)."""

    def __init__(self, *, attn_norm: Norm, attn: Attention, attn_post_norm: Norm | None,
                 mlp_norm: Norm, mlp: Mlp | MoeMlp, mlp_post_norm: Norm | None):
        self.attn_norm, self.attn, self.attn_post_norm = attn_norm, attn, attn_post_norm
        self.mlp_norm, self.mlp, self.mlp_post_norm = mlp_norm, mlp, mlp_post_norm

    def __call__(self, x, mask, rope, cache=None, write_at=None, *, return_probs=False):
        """Returns (x, cache, router logits [b, t, experts] or None), and with return_probs
        the attention probabilities [b, heads, t, kv slots] fourth."""
        probs = None
        if return_probs:
            h, cache, probs = self.attn(self.attn_norm(x), mask, rope, cache, write_at,
                                        return_probs=True)
        else:
            h, cache = self.attn(self.attn_norm(x), mask, rope, cache, write_at)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + h
        router_logits = None
        if isinstance(self.mlp, MoeMlp):
            h, router_logits = self.mlp(self.mlp_norm(x))
        else:
            h = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        if return_probs:
            return x + h, cache, router_logits, probs
        return x + h, cache, router_logits


def _block(cfg: ModelConfig, i: int, norm: NormSpec, rngs: nnx.Rngs) -> Block:
    """Layer i of `cfg`: its norms, attention and dense or MoE MLP, built in this
    order (parameter initialization draws keys in it)."""
    dt = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)

    def make_norm(present: bool = True) -> Norm | None:
        return Norm(cfg.embed_dim, norm, **dt) if present else None

    def make_attention() -> Attention:
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        return Attention(embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
                         num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                         qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias,
                         qk_norm=norm if cfg.qk_norm else None, query_scale=scalar ** -0.5,
                         softcap=cfg.attn_softcap, **dt)

    def make_mlp() -> Mlp | MoeMlp:
        if cfg.layer_kinds("mlp")[i] == "moe":
            return MoeMlp(cfg.embed_dim, cfg.expert_mlp_dim, num_experts=cfg.num_experts,
                          experts_per_token=cfg.experts_per_token, router=cfg.router,
                          renormalize=cfg.router_renormalize, activation=cfg.activation, **dt)
        return Mlp(cfg.embed_dim, cfg.mlp_dim, gated=cfg.gated_mlp, bias=cfg.mlp_bias,
                   activation=cfg.activation, **dt)

    return Block(attn_norm=make_norm(), attn=make_attention(),
                 attn_post_norm=make_norm(cfg.post_attn_norm), mlp_norm=make_norm(),
                 mlp=make_mlp(), mlp_post_norm=make_norm(cfg.post_mlp_norm))


def layer_schedule(cfg: ModelConfig) -> tuple[tuple[int | None, str | None], ...]:
    """Per layer: (its sliding window or None, its RoPE: "global", "local" or None)."""
    out = []
    for attention, positions in zip(cfg.layer_kinds("attention"), cfg.layer_kinds("positions")):
        window = cfg.sliding_window if attention == "sliding" else None
        local = attention == "sliding" and cfg.local_rope_theta is not None
        out.append((window, None if positions == "none" else "local" if local else "global"))
    return tuple(out)


def _self_mask(positions: jax.Array, segments: jax.Array, window: int | None) -> jax.Array:
    """The mask [batch, seq, seq] among a row's tokens with segment ids: `attention_mask`
    (causal by position, same document), and causal by index as in HF: a key after the
    query in the row is never attended, whatever the positions (the same mask wherever
    positions increase along each document, as the default and packed positions do)."""
    t = positions.shape[1]
    return attention_mask(positions, segments, positions, segments, window) & jnp.tril(
        jnp.ones((t, t), bool))


class Trace(NamedTuple):
    """`Decoder.trace`: logits [batch, seq, vocab] float32; residual [layers + 1, batch, seq,
    embed] (residual[0] the embeddings, residual[i] the stream after block i, before the
    final norm: HF's hidden_states but for the last, which HF gives after the final norm);
    attention [layers, batch, heads, seq, seq] float32 (rows sum to 1 over keys)."""

    logits: jax.Array
    residual: jax.Array
    attention: jax.Array


class Decoder(nnx.Module):
    """A decoder-only language model.

    `model(tokens, positions=None, attention_mask=None, cache=None)`:
      tokens         [batch, seq] int token ids.
      positions      [batch, seq] positions; by default counted over the
                     non-padding tokens (so left padding does not shift them),
                     continuing from `cache.lengths` when a cache is given.
      attention_mask [batch, seq]: 0 marks padding; equal positive values mark
                     one document (segment ids of packed sequences). A token
                     attends to the tokens of its document at or before it in
                     the row with positions up to its own (in a sliding-window
                     layer: within the window). Or an
                     explicit boolean mask [batch, seq, seq] (query, key) with
                     `positions` given, for masks segment ids cannot express
                     (several continuations sharing one context in a row).
      cache          a `KVCache`; the new tokens' keys/values are written at
                     slots `cache.end ...` of every row (prompts right-padded; a
                     row's padding is never attended to). The caller keeps
                     `cache.end + seq <= cache.max_len`.
    Returns logits [batch, seq, vocab] in float32, and the updated cache when
    one was given. With `config.scan_layers` a call without a cache runs the
    blocks as one lax.scan (flaxlm.model.scan); with a cache, and in `trace`,
    they run one after another.

    With a soft prompt (`soft_prompt`, set by flaxlm.model.prompt_tuning) the model
    runs its N virtual tokens, at positions 0..N-1, before every sequence: each input
    position moves up by N, and every real token (of any packed document) attends to
    the virtual tokens, which attend only to each other; so a packed row equals its
    documents run one by one after the prompt. Outputs cover the input tokens only.
    Without a cache the prompt is always prepended; with one only when
    `soft_prompt=True` (the prefill; its keys/values fill the first N slots and the
    cache lengths count them, so decode steps continue after them).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        norm = NormSpec(config.norm, config.norm_eps, config.norm_offset)
        self.embed = Embedder(config.vocab_size, config.embed_dim, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.pos_embed = (
            make_param(rngs, jax.nn.initializers.normal(stddev=0.01),
                       (config.max_seq_len, config.embed_dim), (None, "embed"), param_dtype)
            if config.learned_positions else None)
        self.layers = nnx.List([_block(config, i, norm, rngs) for i in range(config.num_layers)])
        self.final_norm = Norm(config.embed_dim, norm, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
        self.lm_head = (
            None if config.tie_embeddings else
            make_param(rngs, jax.nn.initializers.normal(stddev=config.embed_dim ** -0.5),
                       (config.embed_dim, config.vocab_size), ("embed", "vocab"), param_dtype))
        # Set with an int8 lm_head [vocab, embed] (flaxlm.model.quant): scales [vocab, groups].
        self.lm_head_scale = None
        self.soft_prompt = None  # virtual-token embeddings (flaxlm.model.prompt_tuning)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, cache: KVCache | None = None, *,
                 soft_prompt: bool | None = None):
        x, new_cache, _ = self._forward(tokens, positions, attention_mask, cache,
                                        soft_prompt=soft_prompt)
        logits = self.logits(x)
        return logits if cache is None else (logits, new_cache)

    def with_router_logits(self, tokens: jax.Array, positions: jax.Array | None = None,
                           attention_mask: jax.Array | None = None
                           ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """(logits, router logits [batch, seq, experts] of each MoE layer), for training."""
        x, _, router_logits = self._forward(tokens, positions, attention_mask, None)
        return self.logits(x), router_logits

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None, cache: KVCache | None = None, *,
               soft_prompt: bool | None = None, empty_cache: bool = False
               ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [batch, seq, embed] and the updated cache (or None).
        `empty_cache` (static): the caller knows the cache holds nothing (a fresh
        `KVCache.init`), so attention does not read its slots: a prompt's prefill then
        costs its own length, not the cache's."""
        x, new_cache, _ = self._forward(tokens, positions, attention_mask, cache,
                                        soft_prompt=soft_prompt, empty_cache=empty_cache)
        return x, new_cache

    def trace(self, tokens: jax.Array, positions: jax.Array | None = None,
              attention_mask: jax.Array | None = None) -> Trace:
        """The forward pass with what happens inside: the logits, the residual stream
        [layers + 1, batch, seq, embed] (the embeddings, then each block's output, before
        the final norm) and every layer's attention probabilities [layers, batch, heads,
        seq, seq] (float32; HF's `output_attentions`), for logit lens and attention maps."""
        inside = {"residual": [], "attention": []}
        x, _, _ = self._forward(tokens, positions, attention_mask, None, inside)
        return Trace(logits=self.logits(x), residual=jnp.stack(inside["residual"]),
                     attention=jnp.stack(inside["attention"]))

    def _forward(self, tokens, positions, attention_mask, cache, inside=None, *,
                 soft_prompt=None, empty_cache=False):
        cfg = self.config
        segments = (jnp.ones_like(tokens, dtype=jnp.int32) if attention_mask is None
                    else attention_mask.astype(jnp.int32))
        start = cache.lengths if cache is not None else jnp.zeros(tokens.shape[0], jnp.int32)
        if positions is None:
            if segments.ndim == 3:
                raise ValueError("an explicit [batch, seq, seq] attention mask needs positions")
            positions = start[:, None] + jnp.maximum(jnp.cumsum(segments != 0, axis=1) - 1, 0)
        schedule = layer_schedule(cfg)
        windows = {w for w, _ in schedule}
        prompt = self._prompt(cache, soft_prompt)
        if prompt is None:
            masks, written = self._masks(positions, segments, cache, windows, empty_cache)
        else:
            positions, masks, written = self._prompt_masks(
                prompt.num_tokens, start, positions, segments, cache, windows, empty_cache)
        ropes = self._ropes(positions, {r for _, r in schedule} - {None})

        x = self.embed(tokens)  # [batch, seq, embed]
        if prompt is not None:  # [batch, N + seq, embed]
            x = jnp.concatenate([prompt(tokens.shape[0], x.dtype), x], axis=1)
        if cfg.scale_embeddings:
            # HF multiplies by sqrt(embed_dim) rounded to the weights' dtype.
            x = x * jnp.asarray(embed_scale(cfg.embed_dim), cfg.param_dtype).astype(x.dtype)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
        x = constrain(x, ACTIVATION_AXES)
        if cfg.scan_layers and cache is None and inside is None:
            x, router_logits = self._scanned(x, schedule, masks, ropes)
        else:
            x, new_layers, router_logits = self._unrolled(x, schedule, masks, ropes, cache,
                                                          inside)
        if prompt is not None:  # outputs for the input tokens only
            x = x[:, prompt.num_tokens:]
            router_logits = [r[:, prompt.num_tokens:] for r in router_logits]
        x = self.final_norm(x)
        new_cache = None if cache is None else written.replace(layers=tuple(new_layers))
        return x, new_cache, tuple(router_logits)

    def _unrolled(self, x, schedule, masks, ropes, cache, inside):
        """The blocks one after another: (x, each layer's cache or None, router logits of
        each MoE layer); with `inside` (Decoder.trace) recording what happens."""
        new_layers, router_logits = [], []
        call_block = _call_block if cache is not None else _remat(self.config.remat)
        for i, (block, (window, rope)) in enumerate(zip(self.layers, schedule)):
            layer_cache = cache.layers[i] if cache is not None else None
            if inside is not None:  # Decoder.trace
                inside["residual"].append(x)
                x, layer_cache, logits, probs = block(x, masks[window], ropes.get(rope),
                                                      return_probs=True)
                inside["attention"].append(probs)
            else:
                with jax.named_scope(f"layer_{i}"):
                    x, layer_cache, logits = call_block(block, x, masks[window], ropes.get(rope),
                                                        layer_cache, None if cache is None
                                                        else cache.end)
            x = constrain(x, ACTIVATION_AXES)
            new_layers.append(layer_cache)
            if logits is not None:
                router_logits.append(logits)
        if inside is not None:
            inside["residual"].append(x)
        return x, new_layers, router_logits

    def _scanned(self, x, schedule, masks, ropes):
        """The blocks as a scan over repeats of the layer pattern (ModelConfig.scan_layers):
        (x, router logits of each MoE layer, in layer order)."""
        call_block = _remat(self.config.remat)

        def layer(j, block, x):  # j: the layer's place in the pattern
            window, rope = schedule[j]
            with jax.named_scope(f"scanned_layer_{j}"):
                x, _, logits = call_block(block, x, masks[window], ropes.get(rope), None, None)
            return constrain(x, ACTIVATION_AXES), logits

        return scan_layers(list(self.layers), self.config.layer_period, x, layer)

    def _ropes(self, positions, kinds):
        cfg = self.config
        tables = {}
        for kind in sorted(kinds):
            if kind == "local":
                tables[kind] = rope_table(positions, cfg.rotary_dim, cfg.local_rope_theta,
                                          RopeScaling())
            else:
                tables[kind] = rope_table(positions, cfg.rotary_dim, cfg.rope_theta,
                                          cfg.rope_scaling)
        return tables

    def _prompt(self, cache, soft_prompt):
        """The soft prompt to prepend in this call, or None."""
        if self.soft_prompt is None or soft_prompt is False:
            return None
        return self.soft_prompt if cache is None or soft_prompt else None

    def _prompt_masks(self, n, start, positions, segments, cache, windows, empty_cache=False):
        """(positions, masks, cache bookkeeping as `_masks` gives it) of [N virtual tokens,
        input]: the virtual tokens at start + 0..N-1, the input's positions moved up by N."""
        batch = segments.shape[0]
        virtual = start[:, None] + jnp.arange(n, dtype=positions.dtype)[None, :]
        full = jnp.concatenate([virtual, positions + n], axis=1)  # [batch, N + seq]
        if cache is not None:  # the virtual tokens are the row's first stretch
            if segments.ndim == 3:
                raise ValueError("an explicit [batch, seq, seq] attention mask takes no cache")
            q_segments = jnp.concatenate([jnp.ones((batch, n), jnp.int32),
                                          (segments != 0).astype(jnp.int32)], axis=1)
            masks, written = self._masks(full, q_segments, cache, windows, empty_cache)
            return full, masks, written
        if segments.ndim == 3:
            real, real_q = segments != 0, jnp.any(segments != 0, axis=-1)
        else:
            real = _self_mask(positions, segments, None)
            real_q = segments != 0
        t = positions.shape[1]
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (batch, n, n))
        top = jnp.concatenate([causal, jnp.zeros((batch, n, t), bool)], axis=2)
        bottom = jnp.concatenate([jnp.broadcast_to(real_q[:, :, None], (batch, t, n)), real],
                                 axis=2)
        base = jnp.concatenate([top, bottom], axis=1)  # [batch, N + seq, N + seq]
        distance = full[:, :, None] - full[:, None, :]
        masks = {w: base if w is None else base & (distance < w) for w in windows}
        if segments.ndim == 2:  # the virtual tokens come first and attend among themselves
            masks = {w: CausalMask(m) for w, m in masks.items()}
        return full, masks, None

    def _masks(self, positions, segments, cache, windows, empty_cache=False):
        """One mask [batch, seq, seq] per distinct window (with a cache a pair: over its
        slots [batch, seq, slots], None for an empty cache, and among the new tokens), and
        with a cache its
        bookkeeping after this call (`KVCache.written`, layers not yet written)."""
        if segments.ndim == 3:  # an explicit [batch, q, kv] mask
            if cache is not None:
                raise ValueError("an explicit [batch, seq, seq] attention mask takes no cache")
            base = segments != 0
            distance = positions[:, :, None] - positions[:, None, :]
            return {w: base if w is None else base & (distance < w) for w in windows}, None
        if cache is None:
            return {w: CausalMask(_self_mask(positions, segments, w)) for w in windows}, None
        q_segments = (segments != 0).astype(jnp.int32)
        held = (cache.positions >= 0).astype(jnp.int32)  # [batch, slots]

        def pair(w):  # (over the cache's slots, among the new tokens)
            if empty_cache:
                return None, CausalMask(_self_mask(positions, q_segments, w))
            return (attention_mask(positions, q_segments, cache.positions, held, w),
                    _self_mask(positions, q_segments, w))

        return {w: pair(w) for w in windows}, cache.written(positions, segments != 0)

    def logits(self, x: jax.Array) -> jax.Array:
        """Output logits [..., vocab] (float32) from final hidden states [..., embed]."""
        logits = self._head(x)
        cap = self.config.final_softcap
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    def _head(self, x: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.embed.attend(x)
        if self.lm_head_scale is not None:
            return int8_matmul(x.astype(self.config.dtype), self.lm_head[...],
                               self.lm_head_scale[...])
        dtype = jnp.dtype(self.config.dtype)
        rows = x.astype(dtype).reshape(-1, x.shape[-1])  # 2-D, as in layers.Einsum
        logits = jnp.einsum("nd,dv->nv", rows, self.lm_head[...].astype(dtype),
                            preferred_element_type=jnp.float32)
        return logits.reshape(*x.shape[:-1], -1)
