"""Per-step time of the compiled SmolLM2 decode loop, and where it goes.

    .venv/bin/python scripts/profile_decode.py                 # batch 1, 4, 8
    .venv/bin/python scripts/profile_decode.py --batch 4 --ops  # + op-time table
    .venv/bin/python scripts/profile_decode.py --quantize int8
    .venv/bin/python scripts/profile_decode.py --hlo           # + what XLA compiled

With `--hlo`, each batch size's compiled decode step is also summarized
machine-independently: instruction count, XLA's flop and byte estimates, and a
fingerprint of the optimized HLO with names and source locations removed. Two
trees whose fingerprints agree compiled the same program, whatever the load on
the machine that timed them (how the config generalisation of issue 13 was
checked to cost decode nothing).

Runs `flaxlm.infer.engine.decode_step` for `--steps` tokens inside one
`lax.fori_loop` (cache of `--cache-len` slots, `--prompt-len` of them filled)
and prints the best of three runs in ms per step. With `--ops`, one more run is
traced with `jax.profiler` and the time per compiled op is summed by op name
(numbered suffixes dropped) and output shape: the table that showed the
per-step weight and KV-cache copies fixed in docs/benchmarks.md. Profiled runs
are slower than unprofiled ones (per-op tracing overhead); compare ops within
one table.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import hashlib
import json
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.infer.engine import decode_step
from flaxlm.model.cache import KVCache
from flaxlm.model.loading import load


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, action="append", help="rows (repeatable); 1, 4, 8")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--cache-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--quantize", choices=["int8", "q8_0"])
    ap.add_argument("--ops", action="store_true", help="also print per-op times (profiled)")
    ap.add_argument("--hlo", action="store_true",
                    help="also print the compiled step's size, cost and fingerprint")
    args = ap.parse_args(argv)
    if not 0 < args.prompt_len < args.cache_len or args.steps < 1:
        print("error: need 0 < --prompt-len < --cache-len and --steps >= 1", file=sys.stderr)
        return 2
    model, _ = load("smollm2-135m-instruct", dtype="float32", quantize=args.quantize)
    graphdef, state = nnx.split(model)

    def loop(state, cache, tokens):
        m = nnx.merge(graphdef, state)

        def body(_, carry):
            cache, tokens = carry
            cache, logits = decode_step(m, cache, tokens)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, args.steps, body, (cache, tokens))

    run = jax.jit(loop, donate_argnums=1)
    for batch in args.batch or [1, 4, 8]:
        def fresh():
            cache = KVCache.init(model.config, batch, args.cache_len)
            slots = jnp.arange(args.cache_len, dtype=jnp.int32)
            held = jnp.where(slots < args.prompt_len, slots, -1)  # a prompt's slots
            return cache.replace(lengths=jnp.full((batch,), args.prompt_len, jnp.int32),
                                 positions=jnp.broadcast_to(held, (batch, args.cache_len)),
                                 end=jnp.asarray(args.prompt_len, jnp.int32))

        tokens = jnp.zeros((batch,), jnp.int32)
        jax.block_until_ready(run(state, fresh(), tokens))
        best = float("inf")
        for _ in range(3):
            cache = fresh()
            t0 = time.perf_counter()
            jax.block_until_ready(run(state, cache, tokens))
            best = min(best, (time.perf_counter() - t0) / args.steps * 1e3)
        print(f"batch {batch}: {best:.1f} ms/step ({batch * 1e3 / best:.1f} tok/s)")
        if args.ops:
            print_ops(run, state, fresh(), tokens, args.steps)
        if args.hlo:
            print_hlo(graphdef, state, fresh(), tokens)
    return 0


def print_hlo(graphdef, state, cache, tokens) -> None:
    """One decode step's optimized HLO: size, XLA's cost estimate, a fingerprint."""
    def one(state, cache, tokens):
        return decode_step(nnx.merge(graphdef, state), cache, tokens)

    compiled = jax.jit(one, donate_argnums=1).lower(state, cache, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    lines = []
    for line in compiled.as_text().splitlines():
        if re.match(r"\s*(HloModule|FileNames|FunctionNames|FileLocations|StackFrames|\d+ |\")", line):
            continue
        line = re.sub(r", metadata=\{[^}]*\}|stack_frame_id=\d+", "", line)
        lines.append(re.sub(r"%[\w.\-]+", "%x", line))
    digest = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()[:16]
    print(f"  hlo: {len(lines)} lines, {cost.get('flops', 0):.4g} flops, "
          f"{cost.get('bytes accessed', 0):.4g} bytes accessed, fingerprint {digest}")


def print_ops(run, state, cache, tokens, steps: int, top: int = 25) -> None:
    hlo = run.lower(state, cache, tokens).compile().as_text()
    shapes = {m.group(1): m.group(2) for m in
              re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", hlo, re.M)}
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        jax.block_until_ready(run(state, cache, tokens))
        jax.profiler.stop_trace()
        path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
        events = json.load(gzip.open(path))["traceEvents"]
    total = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") == "X" and e["name"] in shapes:
            name = re.sub(r"[.]\d+$", "", e["name"])
            key = f"{name} {shapes[e['name']]}"
            total[key][0] += 1
            total[key][1] += e.get("dur", 0.0)
    print(f"  {'ms/step':>8} {'ops/step':>8}  op, output shape")
    for key, (count, us) in sorted(total.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {us / 1e3 / steps:8.3f} {count / steps:8.1f}  {key[:110]}")


if __name__ == "__main__":
    sys.exit(main())
