"""Decode attention over the KV cache at batch 32 (SmolLM2-135M's shapes: 3 kv heads, 3
queries per kv head, head_dim 64, 256 slots, 30 layers): the batched dots flaxlm uses
against multiply-and-reduce fusions, ms per step's worth of layers (best of 10).

    .venv/bin/python scripts/bench_decode_attention.py
"""

import jax
import jax.numpy as jnp
import numpy as np

from benchlib import cpu_model
from flaxlm.model.int8_blocks import best_seconds

B, KV, G, S, H, L = 32, 3, 3, 256, 64, 30
BD = ((0, 1), (0, 1))


def dots(q, k, v):           # flaxlm's form: two batched dot_generals
    p = jax.nn.softmax(jax.lax.dot_general(q, k, (((3,), (3,)), BD)), -1)
    return jax.lax.dot_general(p, v, (((3,), (2,)), BD))


def reduces(q, k, v):        # elementwise products summed: loop fusions, no dot
    p = jax.nn.softmax(jnp.sum(q[:, :, :, None, :] * k[:, :, None, :, :], -1), -1)
    return jnp.sum(p[..., None] * v[:, :, None, :, :], -2)


def scores_reduce(q, k, v):  # scores by reduction, weighted sum by dot
    p = jax.nn.softmax(jnp.sum(q[:, :, :, None, :] * k[:, :, None, :, :], -1), -1)
    return jax.lax.dot_general(p, v, (((3,), (2,)), BD))


def chain(form):
    def run(q, ks, vs):
        for k, v in zip(ks, vs):
            q = q + 1e-3 * form(q, k, v)
        return q
    return jax.jit(run)


def main():
    rng = np.random.default_rng(0)
    ks = [jnp.asarray(rng.standard_normal((B, KV, S, H), np.float32)) for _ in range(L)]
    vs = [jnp.asarray(rng.standard_normal((B, KV, S, H), np.float32)) for _ in range(L)]
    q0 = jnp.asarray(rng.standard_normal((B, KV, G, H), np.float32))
    print(f"CPU: {cpu_model()}; K/V read per pass: {2 * L * B * KV * S * H * 4 / 1e6:.0f} MB")
    reference = None
    for name, form in [("dots", dots), ("reduces", reduces), ("scores_reduce", scores_reduce)]:
        run = chain(form)
        out = jax.block_until_ready(run(q0, ks, vs))
        reference = out if reference is None else reference
        best = best_seconds(run, (q0, ks, vs), repeats=10)
        print(f"{name}: {best * 1e3:.2f} ms for {L} layers "
              f"(max |diff| {float(jnp.abs(out - reference).max()):.1e})")


if __name__ == "__main__":
    main()
