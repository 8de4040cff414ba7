"""Training-step benchmark: flaxlm (JAX) vs a plain PyTorch step of the same HF model.

For each shape (the tiny recipe; SmolLM2-135M with short sequences on a CPU) both
sides start from the same float32 weights and train on the same random token
batches: forward, causal-LM cross-entropy, backward, global-norm clipping and an
AdamW update (optax / torch.optim.AdamW). The first step's losses are compared
(they must agree), then rounds of timed steps alternate between the two sides,
and the median round is reported. Prints progress lines and one final JSON line
with tokens/s, MFU (flaxlm.train.metrics) and `jax_vs_torch_ratio` (the geometric
mean over shapes of JAX tokens/s / PyTorch tokens/s).

    .venv/bin/python scripts/bench_train.py [--shapes tiny,smollm2-135m] [--steps N] [--rounds 3]

With `--mesh LAYOUT` (repeatable) it instead times flaxlm's train step for the
tiny shape on each mesh layout over 8 CPU devices (forced with XLA_FLAGS): a
sanity check of sharding overhead, not a speed measurement.

    .venv/bin/python scripts/bench_train.py --mesh data=8 --mesh fsdp=8 \
        --mesh data=4,tensor=2 --mesh data=2,fsdp=2,tensor=2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import numpy as np

from benchlib import cpu_model

SHAPES = {  # name: (model preset, batch, sequence length, timed steps per round)
    "tiny": ("tiny-llama", 16, 256, 20),
    "smollm2-135m": ("smollm2-135m", 4, 128, 2),
}


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def hf_model(config):
    import torch
    import transformers

    from flaxlm.model.hf_export import config_to_hf

    hf_config = transformers.LlamaConfig(**config_to_hf(config))
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(hf_config).float().train()


def jax_state(config, hf, lr):
    """(graphdef, train state, optimizer): flaxlm's model on hf's weights with the
    benchmark's AdamW (weight decay 0.1, clipping 1.0, no warmup)."""
    from flaxlm.model.hf_weights import params_from_hf
    from flaxlm.model.params import build_model
    from flaxlm.train.optim import optimizer
    from flaxlm.train.recipe import OptimizerConfig
    from flaxlm.train.step import new_state

    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    model = build_model(config, params_from_hf(config, tensors, "hf"), "hf")
    opt = optimizer(OptimizerConfig(lr=lr, warmup_steps=0, weight_decay=0.1), 10**6)
    graphdef, state = new_state(model, opt, seed=0)
    return graphdef, state, opt


def device_batch(rows, sharding):
    """One micro-batch of whole rows [batch, seq_len + 1] as a train batch [1, batch, ...]."""
    from flaxlm.train.data import Batch
    from flaxlm.train.step import put_batch

    positions = np.broadcast_to(np.arange(rows.shape[1], dtype=np.int32), rows.shape)
    batch = Batch(tokens=rows[None], segment_ids=np.ones_like(rows)[None],
                  positions=positions[None])
    return put_batch(batch, sharding)


def jax_side(config, hf, batches, lr, mesh: str = "data=1"):
    """A `run(n, start) -> last loss` for flaxlm's compiled train step on hf's weights."""
    import jax

    from flaxlm.model.sharding import make_mesh
    from flaxlm.train.step import compile_steps

    graphdef, state, opt = jax_state(config, hf, lr)
    devices = jax.devices()[:1] if mesh == "data=1" else jax.devices()
    steps = compile_steps(graphdef, opt, state, make_mesh(mesh, devices))
    state = jax.device_put(state, steps.state_sharding)
    device_batches = [device_batch(rows, steps.train_batch_sharding) for rows in batches]

    def run(n: int, start: int = 0) -> float:
        nonlocal state
        metrics = None
        for i in range(n):
            state, metrics = steps.train(state, device_batches[(start + i) % len(device_batches)])
        return float(metrics.loss)

    return run


