"""Float32 matmuls of few rows on XLA:CPU vs flaxlm's kernel, at SmolLM2-135M's decode shapes.

As in a decode step, each program multiplies a chain of distinct weights (>= 200 MB of
float32, so they stream from memory), each input depending on the previous output. Times
are per weight (best of --repeats; XLA and the kernel alternate round by round), and the
last line weighs them as one SmolLM2-135M decode step does (30 layers of q, k, v, o, gate,
up, down, and the tied head).

    .venv/bin/python scripts/bench_f32_matmul.py [--rows 1,4] [--repeats 10]

`xla` is what flaxlm compiles without the kernel (Einsum's x @ w[K, N]; the head's
table[N, K] @ x.T), `kernel` the compiled CPU kernel (model/f32_matmul.cc), `kernel_1t`
the same on one thread.
"""

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.model import f32_kernel

# (k, n, layout, count per SmolLM2-135M decode step)
SHAPES = [(576, 576, "kn", 60), (576, 192, "kn", 60), (576, 1536, "kn", 60),
          (1536, 576, "kn", 30), (576, 49152, "nk", 1)]


def xla(x, w, layout):
    if layout == "kn":
        return x @ w
    logits = jax.lax.dot_general(w, x, (((1,), (1,)), ((), ())))  # as Embedder.attend
    return jax.lax.optimization_barrier(logits).T


def kernel(x, w, layout):
    return f32_kernel.f32_matmul(x, w, layout=layout)


def kernel_1t(x, w, layout):
    return f32_kernel.f32_matmul(x, w, layout=layout, max_threads=1)


FORMULATIONS = {"xla": xla, "kernel": kernel, "kernel_1t": kernel_1t}


def chain(product, m, n, layout):
    def run(x, weights):
        y = jnp.zeros((m, n), jnp.float32)
        for w in weights:
            y = y + product(x + 1e-30 * y[:, :1], w, layout)
        return y
    return jax.jit(run)


def measure(m, k, n, layout, names, repeats):
    count = min(60, max(2, math.ceil(200e6 / (4 * k * n))))
    rng = np.random.default_rng(0)
    shape = (k, n) if layout == "kn" else (n, k)
    weights = [jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(count)]
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    fns = {name: chain(FORMULATIONS[name], m, n, layout) for name in names}
    outs = {name: np.asarray(fn(x, weights)) for name, fn in fns.items()}
    ref = outs[names[0]]
    best = dict.fromkeys(names, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, weights))
            best[name] = min(best[name], time.perf_counter() - t0)
    row = {}
    for name in names:
        err = float(np.max(np.abs(outs[name] - ref)) / np.max(np.abs(ref)))
        row[name] = best[name] * 1e3 / count if err < 1e-4 else "wrong"
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4", help="comma-separated m values (batch rows)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", default=",".join(FORMULATIONS))
    args = parser.parse_args()
    names = args.only.split(",")
    print(f"backend {jax.default_backend()}; ms per weight (xla time / this time; GB/s)")
    print(f"{'m':>3} {'k':>5} {'n':>6} {'':>3} " + "  ".join(f"{n:>22}" for n in names))
    results = []
    for m in (int(r) for r in args.rows.split(",")):
        step = dict.fromkeys(names, 0.0)
        for k, n, layout, per_step in SHAPES:
            row = measure(m, k, n, layout, names, args.repeats)
            cells = []
            for name in names:
                t = row[name]
                if isinstance(t, str):
                    cells.append(f"{t:>22}")
                    continue
                step[name] += per_step * t
                gbs = 4 * k * n / (t * 1e-3) / 1e9
                cells.append(f"{t:7.4f} ({row[names[0]] / t:4.2f}x {gbs:4.1f})")
            print(f"{m:>3} {k:>5} {n:>6} {layout:>3} " + "  ".join(cells), flush=True)
            results.append({"m": m, "k": k, "n": n, "layout": layout, **row})
        print(f"{m:>3} one SmolLM2 step (ms): " + "  ".join(
            f"{step[x]:7.2f} ({step[names[0]] / step[x]:4.2f}x)" for x in names), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
