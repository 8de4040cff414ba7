"""Int8 matmul formulations on the current JAX backend, at SmolLM2-135M's decode shapes.

y[m, n] = sum_k x[m, k] * w[n, k] * scale[n] with w int8, x float32. As in a
real decode step, each program multiplies a chain of distinct weights (enough
to exceed the CPU caches: >= 100 MB of int8, at most 60 weights), each input
depending on the previous output, so weights stream from memory and XLA
cannot overlap or hoist the chain. Times are per weight (best of --repeats),
with the ratio to the float32 matmul of the same chain (> 1: faster).

    .venv/bin/python scripts/bench_int8_matmul.py [--rows 1] [--repeats 10] [--q8-0]

`kernel` is flaxlm's compiled CPU kernel (model/int8_matmul.cc, `make kernels`),
`xla_blocked` its XLA path, `flaxlm` what `int8_matmul` picks between them.
"""

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.model import int8_blocks, int8_kernel
from flaxlm.model.int8 import _blocked_matmul, dequantize, int8_matmul

# (k, n): q/o_proj, k/v_proj, gate/up_proj, down_proj, the (tied) LM head of SmolLM2-135M.
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
DIMS = (((1,), (1,)), ((), ()))  # contract x's k with w's k: w is [n, k], output-major


def convert_dot(x, w, s):        # the obvious code: a float copy of the weight, then a dot
    return jax.lax.dot_general(x, w.astype(x.dtype), DIMS) * s


def dot_mixed(x, w, s):          # lax.dot_general on int8 directly (mixed input dtypes)
    return jax.lax.dot_general(x, w, DIMS, preferred_element_type=jnp.float32) * s


def mul_reduce(x, w, s):         # elementwise multiply and sum over k, fused by XLA
    return jnp.sum(x[:, None, :] * w.astype(x.dtype)[None], axis=2) * s


def int8_int8(x, w, s):          # activations quantized per row: int8 x int8 -> int32 dot
    sx = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
    xq = jnp.round(x / jnp.maximum(sx, 1e-30)).astype(jnp.int8)
    y = jax.lax.dot_general(xq, w, DIMS, preferred_element_type=jnp.int32)
    return y.astype(jnp.float32) * sx * s


# These four also take GGUF Q8_0 block scales [n, k / 32] (--q8-0); s [n] is per channel.
def _groups(s):
    return s if s.ndim == 2 else s[:, None]


def xla_blocked(x, w, s):        # flaxlm's XLA:CPU path: blocks of rows converted in cache
    block = int8_blocks.block_bytes(x.shape[0])  # the size measured for this CPU
    return _blocked_matmul(x, w, _groups(s), block_bytes=block)


def kernel(x, w, s):             # the compiled kernel (model/int8_matmul.cc) via jax.ffi
    return int8_kernel.int8_matmul(x, w, _groups(s))


def kernel_1t(x, w, s):          # the same on one thread
    return int8_kernel.int8_matmul(x, w, _groups(s), max_threads=1)


def flaxlm(x, w, s):             # flaxlm.model.int8.int8_matmul (its own choice)
    return int8_matmul(x, w, _groups(s))


GROUPED = ("xla_blocked", "kernel", "kernel_1t", "flaxlm")


FORMULATIONS = {"convert_dot": convert_dot, "dot_mixed": dot_mixed, "mul_reduce": mul_reduce,
                "int8_int8": int8_int8, "xla_blocked": xla_blocked, "kernel": kernel,
                "kernel_1t": kernel_1t, "flaxlm": flaxlm}


def chain(product, m, n):
    def run(x, weights, scales):
        y = jnp.zeros((m, n), jnp.float32)
        for w, s in zip(weights, scales):
            y = y + product(x + 1e-30 * y[:, :1], w, s)
        return y
    return jax.jit(run)


def best_ms(fn, *args, repeats):
    return int8_blocks.best_seconds(fn, args, repeats) * 1e3


def measure(m, k, n, names, repeats, q8_0=False):
    count = min(60, max(2, math.ceil(100e6 / (k * n))))
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8)) for _ in range(count)]
    shape = (n, k // 32) if q8_0 else (n,)
    scales = [jnp.asarray(rng.uniform(1e-3, 1e-2, shape).astype(np.float32)) for _ in range(count)]
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    floats = [dequantize(w, _groups(s)) for w, s in zip(weights, scales)]
    ones = [jnp.ones((n,), jnp.float32)] * count
    f32 = chain(lambda x, w, s: jax.lax.dot_general(x, w, DIMS), m, n)
    reference = f32(x, floats, ones)
    row = {"count": count, "f32": best_ms(f32, x, floats, ones, repeats=repeats) / count}
    del floats
    for name in names:
        out = chain(FORMULATIONS[name], m, n)
        got = out(x, weights, scales)
        err = float(jnp.max(jnp.abs(got - reference)) / jnp.max(jnp.abs(reference)))
        ok = err < (2e-2 if name == "int8_int8" else 1e-4)  # int8_int8 also rounds x
        row[name] = best_ms(out, x, weights, scales, repeats=repeats) / count if ok else "wrong"
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1", help="comma-separated m values (batch rows)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", default=",".join(FORMULATIONS))
    parser.add_argument("--q8-0", action="store_true",
                        help=f"GGUF Q8_0 block scales (k / 32 per row); only {', '.join(GROUPED)}")
    args = parser.parse_args()
    names = args.only.split(",")
    if args.q8_0 and set(names) - set(GROUPED):
        parser.error(f"--q8-0 measures only {', '.join(GROUPED)}")
    print(f"backend {jax.default_backend()}; ms per weight (ratio: float32 time / this time)")
    print(f"{'m':>3} {'k':>5} {'n':>6} {'f32':>7}  " + "  ".join(f"{n:>16}" for n in names))
    results = []
    for m in (int(r) for r in args.rows.split(",")):
        for k, n in SHAPES:
            row = measure(m, k, n, names, args.repeats, args.q8_0)
            cells = [f"{row[x]:7.3f} ({row['f32'] / row[x]:5.2f}x)" if isinstance(row[x], float)
                     else f"{row[x]:>16}" for x in names]
            print(f"{m:>3} {k:>5} {n:>6} {row['f32']:7.3f}  " + "  ".join(cells), flush=True)
            results.append({"m": m, "k": k, "n": n, **row})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
