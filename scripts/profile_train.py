"""Where a training step's time goes: flaxlm's compiled step and the PyTorch loop, by category.

    .venv/bin/python scripts/profile_train.py                    # both shapes, both sides
    .venv/bin/python scripts/profile_train.py --shapes tiny --side jax --top 25

The same step as scripts/bench_train.py (same weights, batches, AdamW, clipping), for
each shape. flaxlm's compiled step is traced with `jax.profiler` at host tracer level 3,
where XLA:CPU records one event per executed thunk (an HLO instruction: a fusion, a
dot, a YNNPACK/oneDNN library fusion, a copy). Each instruction is put in a category
by the Python call stack XLA keeps in the compiled HLO's metadata (a fusion by the
instructions inside it: the dot's when it has one):

    attention     dot_product_attention and its masks (scores, softmax, weighted sum)
    loss head     output logits, log-softmax cross-entropy (Decoder.logits, optax loss)
    matmul        the projections' and the MLP's dots (Einsum.__call__)
    optimizer     everything after the gradient: clipping, AdamW, the metrics' norms
    small ops     the rest: norms, RoPE, SiLU, residual adds, embedding lookup

Forward and backward of each fall in the same category (XLA keeps the primal op's
stack for its transpose). The PyTorch side is profiled with `torch.profiler`: self CPU
time of every op, put in the same categories by op name, input shapes (a matmul
touching the vocabulary is the loss head) and the loop's named regions.

Times are per step. Profiled runs are slower than plain ones (one event per op), and
thunks of one XLA step may overlap on several threads, so the categories' sum can
differ from the step's wall time; compare the fractions. The unprofiled wall time per
step of each side is printed too. `--top N` lists flaxlm's N most expensive
instructions with their shapes (which fusions and dots dominate, any copies).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

from bench_train import SHAPES, device_batch, hf_model, jax_state, torch_side
from benchlib import cpu_model

CATEGORIES = ("attention", "loss head", "matmul", "optimizer", "small ops")
ATTENTION_FUNCS = {"dot_product_attention", "cached_attention", "attention_mask",
                   "Decoder._masks"}
ASYNC_OPS = ("dot", "convolution")  # XLA:CPU runs these (Eigen) asynchronously
LOSS_FUNCS = {"Decoder.logits", "Decoder._head", "Embedder.attend", "_sums",
              "softmax_cross_entropy_with_integer_labels"}


# ---------------------------------------------------------------- flaxlm (XLA:CPU) side

class Hlo:
    """The optimized HLO text of a compiled program: each instruction's opcode, output
    shape, Python call stack (function names) and the computations it calls."""

    def __init__(self, text: str):
        sections = self._sections(text)
        funcs = {int(k): v for k, v in sections.get("FunctionNames", [])}
        locs = {int(k): funcs.get(int(re.search(r"function_name_id=(\d+)", v).group(1)), "?")
                for k, v in sections.get("FileLocations", [])}
        self.frames = {}
        for k, v in sections.get("StackFrames", []):
            loc, parent = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", v).groups()
            self.frames[int(k)] = (locs.get(int(loc), "?"), int(parent))
        self.instr, self.computations, computation = {}, collections.defaultdict(list), None
        for line in text.splitlines():
            head = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
            if head:
                computation = head.group(1)
                continue
            m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
            if not m or computation is None:
                continue
            frame = re.search(r"stack_frame_id=(\d+)", line)
            called = re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line)
            self.instr[m.group(1)] = dict(shape=m.group(2), op=m.group(3), called=called,
                                          stack=self.stack(int(frame.group(1)) if frame else 0))
            self.computations[computation].append(m.group(1))

    @staticmethod
    def _sections(text: str) -> dict[str, list[tuple[str, str]]]:
        out, name = {}, None
        for line in text.splitlines():
            if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                name = line
                out[name] = []
            elif name and re.match(r"^\d+ ", line):
                key, value = line.split(" ", 1)
                out[name].append((key, value.strip('"')))
            elif name and line.strip():
                name = None
        return out

    def stack(self, frame: int) -> frozenset[str]:
        names, seen = set(), set()
        while frame in self.frames and frame not in seen:
            seen.add(frame)
            func, parent = self.frames[frame]
            names.add(func)
            frame = parent - 1  # the text prints a frame's parent as its id + 1 (0: none)
        return frozenset(names)

    def inside(self, name: str) -> list[dict]:
        """The instruction and everything in the computations it calls (transitively)."""
        out, todo = [], [name]
        while todo:
            info = self.instr.get(todo.pop())
            if info is None:
                continue
            out.append(info)
            for comp in info["called"]:
                todo.extend(self.computations.get(comp, []))
        return out

    def category(self, name: str) -> str:
        infos = self.inside(name)
        dots = [i for i in infos if i["op"] in ("dot", "convolution")]
        cats = [stack_category(i["stack"], i["op"] in ("dot", "convolution"))
                for i in (dots or infos) if i["stack"]]
        for cat in CATEGORIES:
            if cat in cats:
                return cat
        return "small ops"

    def movement_only(self, name: str) -> bool:
        """Whether the instruction only moves data (copy/transpose, no arithmetic)."""
        moving = {"copy", "transpose", "bitcast", "parameter", "broadcast", "reshape", "fusion",
                  "slice", "concatenate", "dynamic-slice", "dynamic-update-slice", "tuple",
                  "get-tuple-element", "constant"}
        ops = {i["op"] for i in self.inside(name)}
        return ops <= moving and bool(ops & {"copy", "transpose"})


def stack_category(stack: frozenset[str], is_dot: bool) -> str:
    if stack & ATTENTION_FUNCS:
        return "attention"
    if stack & LOSS_FUNCS:
        return "loss head"
    if "Einsum.__call__" in stack:
        return "matmul" if is_dot else "small ops"
    if "train_step" in stack and "_summed_grads" not in stack:
        return "optimizer"
    return "small ops"


def jax_profile(config, hf, batches, steps: int, top: int) -> dict:
    """flaxlm's step: unprofiled ms/step, then a trace of `steps` steps by category."""
    import jax

    from flaxlm.model.sharding import RULES, make_mesh, use_sharding
    from flaxlm.train.step import jit_train_step, state_shardings, train_batch_sharding

    graphdef, state, opt = jax_state(config, hf, lr=1e-4)
    mesh = make_mesh("data=1", jax.devices()[:1])
    shardings = state_shardings(state, opt, mesh, RULES)
    batches = [device_batch(rows, train_batch_sharding(mesh)) for rows in batches]
    state = jax.device_put(state, shardings)
    with use_sharding(mesh, RULES):
        t = time.perf_counter()
        compiled = jit_train_step(graphdef, opt, shardings, mesh).lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t
    hlo = Hlo(compiled.as_text())

    def run(n, start=0):
        nonlocal state
        for i in range(n):
            state, metrics = compiled(state, batches[(start + i) % len(batches)])
        return metrics

    first_loss = float(run(1).loss)
    wall = _best_wall(lambda: jax.block_until_ready(run(steps, 1)), steps)
    if top < 0:  # --wall-only
        return {"wall_ms": wall, "compile_s": round(compile_s, 1), "first_loss": first_loss}
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level = 3  # XLA:CPU's per-thunk events
    options.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, profiler_options=options)
        jax.block_until_ready(run(steps, 1))
        jax.profiler.stop_trace()
        path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
        events = json.load(gzip.open(path))["traceEvents"]
    intervals = thunk_intervals(events, hlo.instr,
                                lambda name: hlo.instr[name]["op"] in ASYNC_OPS)
    runs = collections.Counter(name for _, _, name in intervals)
    per_op = {name: [runs[name], us / 1e3 / steps]
              for name, us in fair_share(intervals).items()}
    if not per_op:
        raise SystemExit("error: the trace has no per-instruction events (XLA:CPU records them "
                         "at host tracer level 3; this jaxlib does not)")
    by_cat = collections.Counter()
    movement = 0.0
    for name, (_, ms) in per_op.items():
        by_cat[hlo.category(name)] += ms
        movement += ms if hlo.movement_only(name) else 0.0
    ops = sorted(per_op.items(), key=lambda kv: -kv[1][1])[:top]
    return {"wall_ms": wall, "compile_s": round(compile_s, 1), "first_loss": first_loss,
            "categories_ms": {c: by_cat[c] for c in CATEGORIES}, "movement_ms": movement,
            "top": [(name, hlo.instr[name]["shape"], hlo.category(name), count / steps, ms)
                    for name, (count, ms) in ops]}


