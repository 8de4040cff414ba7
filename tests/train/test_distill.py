"""Distillation on tiny random llamas: the loss is alpha T^2 KL + (1 - alpha) CE computed in
PyTorch from the same HF weights, a student identical to its teacher has zero KL (a run's
first step), an int8 teacher works, and a teacher with another tokenizer is refused before
anything compiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from flaxlm.model import load
from flaxlm.model.errors import ConfigError
from flaxlm.train import distill
from flaxlm.train import finetune as ft_lib
from flaxlm.train.data import Batch
from flaxlm.train.metrics import read_metrics
from flaxlm.train.recipe import Recipe

from tests.hf_models import make_hf_model, save_tokenizer
from tests.train.test_dpo import base_dir  # noqa: F401 (fixture)
from tests.train.test_finetune import chats, save_chat_tokenizer  # noqa: F401 (fixture)

T, ALPHA = 2.0, 0.3


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """Another random llama of the same shape with the student's tokenizer."""
    directory = tmp_path_factory.mktemp("teacher")
    make_hf_model("llama-gqa", seed=4).save_pretrained(directory, safe_serialization=True)
    save_chat_tokenizer(directory)
    return directory


def fixed_batch() -> Batch:
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 300, (3, 17)).astype(np.int32)
    segments = np.ones_like(tokens)
    segments[2, 12:] = 0                                   # padding
    loss_mask = (rng.random(tokens.shape) < 0.7).astype(np.int32)
    positions = np.broadcast_to(np.arange(17, dtype=np.int32), tokens.shape).copy()
    return Batch(tokens=tokens, segment_ids=segments, positions=positions, loss_mask=loss_mask)


def sums(student_dir, teacher_dir, quantize=None):  # noqa: F811
    graphdef, params, frozen = nnx.split(load(student_dir)[0], nnx.Param, ...)
    teacher_graphdef, teacher = nnx.split(load(teacher_dir, quantize=quantize)[0])
    return distill.distill_sums(graphdef, params, fixed_batch(), frozen, teacher_graphdef,
                                teacher, None, temperature=T, alpha=ALPHA)


def test_loss_is_the_stated_mix_of_kl_and_ce(base_dir, teacher_dir):  # noqa: F811
    import transformers

    batch = fixed_batch()
    logits = {}
    for name, directory in (("student", base_dir), ("teacher", teacher_dir)):
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            logits[name] = hf(input_ids=torch.as_tensor(batch.tokens[:, :-1], dtype=torch.long),
                              attention_mask=torch.as_tensor(batch.segment_ids[:, :-1])).logits
    teacher_t = F.log_softmax(logits["teacher"] / T, -1)
    kl = (teacher_t.exp() * (teacher_t - F.log_softmax(logits["student"] / T, -1))).sum(-1)
    ce = F.cross_entropy(logits["student"].transpose(1, 2),
                         torch.as_tensor(batch.tokens[:, 1:], dtype=torch.long), reduction="none")
    mask = torch.as_tensor((batch.loss_mask[:, 1:] == 1) & (batch.segment_ids[:, 1:] == 1))
    expected = ((ALPHA * T ** 2 * kl + (1 - ALPHA) * ce) * mask).sum() / mask.sum()

    ours = sums(base_dir, teacher_dir)
    assert float(ours.count) == mask.sum().item()
    np.testing.assert_allclose(float(ours.total / ours.count), expected.item(), rtol=1e-5)
    np.testing.assert_allclose(float(ours.extra["kl"]), (kl * mask).sum().item(), rtol=1e-5)
    np.testing.assert_allclose(float(ours.extra["ce"]), (ce * mask).sum().item(), rtol=1e-5)
    assert float(ours.extra["kl"]) > 1e-3


def test_identical_teacher_has_zero_kl_and_int8_teacher_is_close(base_dir):  # noqa: F811
    same = sums(base_dir, base_dir)
    assert abs(float(same.extra["kl"])) <= 1e-6 * float(same.count)
    int8 = sums(base_dir, base_dir, quantize="int8")
    assert 0 < float(int8.extra["kl"]) / float(int8.count) < 1e-2


def distill_recipe(base_dir, chats, teacher, **finetune) -> Recipe:  # noqa: F811
    return Recipe.from_dict({
        "finetune": {"base": str(base_dir), "method": "lora", "objective": "distill",
                     "distill_teacher": str(teacher), "distill_alpha": 1.0,
                     "lora_rank": 4, "lora_alpha": 8.0, "report_examples": 0, **finetune},
        "data": {"files": [str(chats)], "seq_len": 48, "eval_fraction": 0.1},
        "optimizer": {"lr": 3e-2, "warmup_steps": 0, "weight_decay": 0.0},
        "train": {"steps": 2, "batch_size": 8},
        "checkpoint": {"every": 2, "keep": 2},
        "log": {"every": 1, "eval_every": 2, "eval_batches": 1, "progress": False,
                "tensorboard": False, "plot": False},
    }, source="test recipe")


def test_a_run_with_its_own_weights_as_teacher_starts_at_zero(tmp_path, base_dir,  # noqa: F811
                                                            chats, teacher_dir):
    ft_lib.finetune(distill_recipe(base_dir, chats, base_dir), tmp_path / "self")
    first = read_metrics(tmp_path / "self")[0]
    assert first["loss"] == pytest.approx(0.0, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["ce"] > 1.0
    ft_lib.finetune(distill_recipe(base_dir, chats, teacher_dir), tmp_path / "other")
    records = read_metrics(tmp_path / "other")
    assert records[0]["kl"] > 1e-3 and records[-1]["kl"] < records[0]["kl"]
    assert records[-1]["eval_kl"] is not None and records[-1]["eval_ce"] is not None


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, base_dir, chats,  # noqa: F811
                                                     monkeypatch):
    other = tmp_path / "other-tokenizer"
    make_hf_model("llama-gqa", seed=4).save_pretrained(other, safe_serialization=True)
    save_tokenizer(other, 300)
    compiled = []
    monkeypatch.setattr(distill, "compile_objective", lambda *a, **k: compiled.append(1))
    with pytest.raises(ConfigError, match="its tokenizer differs from the student's"):
        ft_lib.prepare_finetune(distill_recipe(base_dir, chats, other), tmp_path / "run")
    assert not compiled
    with pytest.raises(ConfigError, match="needs finetune.distill_teacher"):
        distill_recipe(base_dir, chats, "")


def test_a_new_student_learns_from_its_teacher(tmp_path, base_dir, chats):  # noqa: F811
    """finetune.base = "": a student of the [model] table (smaller than the teacher) with the
    [tokenizer] source's tokenizer; distillation (alpha 0.5) lowers its KL to the teacher."""
    recipe = distill_recipe("", chats, base_dir, method="full", distill_alpha=0.5).to_dict()
    recipe["model"] = dict(vocab_size=320, embed_dim=32, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64)
    recipe["tokenizer"] = {"source": str(base_dir)}
    recipe["train"]["steps"] = 4
    recipe["checkpoint"]["every"] = 4
    recipe["log"]["eval_every"] = 4
    ft_lib.finetune(Recipe.from_dict(recipe, source="r"), tmp_path)
    records = read_metrics(tmp_path)
    assert records[-1]["kl"] < records[0]["kl"] and records[-1]["eval_ce"] is not None
    no_tokenizer = {**recipe, "tokenizer": {"source": "train"}}
    with pytest.raises(ConfigError, match=r"set \[tokenizer\] source"):
        ft_lib.prepare_finetune(Recipe.from_dict(no_tokenizer, source="r"), tmp_path / "x")
