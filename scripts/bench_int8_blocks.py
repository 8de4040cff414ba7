"""The int8 matmul's CPU block size: every candidate on a chain of SmolLM2-135M's matmuls
laid out as the decoder has them (one weight per layer, unrolled, then the LM head),
beside float32 on the same chain, and what flaxlm's first-use probe
(`flaxlm.model.int8_blocks`: a scanned chain, fewer candidates) picks on this CPU.

    .venv/bin/python scripts/bench_int8_blocks.py [--layers 30] [--rows 1,4,32]
        [--candidates 64,128,256,512,1024,2048,4096,8192] [--repeats 5]

Candidates are KiB of float32 per converted block; times are ms per chain (best of
--repeats), lower is better.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchlib import cpu_model
from flaxlm.model import int8_blocks
from flaxlm.model.int8 import _blocked_matmul

HEAD = (576, 49152)
DIMS = (((1,), (1,)), ((), ()))


def chain_ms(product, shapes, weights, scales, m, repeats):
    def run(weights, scales):
        h = {576: jnp.full((m, 576), 0.5), 1536: jnp.full((m, 1536), 0.5)}
        total = jnp.zeros((m,), jnp.float32)
        for (k, _), w, s in zip(shapes, weights, scales):
            y = product(h[k], w, s)
            total = total + y[:, 0]
            if y.shape[1] in h:
                h[y.shape[1]] = y * 1e-3
        return total

    return int8_blocks.best_seconds(jax.jit(run), (weights, scales), repeats) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rows", default="1,4,32")
    parser.add_argument("--candidates", default="64,128,256,512,1024,2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    candidates = [int(c) << 10 for c in args.candidates.split(",")]
    shapes = list(int8_blocks._LAYER) * args.layers + [HEAD]
    rng = np.random.default_rng(0)
    q = [jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8)) for k, n in shapes]
    scales = [jnp.full((n, 1), 1e-3, jnp.float32) for _, n in shapes]
    print(f"CPU: {cpu_model()}; {args.layers} SmolLM2-135M layers + head, ms per chain")
    table = {}
    for m in rows:
        floats = [w.astype(jnp.float32) * s for w, s in zip(q, scales)]
        dense = lambda x, w, s: jax.lax.dot_general(x, w, DIMS)  # noqa: E731
        table[m] = {"float32": chain_ms(dense, shapes, floats, scales, m, args.repeats)}
        del floats
        for size in candidates:
            product = lambda x, w, s, size=size: _blocked_matmul(x, w, s, size)  # noqa: E731
            table[m][size >> 10] = chain_ms(product, shapes, q, scales, m, args.repeats)
        print(f"rows {m}: " + ", ".join(f"{k}{'' if k == 'float32' else ' KiB'} {v:.2f}"
                                        for k, v in table[m].items()), flush=True)
    probe = int8_blocks.fastest(int8_blocks.measure())
    print(json.dumps({"cpu": cpu_model(), "layers": args.layers, "ms": table,
                      "probe_choice_kib": {m: c >> 10 for m, c in probe.items()}}))


if __name__ == "__main__":
    main()
