"""Mixture-of-experts MLP: a router, experts stacked [expert, ...], dispatch, aux loss.

Each token's router logits pick `experts_per_token` of `num_experts` gated
MLPs; their outputs are summed with the routing weights (HF Mixtral and
Qwen3-MoE semantics: softmax over all experts, top-k, optionally renormalized;
or top-k logits, then a softmax over those k).

Dispatch, chosen by measurement (scripts/bench_moe.py, docs/benchmarks.md):
- CPU: `expert_loop`, a loop over the experts that skips every expert no token
  was routed to and runs each used one on all tokens, weighted by the routing
  weight (zero for tokens routed elsewhere); a decode step reads only the
  chosen experts' weights. On the 2-core Xeon it was the fastest at every
  size measured (1 to 256 tokens, Mixtral-like 8 experts top-2 and
  Qwen3-MoE-like 64 experts top-8): 1.7-60x faster than the dense einsum over
  all experts (the most where few experts are chosen), 1.9-75x faster than
  tokens sorted by expert through `jax.lax.ragged_dot` (whose CPU lowering is
  no faster than the dense einsum), and 2.7-21x faster than gathering each
  token's expert matrices.
- Under a mesh whose `expert` axis has more than one device (expert
  parallelism), `all_experts`: a dense einsum whose expert axis GSPMD splits
  over the devices, each computing its own experts for every token, summed by
  the combine einsum. A loop would index the sharded axis instead.
- Other backends (GPU, TPU): `all_experts`, plain batched matmuls with no sort
  or gather. Not measured here (no accelerator was available); ragged_dot is
  the candidate to measure there with the same script.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.model.layers import ACTIVATIONS, make_param
from flaxlm.model.sharding import mesh_axis_size


class ExpertKernel(nnx.Module):
    """Stacked projection kernels [expert, in, out] (logical axes ("expert", in, out))."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, axes: tuple[str, str], *,
                 dtype, param_dtype, rngs):
        self.dtype = dtype
        init = jax.nn.initializers.normal(stddev=1.0 / math.sqrt(d_in))
        self.kernel = make_param(rngs, init, (num_experts, d_in, d_out), ("expert", *axes),
                                 param_dtype)

    def one(self, e: jax.Array, x: jax.Array) -> jax.Array:
        """x [T, in] through expert e (a traced index) -> [T, out]."""
        w = jax.lax.dynamic_index_in_dim(self.kernel[...], e, keepdims=False)
        return jnp.matmul(x.astype(self.dtype), w.astype(self.dtype))

    def all(self, x: jax.Array) -> jax.Array:
        """x [T, in] (shared) or [expert, T, in] through every expert -> [expert, T, out]."""
        spec = "ti,eio->eto" if x.ndim == 2 else "eti,eio->eto"
        return jnp.einsum(spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))


