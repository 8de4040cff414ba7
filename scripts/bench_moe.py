"""MoE dispatch formulations, timed on this backend: the numbers behind the choice
in flaxlm/model/moe.py.

For `--tokens` tokens through one MoE layer (router + top-k + experts + combine):
  expert_loop   flaxlm's CPU dispatch: a loop over experts, unrouted ones skipped
  all_experts   a dense einsum over every expert, combined by weight
  ragged        tokens sorted by expert, `jax.lax.ragged_dot` per projection
  gather        each token's k expert matrices gathered, then batched matmuls
Prints ms per layer call (best of --repeats) and the max difference from
expert_loop, one line per shape and token count.

    .venv/bin/python scripts/bench_moe.py [--shape mixtral-small|qwen3moe-small|...]
        [--tokens 1 --tokens 64] [--dtype float32|bfloat16] [--only expert_loop,ragged]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.model.moe import MoeMlp, route

SHAPES = {  # embed, expert mlp, experts, experts per token
    "mixtral-small": (1024, 3584, 8, 2),
    "qwen3moe-small": (1024, 384, 64, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
}


def _ragged(moe: MoeMlp, tokens, weights, ids):
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = jnp.argsort(flat)
    x = tokens[order // k]
    sizes = jnp.bincount(flat, length=moe.num_experts).astype(jnp.int32)

    def proj(kernel, h):
        return jax.lax.ragged_dot(h, kernel.kernel[...].astype(h.dtype), sizes)

    h = moe._act(proj(moe.gate_proj, x), proj(moe.up_proj, x))
    out = jnp.zeros((t * k, tokens.shape[1]), jnp.float32).at[order].set(
        proj(moe.down_proj, h).astype(jnp.float32))
    return jnp.einsum("tkd,tk->td", out.reshape(t, k, -1), weights)


def _gather(moe: MoeMlp, tokens, weights, ids):
    def proj(kernel, h, spec):
        return jnp.einsum(spec, h, kernel.kernel[...][ids].astype(h.dtype))

    h = moe._act(proj(moe.gate_proj, tokens, "td,tkdf->tkf"),
                 proj(moe.up_proj, tokens, "td,tkdf->tkf"))
    out = proj(moe.down_proj, h, "tkf,tkfd->tkd").astype(jnp.float32)
    return jnp.einsum("tkd,tk->td", out, weights)


def dispatch(name: str):
    def run(graphdef, state, tokens):
        moe = nnx.merge(graphdef, state)
        logits = jnp.matmul(tokens, moe.router[...].astype(tokens.dtype)).astype(jnp.float32)
        weights, ids = route(logits, moe.k, moe.router_kind, moe.renormalize)
        if name in ("ragged", "gather"):
            return (_ragged if name == "ragged" else _gather)(moe, tokens, weights, ids)
        combine = jnp.zeros(logits.shape, jnp.float32).at[
            jnp.arange(tokens.shape[0])[:, None], ids].set(weights)
        return getattr(moe, name)(tokens, combine)

    return jax.jit(run, static_argnums=0)


def timed(fn, *args, repeats: int) -> tuple[float, jax.Array]:
    out = fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, action="append")
    ap.add_argument("--tokens", type=int, action="append")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--only", default="expert_loop,all_experts,ragged,gather")
    ap.add_argument("--gather-max-tokens", type=int, default=64,
                    help="skip `gather` above this many tokens (it copies k matrices per token)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    print(f"machine: {platform.machine()}, {platform.processor() or '?'}; jax {jax.__version__} "
          f"on {device.platform} ({device.device_kind}), {args.dtype}", flush=True)
    dtype = jnp.dtype(args.dtype)
    for shape_name in args.shape or ["mixtral-small", "qwen3moe-small"]:
        d, f, e, k = SHAPES[shape_name]
        moe = MoeMlp(d, f, num_experts=e, experts_per_token=k, router="softmax_topk",
                     renormalize=True, activation="silu", dtype=dtype, param_dtype=dtype,
                     rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(moe)
        for t in args.tokens or [1, 4, 32, 256]:
            tokens = jnp.asarray(np.random.default_rng(t).standard_normal((t, d)), dtype)
            results, ref = [], None
            for name in args.only.split(","):
                if name == "gather" and t > args.gather_max_tokens:
                    continue
                ms, out = timed(dispatch(name), graphdef, state, tokens, repeats=args.repeats)
                ref = out if ref is None else ref
                diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
                results.append(f"{name} {ms:.2f} ms" + (f" (diff {diff:.1e})" if diff else ""))
            print(f"{shape_name} d={d} f={f} experts={e} k={k} tokens={t}: "
                  + ", ".join(results), flush=True)


if __name__ == "__main__":
    main()
