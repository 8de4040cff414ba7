"""Direct preference optimization (Rafailov et al. 2023): the sigmoid loss against a frozen reference.

For a pair (chosen c, rejected r) with reply log-probabilities summed over the reply's
trained tokens (the assistant-only mask of flaxlm.train.preference), under the policy
pi and the reference ref:

    logits = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
    loss   = -(1 - eps) * log sigmoid(beta * logits) - eps * log sigmoid(-beta * logits)

with eps = `label_smoothing` (conservative DPO; eps = 0 is TRL's `loss_type="sigmoid"`,
whose formula the tests check against PyTorch). The implicit rewards are
beta * (log pi - log ref) of each side; the metrics are their means, the margin
(chosen - rejected), the accuracy (chosen > rejected) and the log-prob accuracy
(log pi(c) > log pi(r)) and the reference's log-prob accuracy (the starting model's,
where every implicit reward is 0, so its reward accuracy says nothing), over the
step's pairs: each held-out evaluation compares the tuned model with its start.

The reference is an argument of the compiled steps with the trainable part's
structure: the starting weights for full fine-tuning (one copy), and for LoRA the
adapters with B = 0, i.e. the base with the adapters switched off (the adapters
add exactly zero), so no second copy of the base exists. The loss of a batch is the
mean over its pairs; gradient accumulation sums over micro-batches and divides by
the pair count, as the SFT step does with tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxlm.train.data import Batch
from flaxlm.train.step import LossSum, StepMetrics, TrainState, token_losses



def sequence_logps(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, frozen: nnx.State,
                   key: jax.Array | None = None) -> jax.Array:
    """Each row's summed log-probability of its trained tokens [rows] (float32)."""
    losses, mask = token_losses(graphdef, params, batch, frozen, key)
    return -jnp.sum(jnp.where(mask, losses, 0.0), axis=-1)


def dpo_losses(policy: jax.Array, reference: jax.Array, beta: float, label_smoothing: float
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair losses [pairs] and rewards from row log-probs [2 * pairs] (chosen, rejected
    alternating) of the policy and the reference."""
    ratios = (policy - reference).reshape(-1, 2)            # [pairs, (chosen, rejected)]
    logits = ratios[:, 0] - ratios[:, 1]
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * logits)
              - label_smoothing * jax.nn.log_sigmoid(-beta * logits))
    chosen, rejected = beta * ratios[:, 0], beta * ratios[:, 1]
    return losses, {"chosen_reward": chosen, "rejected_reward": rejected,
                    "margin": chosen - rejected,
                    "accuracy": (chosen > rejected).astype(jnp.float32)}


def _valid_pairs(batch: Batch) -> jax.Array:
    """[pairs] True for a real pair, False for padding (no trained token)."""
    has_target = jnp.any((batch.loss_mask[:, 1:] != 0) & (batch.segment_ids[:, 1:] != 0),
                         axis=-1)
    return has_target.reshape(-1, 2)[:, 0]


def pair_sums(graphdef, params, reference, batch: Batch, frozen, key, beta: float,
              label_smoothing: float) -> LossSum:
    """The batch's summed loss and metrics over its real pairs (count: the pairs)."""
    policy = sequence_logps(graphdef, params, batch, frozen, key)
    ref = jax.lax.stop_gradient(sequence_logps(graphdef, reference, batch, frozen))
    losses, metrics = dpo_losses(policy, ref, beta, label_smoothing)
    for name, logps in (("logp_accuracy", policy), ("ref_logp_accuracy", ref)):
        sides = logps.reshape(-1, 2)
        metrics[name] = (sides[:, 0] > sides[:, 1]).astype(jnp.float32)
    valid = _valid_pairs(batch)
    return LossSum(total=jnp.sum(jnp.where(valid, losses, 0.0)),
                   count=jnp.sum(valid, dtype=jnp.float32),
                   extra={k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in metrics.items()})


def accumulated(sums_fn, params, batch: Batch, key: jax.Array):
    """(LossSum, gradient of its total) summed over micro-batches batch[i]
    ([grad_accum, rows, ...]); `sums_fn(params, micro, key) -> LossSum`; micro-batch i
    draws its dropout from fold_in(key, i)."""
    def objective(p, micro, micro_key):
        sums = sums_fn(p, micro, micro_key)
        return sums.total, sums

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def step(carry, inputs):
        micro, index = inputs
        (_, sums), grads = grad_fn(params, micro, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, carry, (sums, grads)), None

    micro0 = jax.tree.map(lambda x: x[0], batch)
    zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums_fn, params, micro0, key))
    zeros = (zero_sums, jax.tree.map(jnp.zeros_like, params))
    indices = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
    (sums, grads), _ = jax.lax.scan(step, zeros, (batch, indices))
    return sums, grads


def update(state: TrainState, sums: LossSum, grads, optimizer, rng
           ) -> tuple[TrainState, StepMetrics]:
    """The optimizer step on the count-averaged gradient, and the step's metrics."""
    count = jnp.maximum(sums.count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                     opt_state=opt_state, rng=rng)
    return new, StepMetrics(loss=sums.total / count, grad_norm=optax.tree.norm(grads),
                            param_norm=optax.tree.norm(new.params), tokens=sums.count,
                            router_loss=jnp.zeros(()),
                            extra={k: v / count for k, v in sums.extra.items()})


def dpo_train_step(state: TrainState, batch: Batch, frozen: nnx.State, reference: nnx.State,
                   *, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                   beta: float, label_smoothing: float) -> tuple[TrainState, StepMetrics]:
    """One optimizer update from pairs [grad_accum, 2 * micro_batch, seq_len + 1]."""
    rng, key = jax.random.split(state.rng)
    sums_fn = functools.partial(_sums_with_key, graphdef=graphdef, reference=reference,
                                frozen=frozen, beta=beta, label_smoothing=label_smoothing)
    sums, grads = accumulated(sums_fn, state.params, batch, key)
    return update(state, sums, grads, optimizer, rng)


def _sums_with_key(params, micro, key, *, graphdef, reference, frozen, beta, label_smoothing):
    return pair_sums(graphdef, params, reference, micro, frozen, key, beta, label_smoothing)


def dpo_eval_step(params: nnx.State, batch: Batch, frozen: nnx.State, reference: nnx.State,
                  *, graphdef: nnx.GraphDef, beta: float, label_smoothing: float) -> LossSum:
    """Summed loss and metrics over held-out pairs [2 * pairs, seq_len + 1]."""
    return pair_sums(graphdef, params, reference, batch, frozen, None, beta, label_smoothing)


def reference_of(params: nnx.State, method: str) -> nnx.State:
    """The reference weights: the starting trainable weights, or for LoRA zeros (adapters
    off: every adapter adds x @ A @ 0 = 0)."""
    if method == "lora":
        return jax.tree.map(jnp.zeros_like, params)
    return jax.tree.map(jnp.copy, params)
