"""PPO for language models (RLHF as InstructGPT; the losses as TRL's PPOTrainer).

Each step samples one completion per prompt with the policy's current weights (the
compiled sampler, as GRPO: flaxlm.train.grpo), scores it with the `rewards` callables
or a trained reward model (`ppo_reward_model`, flaxlm.model.reward; a directory without
a score head is refused before anything compiles), and builds per-token rewards: the score at the completion's last token, minus
`ppo_kl_coef` * (log pi_old - log ref) at every completion token. A value head (a
vector [embed] on the policy's final hidden states, trained with it) gives V; GAE
(`ppo_gamma`, `ppo_lam`) gives advantages (whitened over the batch's tokens) and
returns. Then `ppo_epochs` passes, each over `ppo_minibatches` shuffled minibatches,
minimise

    pg = mean max(-A ratio, -A clip(ratio, 1 - c, 1 + c))
    vf = 0.5 mean max((V - R)^2, (V_old + clip(V - V_old, -cv, cv) - R)^2)
    loss = pg + ppo_vf_coef * vf

all inside one compiled program (one loop step = epochs x minibatches optimizer
updates; optimizer.decay_steps counts updates). The reference is the frozen start
(LoRA: the base with adapters off).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxlm.model.errors import ConfigError
from flaxlm.train.data import Batch
from flaxlm.train.grpo import GrpoSteps
from flaxlm.train.step import StepMetrics, TrainState, training_model


class ValueParam(nnx.Param):
    """The value head's weight: trains with any fine-tuning method."""


class ValueHead(nnx.Module):
    def __init__(self, embed_dim: int, rngs: nnx.Rngs):
        self.kernel = ValueParam(jax.random.normal(rngs.params(), (embed_dim,), jnp.float32)
                                 * 0.01, logical_axes=("embed",))


def add_value_head(model: nnx.Module, rngs: nnx.Rngs) -> None:
    model.value_head = nnx.data(ValueHead(model.config.embed_dim, rngs))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """Advantages and returns [rows, T] of per-token rewards and values; masked-out
    positions (after the completion) count as the end (value 0, advantage 0)."""
    m = mask.astype(jnp.float32)

    def back(carry, t):
        next_value, next_adv = carry
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m[:, t]
        return (values[:, t] * m[:, t], adv), adv

    steps = rewards.shape[1]
    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, advs = jax.lax.scan(back, (zeros, zeros), jnp.arange(steps - 1, -1, -1))
    advantages = advs[::-1].T
    return advantages, (advantages + values) * m


def ppo_losses(logps, old_logps, values, old_values, advantages, returns, mask, *,
               cliprange: float, cliprange_value: float):
    """(policy loss, value loss, clip fraction): TRL's clipped surrogate and value loss."""
    ratio = jnp.exp(logps - old_logps)
    pg = jnp.maximum(-advantages * ratio,
                     -advantages * jnp.clip(ratio, 1 - cliprange, 1 + cliprange))
    clipped_values = old_values + jnp.clip(values - old_values, -cliprange_value, cliprange_value)
    vf = 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(clipped_values - returns))
    clipfrac = (jnp.abs(ratio - 1.0) > cliprange).astype(jnp.float32)
    return masked_mean(pg, mask), masked_mean(vf, mask), masked_mean(clipfrac, mask)


def forward(graphdef, params, rows: Batch, frozen, key=None):
    """(log-prob of each next token, value before it, entropy, completion mask) [B, T]."""
    model = training_model(graphdef, params, frozen, key)
    hidden, _ = model.hidden(rows.tokens[:, :-1], rows.positions[:, :-1],
                             attention_mask=rows.segment_ids[:, :-1])
    log_probs = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32), axis=-1)
    logps = jnp.take_along_axis(log_probs, rows.tokens[:, 1:, None], axis=-1)[..., 0]
    values = hidden.astype(jnp.float32) @ model.value_head.kernel[...]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    mask = (rows.loss_mask[:, 1:] != 0) & (rows.segment_ids[:, 1:] != 0)
    return logps, values, entropy, mask


def prepare(params, reference, rows: Batch, scores, frozen, *, graphdef, kl_coef, gamma, lam):
    """Old log-probs and values, and the whitened advantages and returns of a rollout."""
    logps, values, _, mask = forward(graphdef, params, rows, frozen)
    ref, _, _, _ = forward(graphdef, reference, rows, frozen)
    kl = jnp.where(mask, logps - ref, 0.0)
    last = jnp.maximum(jnp.sum(rows.segment_ids[:, 1:] != 0, axis=1) - 1, 0)
    rewards = -kl_coef * kl + jax.nn.one_hot(last, mask.shape[1]) * scores[:, None]
    advantages, returns = gae(rewards, jnp.where(mask, values, 0.0), mask, gamma, lam)
    mean = masked_mean(advantages, mask)
    std = jnp.sqrt(masked_mean(jnp.square(advantages - mean), mask))
    advantages = jnp.where(mask, (advantages - mean) / (std + 1e-8), 0.0)
    return logps, values, advantages, returns, jnp.sum(kl, axis=1).mean()


