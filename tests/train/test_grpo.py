"""GRPO on a tiny random llama: group advantages (zero for equal rewards), the clipped
objective and k3 KL against hand-computed values, rollouts on the compiled sampler take new
weights without compiling, a short run raises a trivially learnable reward, resume after
SIGTERM is bitwise equal to a straight run, and a raising reward names function and sample
and keeps the last good checkpoint."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.model import load
from flaxlm.train import finetune as ft_lib
from flaxlm.train.grpo import RewardError, clipped_objective, group_advantages
from flaxlm.train.metrics import read_metrics
from flaxlm.train.recipe import Recipe

from tests.train.resume import assert_same_state, stop_then_resume
from tests.train.test_dpo import base_dir  # noqa: F401 (fixture)
from tests.train.test_finetune import WORDS


def share_of_e(prompts, completions):
    """A trivially learnable reward: the share of the letter "e" in the completion."""
    return [c.count("e") / max(len(c), 1) for c in completions]


CALLS = {"n": 0}


def fails_from_third_call(prompts, completions):
    CALLS["n"] += 1
    if CALLS["n"] >= 3:
        raise ValueError("no score for this one")
    return [0.0] * len(completions)


def test_group_advantages():
    equal = group_advantages(np.full((3, 4), 0.7))
    assert equal.shape == (3, 4) and not equal.any()
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    std = [math.sqrt(1 / 3), math.sqrt(27 / 12)]    # Bessel-corrected, by hand
    expected = [[0.5 / (std[0] + 1e-4), -0.5 / (std[0] + 1e-4)] * 2,
                [-0.75 / (std[1] + 1e-4)] * 3 + [2.25 / (std[1] + 1e-4)]]
    expected[0] = [expected[0][0], expected[0][1], expected[0][1], expected[0][0]]
    np.testing.assert_allclose(group_advantages(rewards), expected, rtol=1e-6)


def test_clipped_objective_and_k3_against_hand_values():
    """Ratios 1.5 and 0.5 (both outside [0.8, 1.2]); the surrogate is the smaller of
    ratio * A and clip(ratio) * A; k3 with ref/pi = 2 and 1."""
    logps = jnp.log(jnp.array([[0.3, 0.1]]))
    old = jnp.log(jnp.array([[0.2, 0.2]]))          # ratios 1.5 and 0.5
    ref = jnp.log(jnp.array([[0.6, 0.1]]))          # ref/pi = 2 and 1
    for adv in (2.0, -2.0):
        loss, kl, clipped = clipped_objective(logps, old, ref, jnp.array([adv]), 0.1, 0.2)
        if adv > 0:   # min(1.5 A, 1.2 A) = 1.2 A; min(0.5 A, 0.8 A) = 0.5 A
            surrogate = [1.2 * adv, 0.5 * adv]
        else:         # min(1.5 A, 1.2 A) = 1.5 A; min(0.5 A, 0.8 A) = 0.8 A
            surrogate = [1.5 * adv, 0.8 * adv]
        k3 = [2 - math.log(2) - 1, 0.0]
        np.testing.assert_allclose(kl[0], k3, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(loss[0], [-s + 0.1 * k for s, k in zip(surrogate, k3)],
                                   rtol=1e-5)
        np.testing.assert_array_equal(clipped[0], [1.0, 1.0])


def test_rollouts_take_new_weights_without_compiling(base_dir):  # noqa: F811
    from importlib.metadata import entry_points

    Rollouts = next(iter(entry_points(group="flaxlm.rollouts", name="compiled"))).load()
    model, tokenizer = load(base_dir)
    rollouts = Rollouts(model, tokenizer)
    prompts = [tokenizer.encode("red cat", add_special_tokens=False)] * 2
    first = rollouts.sample(prompts, n=2, max_new_tokens=6, temperature=0.0, seed=0)
    compiled = rollouts.num_compiled
    graphdef, state = nnx.split(model)
    scaled = jax.tree.map(lambda x: x * 1.5 if x.dtype == jnp.float32 else x, state)
    rollouts.set_weights(scaled)
    second = rollouts.sample(prompts, n=2, max_new_tokens=6, temperature=0.0, seed=0)
    assert rollouts.num_compiled == compiled
    assert [s.token_ids for s in first] != [s.token_ids for s in second]
    assert [s.prompt for s in first] == [0, 0, 1, 1]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(WORDS, 3))}) + "\n"
                            for _ in range(40)))
    return path


def grpo_recipe(base_dir, prompts_file, steps: int, **finetune) -> Recipe:  # noqa: F811
    return Recipe.from_dict({
        "finetune": {"base": str(base_dir), "method": "lora", "objective": "grpo",
                     "lora_rank": 4, "lora_alpha": 8.0, "report_examples": 0,
                     "rewards": ["tests.train.test_grpo:share_of_e"],
                     "grpo_num_generations": 4, "rollout_max_new_tokens": 8, **finetune},
        "data": {"files": [str(prompts_file)], "seq_len": 32, "eval_fraction": 0.2},
        "optimizer": {"lr": 1e-1, "warmup_steps": 0, "weight_decay": 0.0},
        "train": {"steps": steps, "batch_size": 8},
        "checkpoint": {"every": 2, "keep": 10},
        "log": {"every": 1, "eval_every": 100, "eval_batches": 1, "progress": False,
                "tensorboard": False, "plot": False},
    }, source="test recipe")


def test_a_short_run_raises_the_reward(tmp_path, base_dir, prompts_file):  # noqa: F811
    ft_lib.finetune(grpo_recipe(base_dir, prompts_file, 12), tmp_path)
    records = read_metrics(tmp_path)
    rewards = [r["reward"] for r in records]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:2]) + 0.02, rewards
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5) and records[-1]["kl"] > 0
    assert {"entropy", "clip_fraction", "rollout_s", "train_s", "reward/share_of_e"} \
        <= records[-1].keys()
    assert records[-1]["eval_reward"] is not None  # greedy on the held-out prompts
    assert records[-1]["eval_ref_reward"] is not None  # the same for the starting model


def test_grpo_resume_after_sigterm_is_bitwise_equal(tmp_path, base_dir, prompts_file,  # noqa: F811
                                                    monkeypatch):
    recipe = grpo_recipe(base_dir, prompts_file, 4)
    straight = ft_lib.finetune(recipe, tmp_path / "straight")
    stopped, resumed = stop_then_resume(recipe, tmp_path / "resumed", monkeypatch, 1)
    assert stopped.stopped_by == "SIGTERM" and stopped.last_checkpoint == stopped.step == 1
    assert resumed.resumed_from == 1 and resumed.step == 4
    assert resumed.data_state == straight.data_state
    assert_same_state(tmp_path / "straight", tmp_path / "resumed")


def test_a_raising_reward_names_function_and_sample(tmp_path, base_dir,  # noqa: F811
                                                    prompts_file):
    CALLS["n"] = 0
    recipe = grpo_recipe(base_dir, prompts_file, 6,
                         rewards=["tests.train.test_grpo:fails_from_third_call"])
    with pytest.raises(RewardError, match=r"reward function tests\.train\.test_grpo:"
                                          r"fails_from_third_call raised on sample 0 \(prompt "):
        ft_lib.finetune(recipe, tmp_path)
    from flaxlm.train.checkpoint import Checkpoints
    from flaxlm.train.recipe import CheckpointConfig

    checkpoints = Checkpoints(tmp_path, CheckpointConfig(async_save=False))
    assert checkpoints.latest_step() == 2     # steps 1 and 2 scored; step 3 raised
    checkpoints.close()


@pytest.mark.parametrize("settings, message", [
    ({"grpo_num_generations": 1}, "grpo_num_generations must be >= 2"),
    ({"rewards": ["no_colon"]}, "must name callables"),
    ({"reward_weights": [1.0, 2.0]}, "2 weights for 1 rewards"),
])
def test_bad_grpo_settings_are_refused(base_dir, prompts_file, settings, message):  # noqa: F811
    with pytest.raises(Exception, match=message):
        grpo_recipe(base_dir, prompts_file, 2, **settings)


def test_an_unknown_reward_function_is_refused_before_compiling(tmp_path, base_dir,  # noqa: F811
                                                               prompts_file):
    recipe = grpo_recipe(base_dir, prompts_file, 2,
                         rewards=["tests.train.test_grpo:no_such_reward"])
    with pytest.raises(Exception, match=r"cannot import 'tests.train.test_grpo:no_such_reward'"):
        ft_lib.prepare_finetune(recipe, tmp_path)
