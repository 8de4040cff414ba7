"""`flaxlm train --dry-run`: memory per device from shapes and shardings, no training."""

from __future__ import annotations

import re

import pytest

from flaxlm.model.cli import main
from flaxlm.train.dryrun import activation_formula, memory_plan

from tests.train.conftest import tiny_recipe, to_toml

MODEL = {"num_heads": 4, "num_kv_heads": 2}


def _bytes(text: str, row: str) -> int:
    line = next(line for line in text.splitlines() if line.strip().startswith(row))
    return int(re.search(r"\(([\d,]+) bytes\)", line).group(1).replace(",", ""))


@pytest.mark.parametrize("mesh", ["data=8", "fsdp=8"])
def test_dry_run_prints_memory_per_device_and_does_not_train(capsys, monkeypatch, tmp_path, mesh):
    from flaxlm.train import loop as loop_lib

    monkeypatch.setattr(loop_lib, "train", lambda *a, **k: pytest.fail("the dry run trained"))
    recipe = tiny_recipe(tmp_path / "no-corpus", model=MODEL, train={"mesh": mesh})
    (tmp_path / "recipe.toml").write_text(to_toml(recipe))
    out_dir = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "recipe.toml"), "--out", str(out_dir),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not out_dir.exists()  # nothing written, no data read (the corpus does not exist)
    plan = memory_plan(recipe, compile=False)
    num_params = plan.num_params
    assert f"{num_params:,} parameters" in out and "(8 devices)" in out
    # float32 parameters: 4 bytes each, over 8 devices under FSDP, a full copy under DP.
    assert _bytes(out, "parameters") == num_params * 4 // (8 if mesh == "fsdp=8" else 1)
    # AdamW: two moments like the parameters, plus a few scalars (counts, step, RNG key).
    assert 0 <= _bytes(out, "optimizer state") - 2 * _bytes(out, "parameters") < 64
    assert "activations (compiled)" in out  # XLA's memory analysis is available on CPU
    assert _bytes(out, "activations") > 0
    assert _bytes(out, "total") == sum(_bytes(out, row) for row in
                                       ("parameters", "optimizer state", "activations"))


def test_dry_run_plans_for_devices_that_are_not_here(capsys, tmp_path):
    """A 64-device plan on 8 CPU devices: abstract mesh, formula activations."""
    recipe = tiny_recipe(tmp_path, model={**MODEL, "embed_dim": 64, "head_dim": 16},
                         train={"mesh": "data=2,fsdp=32", "batch_size": 64})
    plan = memory_plan(recipe, num_devices=64)
    assert plan.mesh == {"data": 2, "fsdp": 32, "expert": 1, "tensor": 1}
    assert plan.activation_source == "formula"
    assert plan.param_bytes == plan.num_params * 4 // 32
    assert plan.activation_bytes == activation_formula(recipe.model_config(), recipe, plan.mesh)
    remat = memory_plan(tiny_recipe(tmp_path, model={**MODEL, "embed_dim": 64, "remat": "full"},
                                    train={"mesh": "data=2,fsdp=32", "batch_size": 64}),
                        num_devices=64)
    assert remat.activation_bytes < plan.activation_bytes


def test_recipe_rules_override_the_table(tmp_path):
    from flaxlm.model import ConfigError

    base = dict(model=MODEL, train={"mesh": "fsdp=8"})
    sharded = memory_plan(tiny_recipe(tmp_path, **base), compile=False)
    replicated = memory_plan(tiny_recipe(tmp_path, model=MODEL,
                                         train={"mesh": "fsdp=8", "rules": ["embed=none"]}),
                             compile=False)
    assert replicated.param_bytes == 8 * sharded.param_bytes
    recipe = tiny_recipe(tmp_path, model=MODEL, train={"rules": ["mlp=fsdp+tensor", "vocab=none"]})
    table = dict(recipe.train.sharding_rules)
    assert table["mlp"] == ("fsdp", "tensor") and table["vocab"] is None
    assert table["heads"] == "tensor"  # the rest from RULES
    from flaxlm.train.recipe import Recipe

    assert Recipe.from_dict(recipe.to_dict()).train.rules == recipe.train.rules  # run.json
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        tiny_recipe(tmp_path, train={"rules": ["mlp=model"]})
    with pytest.raises(ConfigError, match="NAME=AXIS"):
        tiny_recipe(tmp_path, train={"rules": ["mlp"]})