def thunk_intervals(events: list[dict], names, is_async=lambda name: False
                    ) -> list[tuple[float, float, str]]:
    """(start, end, instruction) in microseconds of every run of every thunk. A thunk's
    event covers its run, but an asynchronous one's (an Eigen dot or convolution) only
    its launch: its run lasts until its "end: NAME" event."""
    starts, ends = collections.defaultdict(list), collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e["name"]
        if name in names:
            starts[name].append((e["ts"], e.get("dur", 0.0)))
        elif name.startswith("end: ") and name[5:] in names and is_async(name[5:]):
            ends[name[5:]].append(e["ts"] + e.get("dur", 0.0))
    out = []
    for name, runs in starts.items():
        runs.sort()
        done = sorted(ends.get(name, []))
        for i, (ts, dur) in enumerate(runs):
            out.append((ts, max(ts + dur, done[i]) if i < len(done) else ts + dur, name))
    return out


def fair_share(intervals: list[tuple[float, float, str]]) -> dict[str, float]:
    """Wall time (us) per name, each instant split evenly among the runs active then:
    thunks of one step overlap on XLA:CPU's threads (an asynchronous dot beside the
    fusions after it), and plain sums would count the overlap twice."""
    points = sorted([(s, 1, i) for i, (s, _, _) in enumerate(intervals)]
                    + [(e, -1, i) for i, (_, e, _) in enumerate(intervals)])
    share, active, last = collections.Counter(), set(), None
    for t, kind, i in points:
        if active and last is not None and t > last:
            for j in active:
                share[intervals[j][2]] += (t - last) / len(active)
        last = t
        if kind > 0:
            active.add(i)
        else:
            active.discard(i)
    return share