def ppo_update(state: TrainState, rows: Batch, old_logps, old_values, advantages, returns,
               frozen, *, graphdef, optimizer, epochs: int, minibatches: int, cliprange: float,
               cliprange_value: float, vf_coef: float) -> tuple[TrainState, StepMetrics]:
    """epochs x minibatches optimizer updates on one rollout batch [B, ...]."""
    data = (rows, old_logps, old_values, advantages, returns)
    size = old_logps.shape[0] // minibatches

    def loss_fn(params, mb, key):
        rows, old_lp, old_v, adv, ret = mb
        logps, values, entropy, mask = forward(graphdef, params, rows, frozen, key)
        pg, vf, clipfrac = ppo_losses(logps, old_lp, values, old_v, adv, ret, mask,
                                      cliprange=cliprange, cliprange_value=cliprange_value)
        return pg + vf_coef * vf, (pg, vf, clipfrac, masked_mean(entropy, mask))

    def one_update(carry, mb_key):
        params, opt_state = carry
        mb, key = mb_key
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, optax.tree.norm(grads),
                                                                   *aux)

    def one_epoch(carry, key):
        order_key, drop_key = jax.random.split(key)
        order = jax.random.permutation(order_key, old_logps.shape[0])
        shuffled = jax.tree.map(lambda x: x[order].reshape(minibatches, size, *x.shape[1:]),
                                data)
        return jax.lax.scan(one_update, carry, (shuffled, jax.random.split(drop_key, minibatches)))

    rng, key = jax.random.split(state.rng)
    (params, opt_state), out = jax.lax.scan(one_epoch, (state.params, state.opt_state),
                                            jax.random.split(key, epochs))
    loss, grad_norm, pg, vf, clipfrac, entropy = (x.mean() for x in out)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new, StepMetrics(loss=loss, grad_norm=grad_norm, param_norm=optax.tree.norm(params),
                            tokens=jnp.sum(rows.loss_mask), router_loss=jnp.zeros(()),
                            extra={"pg_loss": pg, "vf_loss": vf, "clip_fraction": clipfrac,
                                   "entropy": entropy})


class RewardModelScore:
    """PPO's reward from a trained reward model: the chat (prompt, then the completion as
    the assistant's turn) rendered with the reward model's own template and tokenizer, as
    its training rendered pairs; the same interface as flaxlm.train.grpo.RewardFunctions."""

    def __init__(self, path: str):
        from flaxlm.model.reward import load_reward_model

        self.model, self.tokenizer = load_reward_model(path)
        if self.tokenizer is None:
            raise ConfigError(f"finetune.ppo_reward_model {path}: no tokenizer.json")

    def __call__(self, prompts, completions):
        from flaxlm.model.reward import score_texts

        chats = [[*([{"role": "user", "content": p}] if isinstance(p, str) else p),
                  {"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
        scores = score_texts(self.model, self.tokenizer, chats).astype(np.float32)
        return scores, {"reward/reward_model": float(scores.mean())}


class PpoSteps(GrpoSteps):
    """GRPO's rollouts, prompts, rewards and held-out evaluation; PPO's update."""

    def __init__(self, recipe, graphdef, params, frozen, optimizer, target, mesh, tokenizer,
                 prompts):
        super().__init__(recipe, graphdef, params, frozen, optimizer, target, mesh, tokenizer,
                         prompts)
        ft = recipe.finetune
        if ft.ppo_reward_model:
            self.rewards = RewardModelScore(ft.ppo_reward_model)
        if recipe.train.batch_size % ft.ppo_minibatches:
            raise ConfigError(f"train.batch_size ({recipe.train.batch_size}) is not divisible "
                              f"by finetune.ppo_minibatches ({ft.ppo_minibatches})")
        self._prepare = jax.jit(functools.partial(
            prepare, graphdef=graphdef, kl_coef=ft.ppo_kl_coef, gamma=ft.ppo_gamma,
            lam=ft.ppo_lam))
        self._update = jax.jit(functools.partial(
            ppo_update, graphdef=graphdef, optimizer=optimizer, epochs=ft.ppo_epochs,
            minibatches=ft.ppo_minibatches, cliprange=ft.ppo_cliprange,
            cliprange_value=ft.ppo_cliprange_value, vf_coef=ft.ppo_vf_coef), donate_argnums=0)

    def train(self, state: TrainState, indices):
        ft, step = self.recipe.finetune, int(state.step)
        prompts = [self.train_prompts[i] for i in np.asarray(jax.device_get(indices)).ravel()]
        start = time.perf_counter()
        seed = (self.recipe.train.seed * 1_000_003 + step * len(prompts)) % 2**31
        samples, scores, means = self._sample(state.params, prompts, n=1,
                                              temperature=ft.rollout_temperature, seed=seed)
        batch, truncated = self._rows(prompts, samples)
        rows = jax.tree.map(lambda x: x[0], batch)
        rollout_s = time.perf_counter() - start
        old_logps, old_values, advantages, returns, kl = self._prepare(
            state.params, self.reference, rows, jnp.asarray(scores), self.frozen)
        state, metrics = self._update(state, rows, old_logps, old_values, advantages, returns,
                                      self.frozen)
        jax.block_until_ready(metrics.loss)
        extra = {**metrics.extra, "reward": float(scores.mean()), **means, "kl": float(kl),
                 "truncated": truncated,
                 "rollout_s": rollout_s, "train_s": time.perf_counter() - start - rollout_s}
        return state, metrics.replace(extra=extra)
