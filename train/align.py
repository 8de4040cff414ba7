"""The preference objectives of `flaxlm finetune` (finetune.objective = "dpo" or "reward"): their data
and their compiled steps, for flaxlm.train.finetune's run (the same loop, checkpoints,
metrics and adapters as SFT).

Data: preference pairs (flaxlm.train.preference) from the recipe's data.files, split by
data.eval_fraction, or with no files the shipped docstring preferences (train split for
training, test split held out).
"""

from __future__ import annotations

import functools

import jax

from flaxlm.model.sources import find_files
from flaxlm.model.tokenizer import Tokenizer
from flaxlm.train import dpo, preference, reward
from flaxlm.train.recipe import Recipe
from flaxlm.train.step import Steps, compile_objective


def preference_pairs(recipe: Recipe) -> tuple[list[preference.Pair], list[preference.Pair]]:
    """(training pairs, held-out pairs)."""
    cfg = recipe.data
    if not cfg.files:
        return preference.docstring_pairs("train"), preference.docstring_pairs("test")
    from flaxlm.train.data import split_documents

    pairs = preference.read_pairs(find_files(cfg.files))
    split = split_documents(len(pairs), cfg.eval_fraction, cfg.seed)
    return [pairs[i] for i in split.train], [pairs[i] for i in split.eval]


def preference_data(recipe: Recipe, tokenizer: Tokenizer):
    """(the endless training dataset, the held-out batches) of the recipe's pairs."""
    train_pairs, eval_pairs = preference_pairs(recipe)
    seq_len, train = recipe.data.seq_len, recipe.train
    encoded = [preference.encode_pairs(p, tokenizer, seq_len) for p in (train_pairs, eval_pairs)]
    if jax.process_index() == 0:
        print(encoded[0].summary("training data"), flush=True)
        print(encoded[1].summary("held-out data"), flush=True)
    processes = jax.process_count()
    train_examples, eval_examples = (e.examples[jax.process_index()::processes] for e in encoded)
    dataset = preference.pair_train_dataset(train_examples, grad_accum=train.grad_accum,
                                            micro_batch=train.micro_batch // processes,
                                            seed=recipe.data.seed)
    batches = preference.pair_eval_batches(eval_examples,
                                           batch_size=train.micro_batch // processes,
                                           max_batches=recipe.log.eval_batches)
    return dataset, batches


def dpo_steps(recipe: Recipe, graphdef, optimizer, target, mesh, frozen, params) -> Steps:
    """The DPO steps; the reference is made from `params`, the starting trainable weights."""
    ft = recipe.finetune
    settings = dict(graphdef=graphdef, beta=ft.dpo_beta, label_smoothing=ft.dpo_label_smoothing)
    train = functools.partial(dpo.dpo_train_step, optimizer=optimizer, **settings)
    evaluate = functools.partial(dpo.dpo_eval_step, **settings)
    reference = dpo.reference_of(params, ft.method)
    return compile_objective(train, evaluate, optimizer, target, mesh,
                             recipe.train.sharding_rules, frozen, (reference,))


def reward_steps(recipe: Recipe, graphdef, optimizer, target, mesh, frozen) -> Steps:
    """The reward model's steps (Bradley-Terry on the score head)."""
    train = functools.partial(reward.reward_train_step, graphdef=graphdef, optimizer=optimizer)
    evaluate = functools.partial(reward.reward_eval_step, graphdef=graphdef)
    return compile_objective(train, evaluate, optimizer, target, mesh,
                             recipe.train.sharding_rules, frozen)
