"""Float32 matmuls of few rows on XLA:CPU vs flaxlm's kernel, at SmolLM2-135M's decode shapes.

As in a decode step, each program multiplies a chain of distinct weights (>= 200 MB of
float32, so they stream from memory), each input depending on the previous output. Times
are per weight (best of --repeats; XLA and the kernel alternate round by round), and the
last line weighs them as the projections of one SmolLM2-135M decode step do (30 layers of
q, k, v, o, gate, up, down; the tied head stays XLA's).

    .venv/bin/python scripts/bench_f32_matmul.py [--rows 1,4] [--repeats 10]

`xla` is what flaxlm compiles without the kernel (Einsum's x @ w[K, N]), `kernel` the
compiled CPU kernel (model/f32_matmul.cc), `kernel_1t` the same on one thread,
`kernel_avx2` its AVX2 code.
"""

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.model import f32_kernel

# (k, n, count per SmolLM2-135M decode step): q/o, k/v, gate/up, down.
SHAPES = [(576, 576, 60), (576, 192, 60), (576, 1536, 60), (1536, 576, 30)]


def xla(x, w):
    return x @ w


def kernel(x, w):
    return f32_kernel.f32_matmul(x, w)


def kernel_1t(x, w):
    return f32_kernel.f32_matmul(x, w, max_threads=1)


def kernel_avx2(x, w):           # the AVX2+FMA code (what a CPU without AVX-512 runs)
    return f32_kernel.f32_matmul(x, w, variant="avx2")


FORMULATIONS = {"xla": xla, "kernel": kernel, "kernel_1t": kernel_1t, "kernel_avx2": kernel_avx2}


def chain(product, m, n):
    def run(x, weights):
        y = jnp.zeros((m, n), jnp.float32)
        for w in weights:
            y = y + product(x + 1e-30 * y[:, :1], w)
        return y
    return jax.jit(run)


def measure(m, k, n, names, repeats):
    count = min(60, max(2, math.ceil(200e6 / (4 * k * n))))
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal((k, n), dtype=np.float32)) for _ in range(count)]
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    fns = {name: chain(FORMULATIONS[name], m, n) for name in names}
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
    parser.add_argument("--only", default="xla,kernel,kernel_1t",
                        help=f"comma-separated, xla first; of {', '.join(FORMULATIONS)}")
    args = parser.parse_args()
    names = args.only.split(",")
    print(f"backend {jax.default_backend()}; ms per weight (xla time / this time; GB/s)")
    print(f"{'m':>3} {'k':>5} {'n':>6} " + "  ".join(f"{n:>22}" for n in names))
    results = []
    for m in (int(r) for r in args.rows.split(",")):
        step = dict.fromkeys(names, 0.0)
        for k, n, per_step in SHAPES:
            row = measure(m, k, n, names, args.repeats)
            cells = []
            for name in names:
                t = row[name]
                if isinstance(t, str):
                    cells.append(f"{t:>22}")
                    continue
                step[name] += per_step * t
                gbs = 4 * k * n / (t * 1e-3) / 1e9
                cells.append(f"{t:7.4f} ({row[names[0]] / t:4.2f}x {gbs:4.1f})")
            print(f"{m:>3} {k:>5} {n:>6} " + "  ".join(cells), flush=True)
            results.append({"m": m, "k": k, "n": n, **row})
        print(f"{m:>3} SmolLM2 step's projections (ms): " + "  ".join(
            f"{step[x]:7.2f} ({step[names[0]] / step[x]:4.2f}x)" for x in names), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
