"""The train and eval steps: pure functions of (state, batch), compiled once with `jax.jit`.

The model is split once (`graphdef, params = nnx.split(model, nnx.Param)`); the
params travel in a `TrainState` that the train step donates and returns. When only
part of the model trains (fine-tuning: LoRA adapters, a soft prompt, all but frozen
weights), the split is three-way, `graphdef, params, frozen = nnx.split(model,
trainable, ...)`: `params` (and the optimizer state) hold only the trainable part,
only it is differentiated, and `frozen` is an argument of both steps that is
neither donated nor returned. The
loss is the mean next-token cross-entropy over the tokens that have a next token
in the same document: padding (segment 0) and the last token of each document
(which would otherwise predict the next document's first token) are masked.
Gradient accumulation sums the loss and its gradient over micro-batches (a
`lax.scan`) and divides by the total token count, so k micro-batches of b rows
give the gradient of one batch of k*b rows.

A mixture-of-experts model adds the router's load-balancing loss
(flaxlm.model.moe.load_balancing_loss, HF's `load_balancing_loss_func`) times the
recipe's `train.router_aux_loss_coef` to the objective; each micro-batch's term
is weighted by its token count, like its cross-entropy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxlm.model.config import ModelConfig
from flaxlm.model.decoder import Decoder
from flaxlm.model.moe import load_balancing_loss
from flaxlm.model.sharding import RULES, Rules, param_shardings, sharding_for, use_sharding
from flaxlm.train.data import Batch


@struct.dataclass
class TrainState:
    step: jax.Array             # int32 []: optimizer updates done
    params: nnx.State           # master parameters (float32 unless param_dtype says otherwise)
    opt_state: optax.OptState   # AdamW moments, same dtype and structure as params
    rng: jax.Array              # uint32 [2]: split every step, for stochastic layers


@struct.dataclass
class LossSum:
    total: jax.Array            # float32 []: summed token cross-entropy
    count: jax.Array            # float32 []: predicted tokens
    extra: dict = struct.field(default_factory=dict)  # other objectives' sums, by name
                                # (divided by `count` like `total`; flaxlm.train.dpo)

    @property
    def mean(self) -> jax.Array:
        return self.total / jnp.maximum(self.count, 1.0)


@struct.dataclass
class StepMetrics:
    loss: jax.Array             # mean loss of the step's batch (before the update)
    grad_norm: jax.Array        # global norm of the gradient (before clipping)
    param_norm: jax.Array       # global norm of the updated parameters (NaN/Inf check)
    tokens: jax.Array           # predicted tokens in the batch
    router_loss: jax.Array      # MoE load-balancing loss (token-weighted mean; 0 without MoE)
    extra: dict = struct.field(default_factory=dict)  # other objectives' metrics (means), by
                                # name: logged beside the loss (flaxlm.train.dpo)


def new_state(model: Decoder, optimizer: optax.GradientTransformation,
              seed: int) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed))
    return graphdef, state


def abstract_state(config: ModelConfig, optimizer: optax.GradientTransformation
                   ) -> tuple[nnx.GraphDef, TrainState]:
    """Graphdef and the TrainState's shapes/dtypes, allocating nothing (restore target)."""
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    state = jax.eval_shape(lambda p: TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
        rng=jax.random.PRNGKey(0)), params)
    return graphdef, state


def merge(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State | None = None):
    """The model of a split: `params`, and `frozen` when the model was split three ways."""
    return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


def _reseeded(frozen: nnx.State, key: jax.Array) -> tuple[nnx.State, bool]:
    """`frozen` with its RNG streams (LoRA dropout's) drawn afresh from `key` (uint32 [2]),
    as new variables (the split's own cannot change inside a trace); and whether it has any."""
    flat = nnx.to_flat_state(frozen)
    keys = [i for i, (_, v) in enumerate(flat) if isinstance(v, nnx.RngKey)]
    if not keys:
        return frozen, False
    out = []
    for i, (path, var) in enumerate(flat):
        if isinstance(var, nnx.RngKey):
            var = var.replace(jax.random.wrap_key_data(jax.random.fold_in(key, i)))
        elif isinstance(var, nnx.RngCount):
            var = var.replace(jnp.zeros_like(var.get_value()))
        out.append((path, var))
    return nnx.from_flat_state(out), True


def training_model(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State | None,
                   key: jax.Array | None = None):
    """The merged model of a split; with `key` (and RNG streams in `frozen`), its random
    layers (LoRA dropout) on, drawn from `key`."""
    random = False
    if key is not None and frozen is not None:
        frozen, random = _reseeded(frozen, key)
    model = merge(graphdef, params, frozen)
    if random:
        model.train()  # dropout on (created off), drawing from the fresh keys
    return model


