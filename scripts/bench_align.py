"""GRPO benchmark: rollout tokens/s on the compiled sampler vs `LLM.generate` on the same batch,
and the split of a GRPO iteration into rollout, reference scoring and update.

The GRPO run is the recipe's (default configs/finetune/smollm2-lora-grpo-arithmetic.toml:
SmolLM2-135M-Instruct, LoRA, arithmetic prompts), prepared by flaxlm.train.finetune. The
same prompts (train.batch_size of them, grpo_num_generations samples each, the recipe's
rollout settings) are generated in alternating rounds by the GRPO rollout engine (the
policy's current weights handed to flaxlm.infer's compiled programs) and by
`LLM.generate` (the same model, merged into one LLM); the median round's generated
tokens/s are compared (target: rollout >= 0.9x LLM.generate). Then whole GRPO steps are
timed: rollout (sampling + rewards) and update (the compiled step: policy forward and
backward with the reference forward inside), and separately a compiled reference-only
forward on the same rows (the part of the update that scores the reference).

    .venv/bin/python scripts/bench_align.py [--config FILE] [--set key=value ...]
        [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from benchlib import cpu_model


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> None:
    from flaxlm.infer import LLM, SamplingParams
    from flaxlm.train.finetune import prepare_finetune
    from flaxlm.train.grpo import _token_logps
    from flaxlm.train.recipe import Recipe

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/finetune/smollm2-lora-grpo-arithmetic.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)

    recipe = Recipe.load(args.config, tuple(args.overrides) + ("log.progress=false",))
    ft = recipe.finetune
    with tempfile.TemporaryDirectory() as run_dir:
        run, _ = prepare_finetune(recipe, run_dir)
        grpo = run.steps.train.__self__
        prompts = grpo.train_prompts[:recipe.train.batch_size]
        ids = [list(q.ids) for q in prompts]
        n = ft.grpo_num_generations
        llm = LLM(_merged(grpo, run.state.params), grpo.tokenizer)
        params = SamplingParams(n=n, max_new_tokens=ft.rollout_max_new_tokens,
                                temperature=ft.rollout_temperature, seed=0)

        def rollout() -> int:
            grpo.rollouts.set_weights(_weights(grpo, run.state.params))
            samples = grpo.rollouts.sample(ids, n=n, max_new_tokens=ft.rollout_max_new_tokens,
                                           temperature=ft.rollout_temperature, seed=0)
            return sum(len(s.token_ids) for s in samples)

        def generate() -> int:
            results = llm.generate(ids, params)
            return sum(len(o.token_ids) for r in results for o in r.outputs)

        rates = {"rollout": [], "LLM.generate": []}
        for fn in (rollout, generate):
            fn()  # compiles
        for _ in range(args.rounds):
            for name, fn in (("rollout", rollout), ("LLM.generate", generate)):
                start = time.perf_counter()
                tokens = fn()
                rates[name].append(tokens / (time.perf_counter() - start))
        medians = {k: statistics.median(v) for k, v in rates.items()}

        state, splits = run.state, {"rollout_s": [], "train_s": [], "reference_s": []}
        reference = jax.jit(lambda rows: _token_logps(grpo.graphdef, grpo.reference, rows,
                                                      grpo.frozen)[0])
        for step in range(args.steps + 1):
            indices = np.arange(recipe.train.batch_size, dtype=np.int32)
            state, metrics = run.steps.train(state, indices)
            grpo.rollouts.set_weights(_weights(grpo, state.params))  # the old ones were donated
            samples = grpo.rollouts.sample(ids, n=n, max_new_tokens=ft.rollout_max_new_tokens,
                                           temperature=ft.rollout_temperature, seed=step)
            rows = jax.tree.map(lambda x: x[0], grpo._rows(prompts, samples)[0])
            start = time.perf_counter()
            jax.block_until_ready(reference(rows))
            if step:  # the first step compiles
                splits["reference_s"].append(time.perf_counter() - start)
                for key in ("rollout_s", "train_s"):
                    splits[key].append(float(metrics.extra[key]))
        run.train_iterator.close()
        run.checkpoints.close()

    print(f"CPU: {cpu_model()}, {jax.device_count()} device(s) {jax.devices()[0].platform}")
    print(f"batch: {len(ids)} prompts x {n} samples, up to {ft.rollout_max_new_tokens} new "
          f"tokens, temperature {ft.rollout_temperature}; median of {args.rounds} rounds")
    for name, value in medians.items():
        print(f"  {name:14s} {value:10.1f} generated tokens/s")
    print(f"  rollout / LLM.generate: {medians['rollout'] / medians['LLM.generate']:.2f}x")
    print(f"GRPO step (median of {args.steps}): "
          + ", ".join(f"{k.removesuffix('_s')} {statistics.median(v):.3f} s"
                      for k, v in splits.items())
          + " (reference scoring runs inside the update program; timed alone here)")


def _weights(grpo, params):
    from flax import nnx

    from flaxlm.train.step import merge

    return nnx.split(merge(grpo.graphdef, params, grpo.frozen))[1]


def _merged(grpo, params):
    from flaxlm.train.step import merge

    return merge(grpo.graphdef, params, grpo.frozen)


if __name__ == "__main__":
    main()
