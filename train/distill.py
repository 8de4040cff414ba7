"""Knowledge distillation (Hinton et al. 2015): a student trained on a teacher's softened distribution.

On every trained token (the SFT mask: flaxlm.train.sft's data), with temperature T,

    KL   = sum_v p_teacher(v | T) (log p_teacher(v | T) - log p_student(v | T))   (forward KL)
    CE   = -log p_student(target)                                           (T = 1)
    loss = alpha * T^2 * KL + (1 - alpha) * CE

averaged over the trained tokens (T^2 keeps the KL's gradient on the scale of the CE's
as T grows, as Hinton et al.). The teacher (`finetune.distill_teacher`, any model
`flaxlm.model.load` takes, int8 with `distill_teacher_quantize`, larger than the
student or not) is frozen: its weights are an argument of the compiled steps. It must
share the student's tokenizer (the same vocabulary, token for token) and vocabulary
size, else the run is refused before anything compiles. Metrics: `kl` and `ce` (their
means over the trained tokens), with `eval_` prefixes on held-out data.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxlm.model.errors import ConfigError
from flaxlm.model.tokenizer import Tokenizer
from flaxlm.train.data import Batch
from flaxlm.train.dpo import accumulated, update
from flaxlm.train.recipe import Recipe
from flaxlm.train.step import LossSum, StepMetrics, Steps, TrainState, compile_objective, training_model


def token_terms(student_logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array,
                temperature: float) -> tuple[jax.Array, jax.Array]:
    """(forward KL at `temperature` [b, s], cross-entropy at 1 [b, s])."""
    student_t = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    teacher_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_t) * (teacher_t - student_t), axis=-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(student_logits.astype(jnp.float32),
                                                         targets)
    return kl, ce


def distill_sums(graphdef, params, batch: Batch, frozen, teacher_graphdef, teacher, key, *,
                 temperature: float, alpha: float) -> LossSum:
    """Summed mixed loss, KL and CE over the batch's trained tokens (count: the tokens)."""
    inputs = dict(positions=batch.positions[:, :-1], attention_mask=batch.segment_ids[:, :-1])
    student = training_model(graphdef, params, frozen, key)(batch.tokens[:, :-1], **inputs)
    teacher_logits = nnx.merge(teacher_graphdef, teacher)(batch.tokens[:, :-1], **inputs)
    kl, ce = token_terms(student, jax.lax.stop_gradient(teacher_logits), batch.tokens[:, 1:],
                         temperature)
    segments = batch.segment_ids
    mask = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] != 0)
    if batch.loss_mask is not None:
        mask = mask & (batch.loss_mask[:, 1:] != 0)
    loss = alpha * temperature ** 2 * kl + (1.0 - alpha) * ce

    def total(x):
        return jnp.sum(jnp.where(mask, x, 0.0))

    return LossSum(total=total(loss), count=jnp.sum(mask, dtype=jnp.float32),
                   extra={"kl": total(kl), "ce": total(ce)})


def distill_train_step(state: TrainState, batch: Batch, frozen, teacher, *, graphdef,
                       teacher_graphdef, optimizer, temperature: float, alpha: float
                       ) -> tuple[TrainState, StepMetrics]:
    rng, key = jax.random.split(state.rng)
    sums_fn = functools.partial(_sums, graphdef=graphdef, frozen=frozen, teacher=teacher,
                                teacher_graphdef=teacher_graphdef, temperature=temperature,
                                alpha=alpha)
    sums, grads = accumulated(sums_fn, state.params, batch, key)
    return update(state, sums, grads, optimizer, rng)


def _sums(params, micro, key, *, graphdef, frozen, teacher, teacher_graphdef, **settings):
    return distill_sums(graphdef, params, micro, frozen, teacher_graphdef, teacher, key,
                        **settings)


def distill_eval_step(params, batch: Batch, frozen, teacher, *, graphdef, teacher_graphdef,
                      temperature: float, alpha: float) -> LossSum:
    return distill_sums(graphdef, params, batch, frozen, teacher_graphdef, teacher, None,
                        temperature=temperature, alpha=alpha)


def load_teacher(recipe: Recipe, student_tokenizer: Tokenizer, vocab_size: int):
    """(graphdef, state) of the teacher; refused when its tokenizer or vocabulary size
    differs from the student's."""
    from flaxlm.model.loading import load

    ft = recipe.finetune
    model, tokenizer = load(ft.distill_teacher, dtype=dict(recipe.model).get("dtype", "float32"),
                            quantize=ft.distill_teacher_quantize or None)
    if tokenizer is None or tokenizer.backend.get_vocab() != student_tokenizer.backend.get_vocab():
        raise ConfigError(f"finetune.distill_teacher {ft.distill_teacher}: its tokenizer differs "
                          f"from the student's ({ft.base}); distillation compares their "
                          "distributions token by token, so they must share one")
    if model.config.vocab_size != vocab_size:
        raise ConfigError(f"finetune.distill_teacher {ft.distill_teacher}: vocabulary size "
                          f"{model.config.vocab_size}, the student's is {vocab_size}")
    model.eval()
    return nnx.split(model)


def distill_steps(recipe: Recipe, graphdef, optimizer, target, mesh, frozen, tokenizer,
                  vocab_size: int) -> Steps:
    ft = recipe.finetune
    teacher_graphdef, teacher = load_teacher(recipe, tokenizer, vocab_size)
    settings = dict(graphdef=graphdef, teacher_graphdef=teacher_graphdef,
                    temperature=ft.distill_temperature, alpha=ft.distill_alpha)
    train = functools.partial(distill_train_step, optimizer=optimizer, **settings)
    evaluate = functools.partial(distill_eval_step, **settings)
    return compile_objective(train, evaluate, optimizer, target, mesh,
                             recipe.train.sharding_rules, frozen, (teacher,))