def torch_side(hf, batches, lr):
    import torch

    params = dict(hf.named_parameters())
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    tensors = [torch.as_tensor(b.astype(np.int64)) for b in batches]
    phase = torch.profiler.record_function

    def run(n: int, start: int = 0) -> float:
        loss = None
        for i in range(n):
            ids = tensors[(start + i) % len(tensors)]
            with phase("forward"):  # named regions for scripts/profile_train.py
                logits = hf(input_ids=ids[:, :-1]).logits
            with phase("loss"):
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
            with phase("backward"):
                loss.backward()
            with phase("clip"):
                torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            with phase("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
        return loss.item()

    return run


def bench_shape(name: str, steps: int, rounds: int) -> dict:
    import copy

    import jax

    from flaxlm.model import ModelConfig
    from flaxlm.train.metrics import flops_per_token, peak_flops

    preset, batch, seq_len, default_steps = SHAPES[name]
    steps = steps or default_steps
    config = ModelConfig.preset(preset)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, config.vocab_size, (batch, seq_len + 1)).astype(np.int32)
               for _ in range(4)]
    hf = hf_model(config)
    num_params = sum(p.numel() for p in hf.parameters())
    jax_run = jax_side(config, hf, batches, lr=1e-4)
    torch_run = torch_side(copy.deepcopy(hf), batches, lr=1e-4)
    t = time.perf_counter()
    jax_loss = jax_run(1)
    log(f"{name}: jax first step (compile) {time.perf_counter() - t:.1f} s, loss {jax_loss:.5f}")
    torch_loss = torch_run(1)
    log(f"{name}: torch first step loss {torch_loss:.5f}")
    tokens = batch * seq_len * steps
    times = {"jax": [], "torch": []}
    for r in range(rounds):
        for side, run in (("jax", jax_run), ("torch", torch_run)):
            t = time.perf_counter()
            run(steps, start=1 + r * steps)
            times[side].append(time.perf_counter() - t)
        log(f"{name} round {r}: jax {tokens / times['jax'][-1]:,.0f} tok/s, "
            f"torch {tokens / times['torch'][-1]:,.0f} tok/s")
    fpt = flops_per_token(config, num_params, seq_len)
    peak = peak_flops(jax.devices()[0])
    out = {"shape": name, "batch": batch, "seq_len": seq_len, "params": num_params,
           "steps_per_round": steps, "rounds": rounds,
           "flops_per_token": fpt, "first_loss_jax": jax_loss, "first_loss_torch": torch_loss}
    for side in ("jax", "torch"):
        tps = tokens / statistics.median(times[side])
        out[f"{side}_tokens_per_s"] = round(tps, 1)
        out[f"{side}_mfu"] = round(fpt * tps / peak, 4)
    out["ratio"] = round(out["jax_tokens_per_s"] / out["torch_tokens_per_s"], 3)
    return out


def bench_layouts(layouts: list[str], steps: int, rounds: int) -> list[dict]:
    """Per-step time of the tiny shape's train step on each mesh layout."""
    from flaxlm.model import ModelConfig

    preset, batch, seq_len, default_steps = SHAPES["tiny"]
    config = ModelConfig.preset(preset)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, config.vocab_size, (batch, seq_len + 1)).astype(np.int32)
               for _ in range(4)]
    hf = hf_model(config)
    results = []
    for layout in ["data=1"] + layouts:
        run = jax_side(config, hf, batches, lr=1e-4, mesh=layout)
        loss = run(1)
        times = []
        for r in range(rounds):
            t = time.perf_counter()
            run(steps or default_steps, start=1 + r)
            times.append((time.perf_counter() - t) / (steps or default_steps))
        step_s = statistics.median(times)
        log(f"mesh {layout}: {step_s * 1e3:.1f} ms/step, first loss {loss:.5f}")
        results.append({"mesh": layout, "step_s": round(step_s, 5), "first_loss": loss})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--steps", type=int, default=0,
                        help="timed steps per round (default: 20 tiny, 2 smollm2-135m)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mesh", action="append", default=[],
                        help="time the tiny train step on this mesh layout (8 CPU devices)")
    args = parser.parse_args()
    if args.mesh:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8")
        results = bench_layouts(args.mesh, args.steps, args.rounds)
        print(json.dumps({"benchmark": "train_step_layouts", "load_average": os.getloadavg(),
                          "results": results}))
        return
    import jax
    import torch

    from flaxlm.train.metrics import cpu_peak, peak_flops

    log(f"CPU: {cpu_model()}; peak for MFU: {cpu_peak().describe()}")
    log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads; load average {os.getloadavg()}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    results = [bench_shape(name, args.steps, args.rounds) for name in args.shapes.split(",")]
    for r in results:
        log(json.dumps(r))
    ratio = math.exp(statistics.mean(math.log(r["ratio"]) for r in results))
    print(json.dumps({
        "benchmark": "train_step", "cpu": cpu_model(), "machine": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "peak_flops": peak_flops(jax.devices()[0]), "cpu_peak": cpu_peak().describe(),
        "results": results, "jax_vs_torch_ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
