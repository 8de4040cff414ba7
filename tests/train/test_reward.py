"""Reward models on a tiny random llama: Bradley-Terry training raises held-out pair accuracy,
the export is an HF LlamaForSequenceClassification that transformers loads with the same
rewards (1e-4), flaxlm.infer.reward scores texts and chats, and bad input is refused."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxlm.model.errors import CheckpointError, ConfigError
from flaxlm.model.reward import last_token_rewards, load_reward_model
from flaxlm.train import finetune as ft_lib
from flaxlm.train.metrics import read_metrics
from flaxlm.train.recipe import Recipe

from tests.train.test_dpo import base_dir, pairs_file  # noqa: F401 (fixtures)


def reward_recipe(base_dir, pairs_file, **finetune) -> Recipe:  # noqa: F811
    return Recipe.from_dict({
        "finetune": {"base": str(base_dir), "method": "lora", "objective": "reward",
                     "lora_rank": 4, "lora_alpha": 8.0, "report_examples": 0, **finetune},
        "data": {"files": [str(pairs_file)], "seq_len": 24, "eval_fraction": 0.2},
        "optimizer": {"lr": 2e-2, "warmup_steps": 0, "weight_decay": 0.0},
        "train": {"steps": 8, "batch_size": 8},
        "checkpoint": {"every": 8, "keep": 2},
        "log": {"every": 1, "eval_every": 4, "eval_batches": 2, "progress": False,
                "tensorboard": False, "plot": False},
    }, source="test recipe")


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, base_dir, pairs_file):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("reward-run")
    ft_lib.finetune(reward_recipe(base_dir, pairs_file), run_dir)
    return run_dir


def test_reward_model_learns_the_preference(reward_run):
    records = read_metrics(reward_run)
    evals = [r for r in records if r["eval_loss"] is not None]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["eval_accuracy"] == 1.0 and evals[-1]["eval_margin"] > 0.5
    assert evals[-1]["eval_loss"] < np.log(2) and records[-1]["loss"] < records[0]["loss"]


TEXTS = [[{"role": "user", "content": "red cat dog"}, {"role": "assistant", "content": "blue"}],
         [{"role": "user", "content": "red cat dog"}, {"role": "assistant", "content": "dog"}],
         [{"role": "user", "content": "one two three big small"},
          {"role": "assistant", "content": "green bird"}],
         "cat sat on the mat"]


def test_export_loads_in_transformers_with_the_same_rewards(tmp_path, reward_run):
    import transformers

    from flaxlm.infer.reward import RewardModel
    from flaxlm.model.cli import main

    assert main(["export", str(reward_run), str(tmp_path / "rm")]) == 0
    rm = RewardModel.load(tmp_path / "rm")
    ours = rm.score(TEXTS, batch_size=3)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm", dtype=torch.float32, attn_implementation="eager").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    ids = [rm.encode(t) for t in TEXTS]
    width = max(map(len, ids))
    pad = hf.config.pad_token_id
    tokens = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=mask).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert ours[0] > ours[1]                     # "blue" is preferred
    # the training program's rewards (LoRA unmerged) equal the merged export's
    model, _, _, _ = ft_lib.restore_finetuned(reward_run)
    row = np.asarray(ids[0])[None]
    trained = last_token_rewards(model, jnp.asarray(row), jnp.arange(row.shape[1])[None],
                                 jnp.ones_like(row))
    np.testing.assert_allclose(np.asarray(trained), ours[:1], atol=1e-4, rtol=0)


def test_a_checkpoint_without_a_score_head_is_refused(base_dir):  # noqa: F811
    with pytest.raises(CheckpointError, match=r"not a reward model: no score head"):
        load_reward_model(base_dir)


@pytest.mark.parametrize("settings, message", [
    ({"method": "prompt"}, "use method full or lora"),
    ({"quantize": "int8"}, "drop finetune.quantize"),
])
def test_bad_reward_settings_fail_before_loading(base_dir, pairs_file, settings,  # noqa: F811
                                                 message):
    with pytest.raises(ConfigError, match=message):
        reward_recipe(base_dir, pairs_file, **settings)
