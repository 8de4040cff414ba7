"""Fine-tuning step benchmark: flaxlm LoRA and full fine-tuning, and HF PEFT + PyTorch LoRA.

All three train the same model (SmolLM2-135M-Instruct from the embedded GGUF, float32,
or a preset's shapes with random weights) on the same random token batches: forward,
masked causal-LM cross-entropy, backward, AdamW. LoRA is rank R on the q, k, v, o, gate,
up and down projections on both sides (PEFT's `target_modules`). The first step's losses
are compared (they must agree), then rounds of timed steps alternate between the sides
(fair under a changing machine load) and the median round is reported: seconds per step,
tokens/s, and the ratio flaxlm LoRA / PEFT LoRA tokens/s. Peak memory is measured
separately, one child process per side (2 steps each): the peak resident set size
(`ru_maxrss`) on a CPU, the device allocator's peak on a GPU.

    .venv/bin/python scripts/bench_finetune.py [--batch 4] [--seq-len 256] [--rank 8]
        [--steps 3] [--rounds 3] [--preset smollm2-1.7b] [--sides flaxlm-lora,flaxlm-full,peft-lora]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

SIDES = ("flaxlm-lora", "flaxlm-full", "peft-lora")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR = 1e-4


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def vocab_of(preset: str | None) -> int:
    from flaxlm.model import ModelConfig

    return ModelConfig.preset(preset or "smollm2-135m").vocab_size


def batches(vocab: int, batch: int, seq_len: int, count: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32) for _ in range(count)]


def flaxlm_model(preset: str | None):
    """The embedded SmolLM2, or the preset's shapes with hf_model(preset)'s random weights."""
    from flaxlm.model import ModelConfig, build_model, load
    from flaxlm.model.hf_weights import params_from_hf

    if preset is None:
        return load("smollm2-135m-instruct")[0]
    config = ModelConfig.preset(preset).replace(dtype="float32", param_dtype="float32",
                                                remat="none")
    tensors = {k: v.detach().numpy() for k, v in hf_model(preset).state_dict().items()}
    return build_model(config, params_from_hf(config, tensors, preset), preset)


def flaxlm_side(method: str, rank: int, rows: list[np.ndarray], preset: str | None):
    """`run(n, start) -> last loss` for flaxlm's compiled train step (method lora or full)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flaxlm.model.lora import LoraConfig, apply_lora, lora_filter
    from flaxlm.model.sharding import make_mesh
    from flaxlm.train.data import Batch
    from flaxlm.train.optim import optimizer
    from flaxlm.train.recipe import OptimizerConfig
    from flaxlm.train.step import TrainState, compile_steps, put_batch

    model = flaxlm_model(preset)
    trainable = nnx.Param
    if method == "lora":
        apply_lora(model, LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS),
                   nnx.Rngs(0))
        trainable = lora_filter
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    opt = optimizer(OptimizerConfig(lr=LR, warmup_steps=0, weight_decay=0.0, b2=0.999,
                                    clip_norm=0.0), 10**6)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                       rng=jax.random.PRNGKey(0))
    steps = compile_steps(graphdef, opt, jax.eval_shape(lambda s: s, state),
                          make_mesh("data=1", jax.devices()[:1]), frozen=frozen)
    state = jax.device_put(state, steps.state_sharding)

    def device_batch(tokens):
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
        batch = Batch(tokens=tokens[None], segment_ids=np.ones_like(tokens)[None],
                      positions=positions[None].copy(), loss_mask=np.ones_like(tokens)[None])
        return put_batch(batch, steps.train_batch_sharding)

    device_batches = [device_batch(r) for r in rows]

    def run(n: int, start: int = 0) -> float:
        nonlocal state
        metrics = None
        for i in range(n):
            state, metrics = steps.train(state, device_batches[(start + i) % len(device_batches)])
        return float(metrics.loss)

    count = sum(x.size for x in jax.tree.leaves(params))
    return run, count


def hf_model(preset: str | None):
    import torch
    import transformers

    if preset is None:
        from flaxlm.model.embedded import smollm2_gguf_path

        path = smollm2_gguf_path()
        return transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32)
    from flaxlm.model import ModelConfig
    from flaxlm.model.hf_export import config_to_hf

    config = ModelConfig.preset(preset)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(config)))


