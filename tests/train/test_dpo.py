"""DPO on a tiny random llama: the loss and its gradient equal a PyTorch computation of TRL's
formula from the same HF weights (LoRA with the adapters switched off as the reference, as
TRL does for a PEFT model; and a full model against another model), resume after SIGTERM is
bitwise equal to a straight run, and the run's metrics."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from flaxlm.model import load
from flaxlm.train import dpo
from flaxlm.train import finetune as ft_lib
from flaxlm.train.data import Batch
from flaxlm.train.metrics import read_metrics
from flaxlm.train.recipe import Recipe

from tests.hf_models import make_hf_model
from tests.train.resume import assert_same_state, stop_then_resume
from tests.train.test_finetune import WORDS, save_chat_tokenizer

BETA, SMOOTHING = 0.5, 0.1


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat-llama")
    make_hf_model("llama-gqa", seed=3).save_pretrained(directory, safe_serialization=True)
    save_chat_tokenizer(directory)
    return directory


def pair_batch(pairs: int = 3, width: int = 20, seed: int = 1) -> Batch:
    """Rows chosen, rejected, ... sharing a 6-token prompt; the reply is trained; row
    lengths differ (the rest is padding, segment 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 300, (2 * pairs, width)).astype(np.int32)
    tokens[1::2, :6] = tokens[0::2, :6]
    lengths = rng.integers(10, width + 1, 2 * pairs)
    columns = np.arange(width)
    segments = (columns[None] < lengths[:, None]).astype(np.int32)
    loss_mask = ((columns[None] >= 6) & (segments == 1)).astype(np.int32)
    return Batch(tokens=tokens, segment_ids=segments,
                 positions=np.broadcast_to(columns, tokens.shape).astype(np.int32).copy(),
                 loss_mask=loss_mask)


def torch_logps(model, batch: Batch) -> torch.Tensor:
    """Summed log-probs of the trained tokens per row (TRL's `per_token_logps.sum(1)`)."""
    tokens = torch.as_tensor(batch.tokens, dtype=torch.long)
    logits = model(input_ids=tokens,
                   attention_mask=torch.as_tensor(batch.segment_ids, dtype=torch.long)).logits
    logps = torch.gather(F.log_softmax(logits[:, :-1].float(), -1), 2,
                         tokens[:, 1:, None])[..., 0]
    mask = torch.as_tensor((batch.loss_mask[:, 1:] != 0) & (batch.segment_ids[:, 1:] != 0))
    return (logps * mask).sum(1)


