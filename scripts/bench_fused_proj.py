"""Fused or split projections for decode: Phi-3's qkv_proj / gate_up_proj layout.

Phi-3 checkpoints store q, k, v as one [D, (H + 2K) * h] matrix and gate, up as
one [D, 2F] matrix. This times a decode-shaped step (a few rows through L
layers of attention-input and MLP-input projections, inside one jit program)
with the fused matrices against the same weights split into separate matrices,
as flaxlm's Attention and Mlp use them. Prints ms per step, the best of
`--rounds` alternating rounds.

    .venv/bin/python scripts/bench_fused_proj.py [--shape phi3-mini|smollm2] [--rows 1]
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {  # embed, heads, kv heads, head_dim, mlp, layers timed
    "phi3-mini": (3072, 32, 32, 96, 8192, 4),
    "smollm2": (576, 9, 3, 64, 1536, 30),
}


def weights(shape, seed=0):
    d, n, k, h, f, layers = shape
    rng = np.random.default_rng(seed)
    make = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32) * d ** -0.5)  # noqa: E731
    return [dict(qkv=make(d, (n + 2 * k) * h), gate_up=make(d, 2 * f), down=make(f, d))
            for _ in range(layers)]


def split(layers, shape):
    d, n, k, h, f, _ = shape
    out = []
    for w in layers:
        q, kk, v = jnp.split(w["qkv"], [n * h, (n + k) * h], axis=1)
        gate, up = jnp.split(w["gate_up"], 2, axis=1)
        out.append(dict(q=q, k=kk, v=v, gate=gate, up=up, down=w["down"]))
    return out


def consume(x, q, k, v, gate, up, down):
    """Use every output in full, the same way for both layouts."""
    mix = jnp.tanh(q[:, :x.shape[1]]) + 1e-3 * (jnp.sum(k, -1, keepdims=True)
                                               + jnp.sum(v, -1, keepdims=True))
    return x + mix + (jax.nn.silu(gate) * up) @ down


def fused_step(layers, x, sizes):
    for w in layers:
        q, k, v = jnp.split(x @ w["qkv"], sizes, axis=-1)
        gate, up = jnp.split(x @ w["gate_up"], 2, axis=-1)
        x = consume(x, q, k, v, gate, up, w["down"])
    return x


def split_step(layers, x, sizes):
    for w in layers:
        x = consume(x, x @ w["q"], x @ w["k"], x @ w["v"], x @ w["gate"], x @ w["up"], w["down"])
    return x


def interleaved(fns: dict, args: dict, rounds: int, calls: int = 5) -> dict[str, float]:
    """Best ms per call of each compiled fn, timed in alternation round after round
    (so machine load hits both alike; the minimum is the least disturbed run)."""
    for name, fn in fns.items():
        fn(*args[name]).block_until_ready()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                out = fn(*args[name])
            out.block_until_ready()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e3)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, action="append")
    ap.add_argument("--rows", type=int, action="append")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    print(f"machine: {platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}")
    for name in args.shape or list(SHAPES):
        shape = SHAPES[name]
        fused = weights(shape)
        separate = split(fused, shape)
        d, n, k, h, _, _ = shape
        sizes = (n * h, (n + k) * h)
        fns = {"fused": jax.jit(functools.partial(fused_step, sizes=sizes)),
               "split": jax.jit(functools.partial(split_step, sizes=sizes))}
        for rows in args.rows or [1, 4]:
            x = jnp.asarray(np.random.default_rng(1).standard_normal((rows, d), np.float32))
            best = interleaved(fns, {"fused": (fused, x), "split": (separate, x)}, args.rounds)
            print(f"{name} rows={rows}: fused {best['fused']:.3f} ms, split {best['split']:.3f} ms,"
                  f" split/fused {best['split'] / best['fused']:.3f}", flush=True)


if __name__ == "__main__":
    main()