def peft_side(rank: int, rows: list[np.ndarray], preset: str | None):
    """`run(n, start) -> last loss` for HF PEFT LoRA + torch.optim.AdamW."""
    import peft
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = peft.get_peft_model(hf_model(preset), peft.LoraConfig(
        task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
        target_modules=list(TARGETS))).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    tensors = [torch.as_tensor(r.astype(np.int64), device=device) for r in rows]

    def run(n: int, start: int = 0) -> float:
        loss = None
        for i in range(n):
            ids = tensors[(start + i) % len(tensors)]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    return run, sum(p.numel() for p in trainable)


def make_side(name: str, args, rows):
    if name == "peft-lora":
        return peft_side(args.rank, rows, args.preset)
    return flaxlm_side(name.removeprefix("flaxlm-"), args.rank, rows, args.preset)


def peak_memory_child(name: str, args) -> None:
    """Run 2 steps of one side and print its peak memory as JSON (a child process)."""
    run, _ = make_side(name, args, batches(vocab_of(args.preset), args.batch, args.seq_len, 2))
    run(2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    device = None
    try:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        device = stats.get("peak_bytes_in_use")
    except Exception:  # no device statistics on this backend
        pass
    if name == "peft-lora":
        import torch

        device = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(json.dumps({"side": name, "peak_rss_bytes": peak, "peak_device_bytes": device}))


def peak_memory(names: list[str], args) -> dict[str, dict]:
    """Each side's peak memory, from one child process per side (run side by side: a
    process's peak does not depend on the others; set JAX_COMPILATION_CACHE_DIR to let
    the timed run reuse the children's compiled programs)."""
    children = {}
    for name in names:
        argv = [sys.executable, __file__, "--memory-of", name, "--batch", str(args.batch),
                "--seq-len", str(args.seq_len), "--rank", str(args.rank)]
        if args.preset:
            argv += ["--preset", args.preset]
        children[name] = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out = {}
    for name, child in children.items():
        stdout, _ = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"the peak-memory run of {name} failed")
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--preset", help="random weights of this preset's shapes (e.g. smollm2-1.7b) "
                                    "instead of the embedded SmolLM2-135M-Instruct")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--memory-of", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_of:
        return peak_memory_child(args.memory_of, args)
    names = [s for s in args.sides.split(",") if s]
    memory = {} if args.no_memory else peak_memory(names, args)
    rows = batches(vocab_of(args.preset), args.batch, args.seq_len)
    sides, trainable, first = {}, {}, {}
    for name in names:
        start = time.perf_counter()
        sides[name], trainable[name] = make_side(name, args, rows)
        first[name] = sides[name](1)  # compiles (JAX) / warms up
        log(f"{name}: {trainable[name]:,} trainable parameters, first step loss "
            f"{first[name]:.4f} ({time.perf_counter() - start:.1f} s with set-up)")
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            start = time.perf_counter()
            sides[name](args.steps, start=1 + r * args.steps)
            times[name].append((time.perf_counter() - start) / args.steps)
        log(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s/step" for n in names))
    tokens = args.batch * args.seq_len
    results = {n: {"s_per_step": statistics.median(times[n]),
                   "tokens_per_s": tokens / statistics.median(times[n]),
                   "trainable_params": trainable[n], "first_loss": first[n], **memory.get(n, {})}
               for n in names}
    summary = {"benchmark": "finetune_step", "cpu": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
               "model": args.preset or "smollm2-135m-instruct", "batch": args.batch,
               "seq_len": args.seq_len, "rank": args.rank, "results": results}
    if "flaxlm-lora" in results and "peft-lora" in results:
        summary["lora_flaxlm_vs_peft"] = (results["flaxlm-lora"]["tokens_per_s"]
                                          / results["peft-lora"]["tokens_per_s"])
    if "flaxlm-lora" in results and "flaxlm-full" in results:
        summary["lora_vs_full"] = (results["flaxlm-lora"]["tokens_per_s"]
                                   / results["flaxlm-full"]["tokens_per_s"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