def trl_sigmoid_loss(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """TRL's DPO loss (trl/trainer/dpo_trainer.py `_compute_loss`): chosen and rejected
    log-ratios, delta = their difference, the label-smoothed sigmoid loss (TRL's form
    `-logsigmoid(beta d) (1 - ls) - logsigmoid(-beta d) ls`; TRL 1.x's "sigmoid" is its
    ls = 0 case), mean over pairs."""
    chosen = policy[0::2] - reference[0::2]
    rejected = policy[1::2] - reference[1::2]
    delta = chosen - rejected
    losses = (-F.logsigmoid(BETA * delta) * (1 - SMOOTHING)
              - F.logsigmoid(-BETA * delta) * SMOOTHING)
    return losses.mean()


def ours(graphdef, params, frozen, reference, batch):
    def total(p):
        sums = dpo.pair_sums(graphdef, p, reference, jax.tree.map(np.asarray, batch), frozen,
                             None, BETA, SMOOTHING)
        return sums.total / sums.count, sums

    (loss, sums), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
    return float(loss), sums, grads


def test_lora_dpo_loss_and_gradient_equal_trl_formula(tmp_path, base_dir):
    """Policy: the base with a random LoRA adapter (A and B non-zero, PEFT
    init_lora_weights=False); reference: the same model with the adapters disabled
    (TRL's PEFT reference, `disable_adapter`). The adapters' gradients are read back
    through a PEFT directory whose tensors are torch's gradients."""
    import peft
    import transformers

    from flaxlm.model.lora import lora_filter
    from flaxlm.model.peft_io import load_adapter

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                           attn_implementation="eager")
    policy = peft.get_peft_model(hf, peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    policy.save_pretrained(tmp_path / "adapter")
    batch = pair_batch()
    with torch.no_grad(), policy.disable_adapter():
        reference_logps = torch_logps(policy, batch)
    loss = trl_sigmoid_loss(torch_logps(policy, batch), reference_logps)
    loss.backward()
    for p in policy.parameters():
        if p.requires_grad:
            p.data = p.grad.clone()
    policy.save_pretrained(tmp_path / "grads")

    model, _ = load(base_dir)
    load_adapter(model, tmp_path / "adapter")
    graphdef, params, frozen = nnx.split(model, lora_filter, ...)
    value, sums, grads = ours(graphdef, params, frozen, dpo.reference_of(params, "lora"), batch)
    grads_model, _ = load(base_dir)
    load_adapter(grads_model, tmp_path / "grads")
    theirs = dict(nnx.to_flat_state(nnx.state(grads_model, lora_filter)))
    mine = dict(nnx.to_flat_state(grads))
    assert mine.keys() == theirs.keys() and len(mine) == 28

    np.testing.assert_allclose(value, loss.item(), rtol=1e-5)
    assert abs(value - np.log(2)) > 1e-3  # the policy differs from the reference
    flat_mine = np.concatenate([np.asarray(mine[k]).ravel() for k in sorted(mine)])
    flat_theirs = np.concatenate([np.asarray(theirs[k][...]).ravel() for k in sorted(mine)])
    relative = np.linalg.norm(flat_mine - flat_theirs) / np.linalg.norm(flat_theirs)
    assert np.linalg.norm(flat_theirs) > 1e-4 and relative <= 1e-5, relative
    assert float(sums.count) == 3


def test_full_dpo_loss_and_gradient_norm_equal_trl_formula(base_dir, tmp_path):
    """Full fine-tuning: policy and reference are two different random models; the metrics
    (implicit rewards, margin, accuracy) are TRL's."""
    import transformers

    other = tmp_path / "other"
    make_hf_model("llama-gqa", seed=4).save_pretrained(other, safe_serialization=True)
    batch = pair_batch(pairs=4, seed=2)
    hf_policy = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, attn_implementation="eager")
    hf_reference = transformers.AutoModelForCausalLM.from_pretrained(
        other, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        reference_logps = torch_logps(hf_reference, batch)
    policy_logps = torch_logps(hf_policy, batch)
    loss = trl_sigmoid_loss(policy_logps, reference_logps)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in hf_policy.parameters())).item()

    graphdef, params, frozen = nnx.split(load(base_dir)[0], nnx.Param, ...)
    _, reference, _ = nnx.split(load(other)[0], nnx.Param, ...)
    value, sums, grads = ours(graphdef, params, frozen, reference, batch)
    np.testing.assert_allclose(value, loss.item(), rtol=1e-5)
    norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads))))
    np.testing.assert_allclose(norm, grad_norm, rtol=1e-4)
    with torch.no_grad():
        chosen = BETA * (policy_logps[0::2] - reference_logps[0::2])
        rejected = BETA * (policy_logps[1::2] - reference_logps[1::2])
    expected = {"chosen_reward": chosen.sum(), "rejected_reward": rejected.sum(),
                "margin": (chosen - rejected).sum(), "accuracy": (chosen > rejected).sum(),
                "logp_accuracy": (policy_logps[0::2] > policy_logps[1::2]).sum(),
                "ref_logp_accuracy": (reference_logps[0::2] > reference_logps[1::2]).sum()}
    for name, value in expected.items():
        np.testing.assert_allclose(float(sums.extra[name]), float(value), rtol=1e-4,
                                   atol=1e-5, err_msg=name)


