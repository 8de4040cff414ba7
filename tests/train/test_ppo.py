"""PPO on a tiny random llama: GAE and the clipped policy and value losses equal hand-computed
values on fixed arrays, and a few iterations with a reward that prefers one letter raise the
mean reward (and the held-out greedy reward above the starting model's)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.train import finetune as ft_lib
from flaxlm.train.metrics import read_metrics
from flaxlm.train.ppo import gae, ppo_losses
from flaxlm.train.recipe import Recipe

from tests.train.test_dpo import base_dir  # noqa: F401 (fixture)
from tests.train.test_grpo import prompts_file  # noqa: F401 (fixture)


def count_of_e(prompts, completions):
    """A reward that prefers one letter: how many "e"s the completion has."""
    return [float(c.count("e")) for c in completions]


def test_gae_against_hand_values():
    """Row 0: three tokens then padding; gamma 0.9, lambda 0.8. By hand, backwards:
    t2: delta = 1 + 0 - 0.5 = 0.5, A = 0.5
    t1: delta = 0 + 0.9 * 0.5 - 0.2 = 0.25, A = 0.25 + 0.72 * 0.5 = 0.61
    t0: delta = -0.1 + 0.9 * 0.2 - 0.3 = -0.22, A = -0.22 + 0.72 * 0.61 = 0.2192
    Row 1: one token: A = 2 - 1 = 1."""
    rewards = jnp.array([[-0.1, 0.0, 1.0, 7.0], [2.0, 0.0, 0.0, 0.0]])
    values = jnp.array([[0.3, 0.2, 0.5, 9.0], [1.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    advantages, returns = gae(rewards, values, mask, 0.9, 0.8)
    np.testing.assert_allclose(advantages, [[0.2192, 0.61, 0.5, 0], [1, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(returns, [[0.5192, 0.81, 1.0, 0], [2, 0, 0, 0]], atol=1e-6)


def test_clipped_losses_against_hand_values():
    """Ratios 1.5 (A = 1: max(-1.5, -1.2) = -1.2), 0.5 (A = -2: max(1, 1.6) = 1.6), 1.0
    (A = 3: -3); padding ignored. Values: V 1.0 vs old 0.5 (clipped to 0.7), R 2:
    max(1, 1.69) / 2; V 0.4 vs old 0.5 (0.4 inside), R 0: 0.16 / 2; V = old = R: 0."""
    old = jnp.log(jnp.array([[0.2, 0.2, 0.3, 0.5]]))
    new = jnp.log(jnp.array([[0.3, 0.1, 0.3, 0.9]]))
    adv = jnp.array([[1.0, -2.0, 3.0, 5.0]])
    values, old_values = jnp.array([[1.0, 0.4, 3.0, 8.0]]), jnp.array([[0.5, 0.5, 3.0, 0.0]])
    returns = jnp.array([[2.0, 0.0, 3.0, 1.0]])
    mask = jnp.array([[1, 1, 1, 0]], bool)
    pg, vf, clipfrac = ppo_losses(new, old, values, old_values, adv, returns, mask,
                                  cliprange=0.2, cliprange_value=0.2)
    np.testing.assert_allclose(pg, (-1.2 + 1.6 - 3.0) / 3, rtol=1e-5)
    np.testing.assert_allclose(vf, 0.5 * (1.69 + 0.16 + 0.0) / 3, rtol=1e-5)
    np.testing.assert_allclose(clipfrac, 2 / 3, rtol=1e-6)


def test_a_few_iterations_raise_the_reward(tmp_path, base_dir, prompts_file):  # noqa: F811
    recipe = Recipe.from_dict({
        "finetune": {"base": str(base_dir), "method": "lora", "objective": "ppo",
                     "lora_rank": 4, "lora_alpha": 8.0, "report_examples": 0,
                     "rewards": ["tests.train.test_ppo:count_of_e"],
                     "rollout_max_new_tokens": 8, "ppo_epochs": 2, "ppo_minibatches": 2,
                     "ppo_kl_coef": 0.01},
        "data": {"files": [str(prompts_file)], "seq_len": 32, "eval_fraction": 0.2},
        "optimizer": {"lr": 3e-2, "warmup_steps": 0, "weight_decay": 0.0},
        "train": {"steps": 12, "batch_size": 16},
        "checkpoint": {"every": 12, "keep": 2},
        "log": {"every": 1, "eval_every": 12, "eval_batches": 1, "progress": False,
                "tensorboard": False, "plot": False},
    }, source="test recipe")
    ft_lib.finetune(recipe, tmp_path)
    records = read_metrics(tmp_path)
    rewards = [r["reward"] for r in records]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:2]) + 0.2, rewards
    assert records[-1]["eval_reward"] > records[-1]["eval_ref_reward"]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-4) and records[-1]["kl"] > 0
    assert {"pg_loss", "vf_loss", "clip_fraction", "entropy", "rollout_s", "train_s"} \
        <= records[-1].keys()


def ppo_recipe(base_dir, prompts_file, **finetune) -> Recipe:  # noqa: F811
    return Recipe.from_dict({
        "finetune": {"base": str(base_dir), "method": "lora", "objective": "ppo",
                     "lora_rank": 4, "lora_alpha": 8.0, "report_examples": 0,
                     "rollout_max_new_tokens": 6, "ppo_epochs": 1, "ppo_minibatches": 2,
                     **finetune},
        "data": {"files": [str(prompts_file)], "seq_len": 32, "eval_fraction": 0.2},
        "optimizer": {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0},
        "train": {"steps": 2, "batch_size": 8},
        "checkpoint": {"every": 2, "keep": 2},
        "log": {"every": 1, "eval_every": 100, "eval_batches": 1, "progress": False,
                "tensorboard": False, "plot": False},
    }, source="test recipe")


def test_reward_from_a_reward_model(tmp_path, base_dir, prompts_file):  # noqa: F811
    """A reward model directory (the base with a random score head, HF layout) scores the
    rollouts; a directory without a score head is refused before anything compiles."""
    from flax import nnx

    from flaxlm.model import load
    from flaxlm.model.errors import CheckpointError
    from flaxlm.model.reward import add_score_head, save_reward_model

    model, tokenizer = load(base_dir)
    add_score_head(model, nnx.Rngs(0))
    save_reward_model(model, tokenizer, tmp_path / "rm")
    ft_lib.finetune(ppo_recipe(base_dir, prompts_file, ppo_reward_model=str(tmp_path / "rm")),
                    tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["reward"] == r["reward/reward_model"] != 0.0 for r in records)
    with pytest.raises(CheckpointError, match="not a reward model: no score head"):
        ft_lib.prepare_finetune(ppo_recipe(base_dir, prompts_file,
                                           ppo_reward_model=str(base_dir)), tmp_path / "bad")