def _forward(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch,
             frozen: nnx.State | None = None, key: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token cross-entropy [b, seq_len], its mask, and the load-balancing loss
    over the input tokens (0.0 for a model without MoE layers). With `key`, random
    layers (dropout) are on, drawn from it."""
    model = training_model(graphdef, params, frozen, key)
    segments = batch.segment_ids
    inputs = dict(positions=batch.positions[:, :-1], attention_mask=segments[:, :-1])
    router = jnp.zeros((), jnp.float32)
    if model.config.num_experts:
        logits, router_logits = model.with_router_logits(batch.tokens[:, :-1], **inputs)
        router = load_balancing_loss(router_logits, model.config.experts_per_token,
                                     segments[:, :-1] != 0)
    else:
        logits = model(batch.tokens[:, :-1], **inputs)  # [b, seq_len, vocab] float32
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.tokens[:, 1:])
    mask = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] != 0)
    if batch.loss_mask is not None:
        mask = mask & (batch.loss_mask[:, 1:] != 0)
    return losses, mask, router


def token_losses(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch,
                 frozen: nnx.State | None = None, key: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy [b, seq_len] and its mask [b, seq_len] (True = counted);
    with `key`, dropout on (drawn from it)."""
    losses, mask, _ = _forward(graphdef, params, batch, frozen, key)
    return losses, mask


def _sums(losses: jax.Array, mask: jax.Array) -> LossSum:
    return LossSum(total=jnp.sum(jnp.where(mask, losses, 0.0)),
                   count=jnp.sum(mask, dtype=jnp.float32))


def loss_sum(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch,
             frozen: nnx.State | None = None) -> LossSum:
    return _sums(*token_losses(graphdef, params, batch, frozen))


def _summed_grads(graphdef, params, batch: Batch, router_coef: float, frozen=None,
                  key: jax.Array | None = None) -> tuple[LossSum, jax.Array, nnx.State]:
    """Loss sum, count-weighted router-loss sum and the objective's gradient (with
    respect to `params` only) over micro-batches batch[i] ([grad_accum, micro, ...]);
    micro-batch i draws its dropout from fold_in(key, i)."""
    def total(p, micro, index):
        micro_key = None if key is None else jax.random.fold_in(key, index)
        losses, mask, router = _forward(graphdef, p, micro, frozen, micro_key)
        terms = _sums(losses, mask)
        weighted = router * terms.count
        return terms.total + router_coef * weighted, (terms, weighted)

    grad_fn = jax.value_and_grad(total, has_aux=True)

    def accumulate(carry, inputs):
        terms, router, grads = carry
        (_, (new_terms, new_router)), new_grads = grad_fn(params, *inputs)
        return (jax.tree.map(jnp.add, terms, new_terms), router + new_router,
                jax.tree.map(jnp.add, grads, new_grads)), None

    zeros = (LossSum(total=jnp.zeros(()), count=jnp.zeros(())), jnp.zeros(()),
             jax.tree.map(jnp.zeros_like, params))
    indices = jnp.arange(jax.tree.leaves(batch)[0].shape[0])
    (terms, router, grads), _ = jax.lax.scan(accumulate, zeros, (batch, indices))
    return terms, router, grads


def train_step(state: TrainState, batch: Batch, frozen: nnx.State | None = None, *,
               graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
               router_aux_loss_coef: float = 0.0) -> tuple[TrainState, StepMetrics]:
    """One optimizer update from a batch of shape [grad_accum, micro_batch, seq_len + 1]."""
    rng, dropout_key = jax.random.split(state.rng)
    terms, router, grads = _summed_grads(graphdef, state.params, batch, router_aux_loss_coef,
                                         frozen, dropout_key)
    count = jnp.maximum(terms.count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state, rng=rng)
    return new_state, StepMetrics(loss=terms.mean, grad_norm=optax.tree.norm(grads),
                                  param_norm=optax.tree.norm(new_state.params),
                                  tokens=terms.count, router_loss=router / count)


def eval_step(params: nnx.State, batch: Batch, frozen: nnx.State | None = None, *,
              graphdef: nnx.GraphDef) -> LossSum:
    """Summed loss over a batch [batch, seq_len + 1] of held-out rows."""
    return loss_sum(graphdef, params, batch, frozen)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The two compiled programs and the shardings of their arguments."""

    train: Callable[[TrainState, Batch], tuple[TrainState, StepMetrics]]
    eval: Callable[[nnx.State, Batch], LossSum]
    state_sharding: TrainState       # a NamedSharding per leaf
    train_batch_sharding: NamedSharding
    eval_batch_sharding: NamedSharding


def state_shardings(target: TrainState, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules: Rules) -> TrainState:
    """Parameters by their logical axes and the rules; AdamW moments like their
    parameters; step, RNG and counters replicated."""
    replicated = NamedSharding(mesh, P())
    params = param_shardings(target.params, mesh, rules)
    opt_state = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, target.opt_state, params,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated)


def train_batch_sharding(mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
    return sharding_for((None, "batch", None), mesh, rules)  # [grad_accum, micro, seq]


def jit_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                   shardings: TrainState, mesh: Mesh, rules: Rules = RULES,
                   router_aux_loss_coef: float = 0.0, frozen_shardings: nnx.State | None = None):
    """The jitted train step (state donated); trace or lower it inside `use_sharding`.
    With `frozen_shardings` it takes the frozen part of the model as a third argument."""
    batch = train_batch_sharding(mesh, rules)
    in_shardings = ((shardings, batch) if frozen_shardings is None
                    else (shardings, batch, frozen_shardings))
    return jax.jit(functools.partial(train_step, graphdef=graphdef, optimizer=optimizer,
                                     router_aux_loss_coef=router_aux_loss_coef),
                   in_shardings=in_shardings,
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)


def compile_steps(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                  target: TrainState, mesh: Mesh, rules: Rules = RULES,
                  router_aux_loss_coef: float = 0.0, frozen: nnx.State | None = None) -> Steps:
    """jit the steps with explicit shardings (state by `state_shardings`, batch rows over
    the mesh's batch axes); the train state is donated. `target` gives the state's shapes.
    Both programs are traced inside `use_sharding`, so activations are constrained too.

    `frozen` (the rest of a three-way split) is placed by its logical axes and passed to
    both programs as an argument: `Steps.train(state, batch)` keeps its form."""
    shardings = state_shardings(target, optimizer, mesh, rules)
    frozen_sharding = None if frozen is None else param_shardings(frozen, mesh, rules)
    train = jit_train_step(graphdef, optimizer, shardings, mesh, rules, router_aux_loss_coef,
                           frozen_sharding)
    train_batch = train_batch_sharding(mesh, rules)
    eval_batch = sharding_for(("batch", None), mesh, rules)         # [batch, seq]
    metrics = NamedSharding(mesh, P())
    in_shardings = ((shardings.params, eval_batch) if frozen is None
                    else (shardings.params, eval_batch, frozen_sharding))
    evaluate = jax.jit(functools.partial(eval_step, graphdef=graphdef),
                       in_shardings=in_shardings, out_shardings=metrics)
    extra = () if frozen is None else (jax.device_put(frozen, frozen_sharding),)
    return Steps(train=_in_context(train, mesh, rules, extra),
                 eval=_in_context(evaluate, mesh, rules, extra),
                 state_sharding=shardings, train_batch_sharding=train_batch,
                 eval_batch_sharding=eval_batch)


def compile_objective(train_fn: Callable, eval_fn: Callable, optimizer: optax.GradientTransformation,
                      target: TrainState, mesh: Mesh, rules: Rules, frozen: nnx.State,
                      extra: tuple[nnx.State, ...] = ()) -> Steps:
    """`compile_steps` for another objective (flaxlm.train.dpo, flaxlm.train.reward):
    `train_fn(state, batch, frozen, *extra)` and `eval_fn(params, batch, frozen, *extra)`,
    where each of `extra` (a reference model's weights, ...) is placed like parameters by
    its logical axes and bound as an argument, neither donated nor returned."""
    shardings = state_shardings(target, optimizer, mesh, rules)
    bound = (frozen, *extra)
    bound_shardings = tuple(param_shardings(tree, mesh, rules) for tree in bound)
    train_batch = train_batch_sharding(mesh, rules)
    eval_batch = sharding_for(("batch", None), mesh, rules)
    train = jax.jit(train_fn, in_shardings=(shardings, train_batch, *bound_shardings),
                    out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
    evaluate = jax.jit(eval_fn, in_shardings=(shardings.params, eval_batch, *bound_shardings),
                       out_shardings=NamedSharding(mesh, P()))
    placed = tuple(jax.device_put(tree, sharding)
                   for tree, sharding in zip(bound, bound_shardings, strict=True))
    return Steps(train=_in_context(train, mesh, rules, placed),
                 eval=_in_context(evaluate, mesh, rules, placed),
                 state_sharding=shardings, train_batch_sharding=train_batch,
                 eval_batch_sharding=eval_batch)


def _in_context(fn: Callable, mesh: Mesh, rules: Rules, extra: tuple = ()) -> Callable:
    """`fn(*args, *extra)` inside `use_sharding` (extra: the frozen part of the model)."""
    def call(*args):
        with use_sharding(mesh, rules):
            return fn(*args, *extra)

    return call


def put_batch(batch: Batch, sharding: NamedSharding) -> Batch:
    """This process's rows -> one global array per field (the rows of all processes)."""
    def put(local):
        global_shape = list(local.shape)
        axis = len(local.shape) - 2  # the batch axis: [..., batch, seq]
        global_shape[axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))

    return jax.tree.map(put, batch)