def test_padding_pairs_do_not_count(base_dir):
    """An eval batch padded with empty pairs gives the same sums as the real pairs alone."""
    graphdef, params, frozen = nnx.split(load(base_dir)[0], nnx.Param, ...)
    reference = jax.tree.map(lambda x: x * 0.9, params)
    batch = pair_batch(pairs=2)
    padded = jax.tree.map(lambda x: np.concatenate([x, np.zeros_like(x[:2])]), batch)
    _, sums, _ = ours(graphdef, params, frozen, reference, batch)
    _, padded_sums, _ = ours(graphdef, params, frozen, reference, padded)
    assert float(padded_sums.count) == float(sums.count) == 2
    for a, b in zip(jax.tree.leaves(sums), jax.tree.leaves(padded_sums), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# ---------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """36 pairs (the reply "blue" is preferred to any other word) and 2 identical ones."""
    rng = np.random.default_rng(0)
    others = [w for w in WORDS if w != "blue"]
    lines = []
    for _ in range(36):
        words = [str(w) for w in rng.choice(WORDS, 3)]
        lines.append({"prompt": " ".join(words), "chosen": "blue",
                      "rejected": str(rng.choice(others))})
    lines += [{"messages": [{"role": "user", "content": "red"}], "chosen": "red",
               "rejected": "red"}] * 2
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def dpo_recipe(base_dir, pairs_file, steps: int = 4, **finetune) -> Recipe:
    return Recipe.from_dict({
        "finetune": {"base": str(base_dir), "method": "lora", "objective": "dpo",
                     "lora_rank": 4, "lora_alpha": 8.0, "dpo_beta": BETA,
                     "report_examples": 0, **finetune},
        "data": {"files": [str(pairs_file)], "seq_len": 24, "eval_fraction": 0.2},
        "optimizer": {"lr": 3e-2, "warmup_steps": 0, "weight_decay": 0.0},
        "train": {"steps": steps, "batch_size": 16, "grad_accum": 2},
        "checkpoint": {"every": 2, "keep": 5},
        "log": {"every": 1, "eval_every": 2, "eval_batches": 2, "progress": False,
                "tensorboard": False, "plot": False},
    }, source="test recipe")


def test_dpo_resume_after_sigterm_is_bitwise_equal(tmp_path, base_dir, pairs_file, monkeypatch,
                                                   capsys):
    """LoRA with dropout (the step RNG matters): SIGTERM during step 1's logging saves and
    stops; the same call resumes; the end state equals a straight run's bit for bit. The
    identical pairs are counted and dropped; the metrics carry DPO's rewards."""
    recipe = dpo_recipe(base_dir, pairs_file, lora_dropout=0.2)
    straight = ft_lib.finetune(recipe, tmp_path / "straight")
    assert "2 dropped as identical (chosen == rejected)" in capsys.readouterr().out
    records = read_metrics(tmp_path / "straight")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference
    # the first step's policy is the reference (up to float rounding between two programs)
    assert records[0]["margin"] == pytest.approx(0.0, abs=1e-5)
    assert abs(records[-1]["margin"]) > 1e-3
    assert {"eval_accuracy", "eval_margin", "eval_logp_accuracy"} <= records[1].keys()
    assert records[1]["eval_ppl"] is None
    stopped, resumed = stop_then_resume(recipe, tmp_path / "resumed", monkeypatch, 1)
    assert stopped.stopped_by == "SIGTERM" and stopped.last_checkpoint == stopped.step == 1
    assert resumed.resumed_from == 1 and resumed.step == 4
    assert resumed.data_state == straight.data_state
    assert_same_state(tmp_path / "straight", tmp_path / "resumed")
    with pytest.raises(Exception, match="cannot resume: finetune.dpo_beta was 0.5"):
        ft_lib.prepare_finetune(dpo_recipe(base_dir, pairs_file, lora_dropout=0.2,
                                           dpo_beta=0.2), tmp_path / "resumed")


def test_full_dpo_learns_the_preference(tmp_path, base_dir, pairs_file):
    """Full fine-tuning (the reference a copy of the start): over a few steps the training
    loss falls and the held-out pairs are preferred (margin > 0, loss below log 2)."""
    recipe = dpo_recipe(base_dir, pairs_file, steps=6, method="full")
    recipe = Recipe.from_dict({**recipe.to_dict(), "optimizer": {
        **recipe.to_dict()["optimizer"], "lr": 1e-2}}, source="r")
    ft_lib.finetune(recipe, tmp_path / "full")
    records = read_metrics(tmp_path / "full")
    evals = [r for r in records if r["eval_loss"] is not None]
    assert evals[-1]["eval_margin"] > 0 and evals[-1]["eval_loss"] < np.log(2)
    assert records[-1]["loss"] < records[0]["loss"]
