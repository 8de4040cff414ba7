"""Reward-model training: the pairwise Bradley-Terry loss on a scalar head (flaxlm.model.reward).

For a pair (chosen c, rejected r) with rewards r_c, r_r read at each chat's last real
token, the loss is -log sigmoid(r_c - r_r) (InstructGPT's, TRL's RewardTrainer's),
the mean over the batch's pairs; the metrics are the mean rewards, the margin and the
accuracy (r_c > r_r), held-out pair accuracy among them (`eval_accuracy`). Batches
are flaxlm.train.preference's (chosen, rejected alternating rows); the head trains
with whatever `finetune.method` trains (all weights, or LoRA adapters).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxlm.model.reward import last_token_rewards
from flaxlm.train.data import Batch
from flaxlm.train.dpo import accumulated, update
from flaxlm.train.step import LossSum, StepMetrics, TrainState, training_model


def pair_rewards(graphdef, params, batch: Batch, frozen, key=None) -> jax.Array:
    """Rewards [rows]; with `key`, dropout on (drawn from it)."""
    model = training_model(graphdef, params, frozen, key)
    return last_token_rewards(model, batch.tokens, batch.positions, batch.segment_ids)


def reward_sums(graphdef, params, batch: Batch, frozen, key=None) -> LossSum:
    """Summed Bradley-Terry loss and metrics over the batch's real pairs."""
    rewards = pair_rewards(graphdef, params, batch, frozen, key).reshape(-1, 2)
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    losses = -jax.nn.log_sigmoid(chosen - rejected)
    valid = jnp.any(batch.segment_ids[:, 1:] != 0, axis=-1).reshape(-1, 2)[:, 0]
    metrics = {"chosen_reward": chosen, "rejected_reward": rejected,
               "margin": chosen - rejected, "accuracy": (chosen > rejected).astype(jnp.float32)}
    return LossSum(total=jnp.sum(jnp.where(valid, losses, 0.0)),
                   count=jnp.sum(valid, dtype=jnp.float32),
                   extra={k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in metrics.items()})


def reward_train_step(state: TrainState, batch: Batch, frozen: nnx.State, *,
                      graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation
                      ) -> tuple[TrainState, StepMetrics]:
    """One optimizer update from pairs [grad_accum, 2 * micro_batch, seq_len + 1]."""
    rng, key = jax.random.split(state.rng)
    sums_fn = functools.partial(_sums, graphdef=graphdef, frozen=frozen)
    sums, grads = accumulated(sums_fn, state.params, batch, key)
    return update(state, sums, grads, optimizer, rng)


def _sums(params, micro, key, *, graphdef, frozen):
    return reward_sums(graphdef, params, micro, frozen, key)


def reward_eval_step(params: nnx.State, batch: Batch, frozen: nnx.State, *,
                     graphdef: nnx.GraphDef) -> LossSum:
    return reward_sums(graphdef, params, batch, frozen)