def _best_wall(run, steps: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - t) / steps * 1e3)
    return best


# ---------------------------------------------------------------- PyTorch side

def torch_category(event, vocab: int) -> str:
    names, parent = [], event
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    joined = " ".join(names).lower()
    shapes = str(getattr(event, "input_shapes", ""))
    if "optimizer" in names or "clip" in names:
        return "optimizer"
    if "scaled_dot_product" in joined or "flash_attention" in joined or "sdpa" in joined:
        return "attention"
    if "loss" in names or "softmax" in joined or "nll" in joined:
        return "loss head"
    if re.search(r"\b(mm|addmm|bmm|matmul|linear)\b", joined) and "embedding" not in joined:
        return "loss head" if re.search(rf"\b{vocab}\b", shapes) else "matmul"
    return "small ops"


def torch_profile(hf, batches, steps: int, vocab: int, wall_only: bool = False) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    run = torch_side(hf, batches, lr=1e-4)
    first_loss = run(1)
    wall = _best_wall(lambda: run(steps, 1), steps)
    if wall_only:
        return {"wall_ms": wall, "first_loss": first_loss}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run(steps, 1)
    by_cat = collections.Counter()
    for event in prof.events():
        if event.name in ("forward", "loss", "backward", "clip", "optimizer"):
            continue  # the regions' own time is their ops'
        by_cat[torch_category(event, vocab)] += event.self_cpu_time_total / 1e3 / steps
    return {"wall_ms": wall, "first_loss": first_loss, "threads": torch.get_num_threads(),
            "categories_ms": {c: by_cat[c] for c in CATEGORIES}}


# ---------------------------------------------------------------- report

def print_table(name: str, sides: dict) -> None:
    print(f"\n{name}: ms/step by category (profiled; % of the categories' sum)")
    print(f"  {'category':<12}" + "".join(f"{side:>22}" for side in sides))
    for cat in CATEGORIES:
        cells = []
        for r in sides.values():
            total = sum(r["categories_ms"].values()) or 1.0
            ms = r["categories_ms"][cat]
            cells.append(f"{ms:12.1f} ({100 * ms / total:4.1f}%)")
        print(f"  {cat:<12}" + "".join(f"{c:>22}" for c in cells))
    print(f"  {'sum':<12}" + "".join(f"{sum(r['categories_ms'].values()):12.1f}{'':>10}"
                                     for r in sides.values()))
    print(f"  {'wall (plain)':<12}" + "".join(f"{r['wall_ms']:12.1f}{'':>10}"
                                              for r in sides.values()))
    if "jax" in sides:
        r = sides["jax"]
        print(f"  flaxlm: compile {r['compile_s']} s; pure copies/transposes "
              f"{r['movement_ms']:.1f} ms/step")
        print(f"  {'ms/step':>8} {'per step':>8}  {'category':<10} instruction, output shape")
        for op, shape, cat, count, ms in r["top"]:
            print(f"  {ms:8.2f} {count:8.1f}  {cat:<10} {op} {shape[:70]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--side", default="jax,torch", help="jax, torch or both (jax,torch)")
    ap.add_argument("--steps", type=int, default=0, help="profiled steps (default: 5 tiny, "
                    "1 smollm2-135m)")
    ap.add_argument("--top", type=int, default=15, help="flaxlm instructions to list")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    ap.add_argument("--wall-only", action="store_true",
                    help="only the unprofiled ms/step (compare XLA_FLAGS settings)")
    args = ap.parse_args(argv)
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown or not set(args.side.split(",")) <= {"jax", "torch"}:
        print(f"error: shapes are {', '.join(SHAPES)}; sides jax, torch", file=sys.stderr)
        return 2
    import torch

    from flaxlm.model import ModelConfig

    print(f"CPU: {cpu_model()}; load average {os.getloadavg()}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; torch threads {torch.get_num_threads()}")
    report = {}
    for name in args.shapes.split(","):
        preset, batch, seq_len, _ = SHAPES[name]
        steps = args.steps or (5 if name == "tiny" else 1)
        config = ModelConfig.preset(preset)
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, config.vocab_size, (batch, seq_len + 1)).astype(np.int32)
                   for _ in range(4)]
        hf = hf_model(config)
        sides = {}
        if "jax" in args.side:
            sides["jax"] = jax_profile(config, hf, batches, steps,
                                       -1 if args.wall_only else args.top)
        if "torch" in args.side:
            sides["torch"] = torch_profile(hf, batches, steps, config.vocab_size, args.wall_only)
        if args.wall_only:
            print(f"{name} ({batch} x {seq_len}): " + "; ".join(
                f"{side} {r['wall_ms']:.1f} ms/step (first loss {r['first_loss']:.6f})"
                for side, r in sides.items()))
        else:
            print_table(f"{name} ({batch} x {seq_len})", sides)
        report[name] = sides
    if args.json:
        print(json.dumps({"benchmark": "train_profile", "cpu": cpu_model(),
                          "load_average": os.getloadavg(), "results": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
