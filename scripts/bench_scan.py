"""Compile time and step time of the train step with the layers unrolled and scanned
(`model.scan_layers`), for SmolLM2-135M's widths at several depths.

For each depth both programs are lowered and compiled ahead of time (the seconds of each
phase are what `flaxlm train --dry-run` reports), then they train one shared state in
alternating rounds (both take the same parameter layout), and the median round is
reported per program, in wall seconds and in this process's CPU seconds (the work done,
which other processes on the machine disturb less than the wall time). Prints progress
lines and one final JSON line with the CPU model and the load average (timings taken
under load are relative only).

    .venv/bin/python scripts/bench_scan.py [--layers 30,60] [--batch 4] [--seq-len 128] \
        [--remat none] [--steps 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from benchlib import cpu_model


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def compiled_step(config, opt, state, shardings, mesh, batch):
    """(the AOT-compiled train step of `config`, the wall and CPU seconds to lower and to
    compile it, XLA's temporary bytes)."""
    from flax import nnx

    from flaxlm.model import Decoder
    from flaxlm.model.sharding import RULES, use_sharding
    from flaxlm.train.step import jit_train_step

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    step = jit_train_step(graphdef, opt, shardings, mesh)
    start, cpu_start = time.perf_counter(), time.process_time()
    with use_sharding(mesh, RULES):
        lowered = step.lower(state, batch)
    lowered_at, cpu_lowered_at = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    seconds = {"lower_s": lowered_at - start, "compile_s": time.perf_counter() - lowered_at,
               "lower_cpu_s": cpu_lowered_at - cpu_start,
               "compile_cpu_s": time.process_time() - cpu_lowered_at}
    temp = compiled.memory_analysis().temp_size_in_bytes
    return compiled, {k: round(v, 2) for k, v in seconds.items()}, int(temp)


def bench_depth(layers: int, args) -> list[dict]:
    import jax
    from flax import nnx

    from flaxlm.model import Decoder, ModelConfig
    from flaxlm.model.sharding import RULES, make_mesh
    from flaxlm.train.data import Batch
    from flaxlm.train.optim import optimizer
    from flaxlm.train.recipe import OptimizerConfig
    from flaxlm.train.step import new_state, put_batch, state_shardings, train_batch_sharding

    config = ModelConfig.smollm2_135m().replace(num_layers=layers, remat=args.remat)
    opt = optimizer(OptimizerConfig(lr=1e-4, warmup_steps=0), 10**6)
    mesh = make_mesh("data=1", jax.devices()[:1])
    _, state = new_state(Decoder(config, rngs=nnx.Rngs(0)), opt, seed=0)
    shardings = state_shardings(state, opt, mesh, RULES)
    state = jax.device_put(state, shardings)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, config.vocab_size, (1, args.batch, args.seq_len + 1)).astype(np.int32)
    positions = np.broadcast_to(np.arange(args.seq_len + 1, dtype=np.int32), rows.shape)
    batch = put_batch(Batch(tokens=rows, segment_ids=np.ones_like(rows), positions=positions),
                      train_batch_sharding(mesh))
    programs = {}
    for scan in (False, True):
        compiled, seconds, temp = compiled_step(
            config.replace(scan_layers=scan), opt, state, shardings, mesh, batch)
        log(f"{layers} layers, scan_layers={scan}: lowered in {seconds['lower_s']:.1f} s "
            f"({seconds['lower_cpu_s']:.1f} s CPU), compiled in {seconds['compile_s']:.1f} s "
            f"({seconds['compile_cpu_s']:.1f} s CPU), temporaries {temp / 2**20:,.0f} MiB")
        programs[scan] = (compiled, {"layers": layers, "scan_layers": scan, **seconds,
                                     "temp_bytes": temp})
    times = {False: [], True: []}
    cpu_times = {False: [], True: []}
    for scan in (False, True):  # one untimed step each (first-call work)
        state, metrics = programs[scan][0](state, batch)
        log(f"{layers} layers, scan_layers={scan}: first step loss {float(metrics.loss):.5f}")
    for r in range(args.rounds):
        for scan in (False, True):
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                state, metrics = programs[scan][0](state, batch)
            jax.block_until_ready(metrics.loss)
            times[scan].append((time.perf_counter() - start) / args.steps)
            cpu_times[scan].append((time.process_time() - cpu_start) / args.steps)
        log(f"{layers} layers round {r}: unrolled {times[False][-1]:.3f} s/step "
            f"({cpu_times[False][-1]:.3f} s CPU), scanned {times[True][-1]:.3f} s/step "
            f"({cpu_times[True][-1]:.3f} s CPU)")
    rows_out = []
    for scan in (False, True):
        row = programs[scan][1]
        row["step_s"] = round(statistics.median(times[scan]), 4)
        row["step_cpu_s"] = round(statistics.median(cpu_times[scan]), 4)
        row["tokens_per_s"] = round(args.batch * args.seq_len / row["step_s"], 1)
        rows_out.append(row)
    return rows_out


def _cost(row: dict, what: str) -> float:
    """Seconds of `what` in a result row: lowering plus compiling for "compile"."""
    if what.startswith("compile"):
        cpu = "_cpu" if what.endswith("cpu") else ""
        return row[f"lower{cpu}_s"] + row[f"compile{cpu}_s"]
    return row[f"{what}_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="30,60", help="depths, comma-separated")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for layers in (int(n) for n in args.layers.split(",")):
        rows += bench_depth(layers, args)
    by = {(r["layers"], r["scan_layers"]): r for r in rows}
    ratios = {str(n): {f"{what}_scanned_over_unrolled": round(
                  _cost(by[n, True], what) / _cost(by[n, False], what), 3)
                  for what in ("compile", "compile_cpu", "step", "step_cpu")}
              for n in sorted({r["layers"] for r in rows})}
    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(),
                      "load_avg_1m": round(os.getloadavg()[0], 2), "batch": args.batch,
                      "seq_len": args.seq_len, "remat": args.remat, "rows": rows,
                      "ratios": ratios}))


if __name__ == "__main__":
    main()
