"""GRPO (Shao et al. 2024): group-relative advantages from reward functions, no value model.

Each step takes `train.batch_size` prompts, samples `grpo_num_generations` (n)
completions of each with the policy's current weights on the compiled inference
programs (flaxlm.infer.rollout, found through the `flaxlm.rollouts` entry point:
train does not import infer), scores them with the recipe's reward callables
(`module:function`, called as f(prompts, completions) -> one float per completion,
summed with `reward_weights`), and normalizes each prompt's group:

    A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + 1e-4)     (std with Bessel's correction,
                                                           as TRL; equal rewards: A = 0)

The loss per completion token t (TRL's GRPOTrainer with one update per rollout batch,
so the "old" policy is the current one, detached, and the ratio is 1 in value):

    ratio = pi(t) / pi_old(t),  k3 = ref(t) / pi(t) - log(ref(t) / pi(t)) - 1
    loss  = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + beta k3

averaged over each completion's tokens, then over completions. The reference is the
frozen start (for LoRA the base with the adapters off, as DPO's). Metrics: the mean
reward (and each function's), the KL estimate, the policy's entropy, the clip
fraction, and the seconds spent in rollouts and in the update; a held-out
evaluation samples greedily once per held-out prompt with the tuned weights
(`eval_reward`; eval_loss is minus it) and with the reference (`eval_ref_reward`: the
starting model's, for the comparison). A reward function that raises stops the run with an error naming the
function and the first sample it raises on; the last good checkpoint is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import time
from importlib.metadata import entry_points
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from flaxlm.model.errors import ConfigError, FlaxlmError
from flaxlm.model.tokenizer import Tokenizer
from flaxlm.train.data import Batch
from flaxlm.train.dpo import accumulated, reference_of, update
from flaxlm.train.recipe import Recipe
from flaxlm.train.step import LossSum, Steps, TrainState, merge, state_shardings, training_model

ADVANTAGE_EPS = 1e-4


class RewardError(FlaxlmError):
    """A reward function raised or returned something other than one number per sample."""


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """[prompts, n] rewards -> advantages: each group centred and scaled by its std."""
    rewards = np.asarray(rewards, np.float64)
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, ddof=1, keepdims=True)
    return ((rewards - mean) / (std + ADVANTAGE_EPS)).astype(np.float32)


# ---------------------------------------------------------------- rewards

@dataclasses.dataclass(frozen=True)
class RewardFunctions:
    names: tuple[str, ...]
    functions: tuple[Callable, ...]
    weights: tuple[float, ...]

    @classmethod
    def resolve(cls, names: Sequence[str], weights: Sequence[float] = ()) -> RewardFunctions:
        """Import each "module:function"; a ConfigError names one that is not there."""
        functions = []
        for name in names:
            module_name, _, attr = name.partition(":")
            try:
                fn = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"finetune.rewards: cannot import {name!r} ({e})") from e
            if not callable(fn):
                raise ConfigError(f"finetune.rewards: {name!r} is not callable")
            functions.append(fn)
        return cls(tuple(names), tuple(functions), tuple(weights) or (1.0,) * len(names))

    def __call__(self, prompts: list[Any], completions: list[str]
                 ) -> tuple[np.ndarray, dict[str, float]]:
        """(weighted total per sample [N], each function's mean reward)."""
        total = np.zeros(len(completions), np.float64)
        means = {}
        for name, fn, weight in zip(self.names, self.functions, self.weights):
            values = self._call(name, fn, prompts, completions)
            total += weight * values
            means[f"reward/{name.rpartition(':')[2]}"] = float(values.mean())
        return total.astype(np.float32), means

    @staticmethod
    def _call(name: str, fn: Callable, prompts, completions) -> np.ndarray:
        try:
            values = np.asarray(fn(prompts, completions), np.float64)
        except Exception as e:  # find the sample it raises on: call it sample by sample
            index = _first_raising(fn, prompts, completions)
            where = (f"sample {index} (prompt {str(prompts[index])[:80]!r}, completion "
                     f"{completions[index][:80]!r})" if index is not None else "the batch")
            raise RewardError(f"reward function {name} raised on {where}: "
                              f"{type(e).__name__}: {e}") from e
        if values.shape != (len(completions),) or not np.all(np.isfinite(values)):
            raise RewardError(f"reward function {name} returned {values.shape} values (finite: "
                              f"{bool(np.all(np.isfinite(values)))}); expected "
                              f"{len(completions)} finite numbers, one per completion")
        return values


def _first_raising(fn, prompts, completions) -> int | None:
    for i, (p, c) in enumerate(zip(prompts, completions)):
        try:
            fn([p], [c])
        except Exception:
            return i
    return None


# ---------------------------------------------------------------- the update

def _token_logps(graphdef, params, batch: Batch, frozen, key=None):
    """(log-probs of each next token [rows, seq], entropies [rows, seq], mask)."""
    model = training_model(graphdef, params, frozen, key)
    logits = model(batch.tokens[:, :-1], positions=batch.positions[:, :-1],
                   attention_mask=batch.segment_ids[:, :-1])
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(log_probs, batch.tokens[:, 1:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    mask = (batch.loss_mask[:, 1:] != 0) & (batch.segment_ids[:, 1:] != 0)
    return chosen, entropy, mask


def clipped_objective(logps: jax.Array, old_logps: jax.Array, ref_logps: jax.Array,
                      advantages: jax.Array, beta: float, epsilon: float):
    """Per-token (loss, k3 KL, clipped 0/1) from per-token log-probs [rows, seq] of the
    policy, the sampling ("old") policy and the reference, and advantages [rows]."""
    ratio = jnp.exp(logps - old_logps)
    adv = advantages[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - epsilon, 1 + epsilon) * adv)
    kl = jnp.exp(ref_logps - logps) - (ref_logps - logps) - 1.0
    clipped = ((ratio < 1 - epsilon) | (ratio > 1 + epsilon)).astype(jnp.float32)
    return -surrogate + beta * kl, kl, clipped


def grpo_sums(graphdef, params, reference, batch: Batch, advantages: jax.Array, frozen, key,
              beta: float, epsilon: float) -> LossSum:
    """Summed per-completion losses and metrics (count: completions with a token)."""
    logps, entropy, mask = _token_logps(graphdef, params, batch, frozen, key)
    ref, _, _ = _token_logps(graphdef, reference, batch, frozen)
    loss, kl, clipped = clipped_objective(logps, jax.lax.stop_gradient(logps),
                                          jax.lax.stop_gradient(ref), advantages, beta, epsilon)
    tokens = jnp.sum(mask, axis=-1)
    valid = tokens > 0

    def per_row(x):
        return jnp.sum(jnp.where(mask, x, 0.0), axis=-1) / jnp.maximum(tokens, 1)

    def total(x):
        return jnp.sum(jnp.where(valid, per_row(x), 0.0))

    return LossSum(total=total(loss), count=jnp.sum(valid, dtype=jnp.float32),
                   extra={"kl": total(kl), "entropy": total(entropy),
                          "clip_fraction": total(clipped)})


def grpo_update(state: TrainState, batch: Batch, advantages: jax.Array, frozen, reference, *,
                graphdef, optimizer: optax.GradientTransformation, beta: float, epsilon: float):
    """One optimizer update from completions [1, rows, seq_len + 1] and advantages [1, rows]."""
    rng, key = jax.random.split(state.rng)

    def sums_fn(params, micro, micro_key):
        rows, adv = micro
        return grpo_sums(graphdef, params, reference, rows, adv, frozen, micro_key, beta,
                         epsilon)

    sums, grads = accumulated(sums_fn, state.params, (batch, advantages), key)
    return update(state, sums, grads, optimizer, rng)


# ---------------------------------------------------------------- prompts and data

@dataclasses.dataclass(frozen=True)
class Prompt:
    text: Any            # what reward functions receive: the prompt string or the messages
    ids: tuple[int, ...]  # rendered with the chat template's generation prompt


def grpo_prompts(recipe: Recipe, tokenizer: Tokenizer) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts): the arithmetic task's splits, or JSONL
    records {"prompt": str} / {"messages": [...]} split by data.eval_fraction."""
    ft, cfg = recipe.finetune, recipe.data
    if not cfg.files:
        from flaxlm.model.arithmetic import arithmetic_problems

        held_out = recipe.log.eval_batches * recipe.train.micro_batch
        texts = [[p.prompt for p in arithmetic_problems(
            split, count, seed=cfg.seed, max_operand=ft.arithmetic_max_operand,
            operations=ft.arithmetic_operations)]
            for split, count in (("train", ft.arithmetic_train), ("test", held_out))]
    else:
        from flaxlm.model.sources import find_files
        from flaxlm.train.data import split_documents
        from flaxlm.train.preference import read_prompts

        records = read_prompts(find_files(cfg.files))
        split = split_documents(len(records), cfg.eval_fraction, cfg.seed)
        texts = [[records[i] for i in split.train], [records[i] for i in split.eval]]
    return tuple([_prompt(t, tokenizer) for t in group] for group in texts)


def _prompt(text, tokenizer: Tokenizer) -> Prompt:
    messages = [{"role": "user", "content": text}] if isinstance(text, str) else list(text)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return Prompt(text, tuple(tokenizer.encode(rendered, add_special_tokens=False)))


def grpo_data(recipe: Recipe, prompts: tuple[list[Prompt], list[Prompt]]):
    """(endless batches of train.batch_size prompt indices [batch], held-out index batches)."""
    import grain

    train, held_out = prompts
    if len(train) < recipe.train.batch_size:
        raise ConfigError(f"{len(train)} training prompts, fewer than train.batch_size "
                          f"({recipe.train.batch_size})")
    dataset = (grain.MapDataset.range(len(train)).shuffle(seed=recipe.data.seed).repeat()
               .to_iter_dataset().batch(recipe.train.batch_size, drop_remainder=True)
               .map(lambda i: np.asarray(i, np.int32)))
    size = recipe.train.micro_batch
    batches = [np.arange(s, min(s + size, len(held_out)), dtype=np.int32)
               for s in range(0, len(held_out), size)][:recipe.log.eval_batches]
    return dataset, batches


# ---------------------------------------------------------------- the steps

class GrpoSteps:
    """`Steps` of GRPO: train(state, prompt indices) rolls out, scores and updates;
    eval(params, prompt indices) samples greedily and scores."""

    def __init__(self, recipe: Recipe, graphdef, params, frozen, optimizer, target, mesh,
                 tokenizer: Tokenizer, prompts: tuple[list[Prompt], list[Prompt]]):
        ft = recipe.finetune
        self.recipe, self.graphdef, self.frozen, self.tokenizer = recipe, graphdef, frozen, tokenizer
        self.train_prompts, self.eval_prompts = prompts
        self.rewards = RewardFunctions.resolve(ft.rewards, ft.reward_weights)
        self.rollouts = _rollout_engine()(merge(graphdef, params, frozen), tokenizer)
        self.reference = reference_of(params, ft.method)
        shardings = state_shardings(target, optimizer, mesh, recipe.train.sharding_rules)
        self._update = jax.jit(functools.partial(
            grpo_update, graphdef=graphdef, optimizer=optimizer, beta=ft.grpo_beta,
            epsilon=ft.grpo_epsilon), donate_argnums=0)
        replicated = NamedSharding(mesh, P())
        self.steps = Steps(train=self.train, eval=self.evaluate, state_sharding=shardings,
                           train_batch_sharding=replicated, eval_batch_sharding=replicated)
        self._reference_rewards: dict[tuple[int, ...], float] = {}

    def _sample(self, params, prompts: list[Prompt], *, n: int, temperature: float, seed: int):
        self.rollouts.set_weights(nnx.split(merge(self.graphdef, params, self.frozen))[1])
        samples = self.rollouts.sample([list(p.ids) for p in prompts], n=n, temperature=temperature,
                                       max_new_tokens=self.recipe.finetune.rollout_max_new_tokens,
                                       seed=seed)
        texts = [prompts[s.prompt].text for s in samples]
        rewards, means = self.rewards(texts, [s.text for s in samples])
        return samples, rewards, means

    def train(self, state: TrainState, indices) -> tuple[TrainState, Any]:
        ft, step = self.recipe.finetune, int(state.step)
        prompts = [self.train_prompts[i] for i in np.asarray(jax.device_get(indices)).ravel()]
        start = time.perf_counter()
        seed = (self.recipe.train.seed * 1_000_003 + step * len(prompts)) % 2**31
        samples, rewards, means = self._sample(state.params, prompts, n=ft.grpo_num_generations,
                                               temperature=ft.rollout_temperature, seed=seed)
        advantages = group_advantages(rewards.reshape(len(prompts), -1)).reshape(1, -1)
        batch, truncated = self._rows(prompts, samples)
        rollout_s = time.perf_counter() - start
        state, metrics = self._update(state, batch, jnp.asarray(advantages), self.frozen,
                                      self.reference)
        jax.block_until_ready(metrics.loss)
        extra = {**metrics.extra, "reward": float(rewards.mean()), **means,
                 "truncated": truncated,
                 "rollout_s": rollout_s, "train_s": time.perf_counter() - start - rollout_s}
        return state, metrics.replace(extra=extra)

    def evaluate(self, params, indices) -> LossSum:
        """Greedy rewards of the held-out prompts, for `params` and (once per batch, then
        remembered) for the reference: the starting model's, `eval_ref_reward`."""
        index = tuple(int(i) for i in np.asarray(jax.device_get(indices)).ravel())
        prompts = [self.eval_prompts[i] for i in index]
        _, rewards, _ = self._sample(params, prompts, n=1, temperature=0.0, seed=0)
        if index not in self._reference_rewards:
            _, start, _ = self._sample(self.reference, prompts, n=1, temperature=0.0, seed=0)
            self._reference_rewards[index] = float(start.sum())
        return LossSum(total=-float(rewards.sum()), count=float(len(rewards)),
                       extra={"reward": float(rewards.sum()),
                              "ref_reward": self._reference_rewards[index]})

    def _rows(self, prompts: list[Prompt], samples) -> tuple[Batch, int]:
        """Prompt + completion rows [1, rows, seq_len + 1] (the completion is trained), and
        how many were cut to data.seq_len + 1 tokens (logged as `truncated`)."""
        width = self.recipe.data.seq_len + 1
        tokens = np.zeros((len(samples), width), np.int32)
        loss_mask = np.zeros_like(tokens)
        segments = np.zeros_like(tokens)
        truncated = 0
        for row, s in enumerate(samples):
            prompt = list(prompts[s.prompt].ids)
            ids = (prompt + s.token_ids)[:width]
            truncated += len(prompt) + len(s.token_ids) > width
            tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
            loss_mask[row, len(prompt):len(ids)] = 1
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape).copy()
        batch = Batch(tokens=tokens, segment_ids=segments, positions=positions,
                      loss_mask=loss_mask)
        return jax.tree.map(lambda x: jnp.asarray(x[None]), batch), truncated


def _rollout_engine():
    """The compiled sampler registered under the `flaxlm.rollouts` entry point."""
    found = entry_points(group="flaxlm.rollouts", name="compiled")
    if not found:
        raise ConfigError("no rollout engine: flaxlm.infer is not installed (entry point "
                          "flaxlm.rollouts:compiled); reinstall flaxlm")
    return next(iter(found)).load()