def route(logits: jax.Array, k: int, router: str, renormalize: bool
          ) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, experts] -> (weights [T, k] float32, expert ids [T, k])."""
    logits = logits.astype(jnp.float32)
    if router == "topk_softmax":
        top, ids = jax.lax.top_k(logits, k)
        return jax.nn.softmax(top, axis=-1), ids
    weights, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids


class MoeMlp(nnx.Module):
    """Router [embed, experts] and gated expert MLPs gate/up [E, embed, mlp], down [E, mlp, embed]."""

    def __init__(self, embed_dim: int, mlp_dim: int, *, num_experts: int, experts_per_token: int,
                 router: str, renormalize: bool, activation: str, dtype, param_dtype, rngs):
        self.k, self.router_kind, self.renormalize = experts_per_token, router, renormalize
        self.activation, self.dtype = activation, dtype
        init = jax.nn.initializers.normal(stddev=1.0 / math.sqrt(embed_dim))
        self.router = make_param(rngs, init, (embed_dim, num_experts), ("embed", None),
                                 param_dtype)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = ExpertKernel(num_experts, embed_dim, mlp_dim, ("embed", "mlp"), **common)
        self.up_proj = ExpertKernel(num_experts, embed_dim, mlp_dim, ("embed", "mlp"), **common)
        self.down_proj = ExpertKernel(num_experts, mlp_dim, embed_dim, ("mlp", "embed"), **common)

    @property
    def num_experts(self) -> int:
        return self.router.shape[1]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [b, t, d] -> (out [b, t, d], router logits [b, t, experts] float32)."""
        b, t, d = x.shape
        tokens = x.reshape(b * t, d).astype(self.dtype)
        logits = jnp.matmul(tokens, self.router[...].astype(self.dtype)).astype(jnp.float32)
        weights, ids = route(logits, self.k, self.router_kind, self.renormalize)
        rows = jnp.arange(b * t)[:, None]
        combine = jnp.zeros((b * t, self.num_experts), jnp.float32).at[rows, ids].set(weights)
        if mesh_axis_size("expert") > 1:
            out = self.all_experts(tokens, combine)
        else:
            out = jax.lax.platform_dependent(tokens, combine, cpu=self.expert_loop,
                                             default=self.all_experts)
        return out.astype(x.dtype).reshape(b, t, d), logits.reshape(b, t, -1)

    def _act(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.activation](gate) * up

    def expert_loop(self, tokens: jax.Array, combine: jax.Array) -> jax.Array:
        """Experts one at a time (skipping unrouted ones) over all tokens [T, d]."""
        used = jnp.any(combine > 0, axis=0)  # [experts]

        def run(e, out):
            h = self._act(self.gate_proj.one(e, tokens), self.up_proj.one(e, tokens))
            weight = jax.lax.dynamic_index_in_dim(combine, e, axis=1)  # [T, 1]
            return out + self.down_proj.one(e, h).astype(jnp.float32) * weight

        def body(e, out):
            return jax.lax.cond(used[e], run, lambda _, o: o, e, out)

        return jax.lax.fori_loop(0, self.num_experts, body,
                                 jnp.zeros(tokens.shape, jnp.float32))

    def all_experts(self, tokens: jax.Array, combine: jax.Array) -> jax.Array:
        """Every expert on every token, combined by weight (zero where not routed)."""
        h = self._act(self.gate_proj.all(tokens), self.up_proj.all(tokens))  # [E, T, mlp]
        out = self.down_proj.all(h)  # [E, T, d]
        return jnp.einsum("etd,te->td", out.astype(jnp.float32), combine)


def load_balancing_loss(router_logits: tuple[jax.Array, ...], top_k: int,
                        mask: jax.Array | None = None) -> jax.Array:
    """Switch-Transformer auxiliary loss as HF's `load_balancing_loss_func`:
    num_experts * sum_e f_e * P_e, where over all layers' tokens (mask [b, t] = 0
    excluded) f_e is the fraction of top-k assignments to expert e and P_e its
    mean router probability. 1.0 when routing is uniform; router_logits are
    [b, t, experts] per MoE layer."""
    num_experts = router_logits[0].shape[-1]
    weight = (jnp.ones(router_logits[0].shape[:-1], jnp.float32) if mask is None
              else mask.astype(jnp.float32)).reshape(-1, 1)
    assigned = jnp.zeros((num_experts,), jnp.float32)
    prob_sum = jnp.zeros((num_experts,), jnp.float32)
    for logits in router_logits:
        probs = jax.nn.softmax(logits.reshape(-1, num_experts).astype(jnp.float32), axis=-1)
        _, ids = jax.lax.top_k(probs, top_k)
        onehot = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), axis=1)
        assigned += jnp.sum(onehot * weight, axis=0)
        prob_sum += jnp.sum(probs * weight, axis=0)
    rows = len(router_logits) * jnp.maximum(jnp.sum(weight), 1.0)
    return num_experts * jnp.sum((assigned / rows) * (prob_sum / rows))
