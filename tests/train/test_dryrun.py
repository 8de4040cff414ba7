"""`flaxlm train --dry-run`: memory per device from shapes and shardings, no training."""

from __future__ import annotations

import re

import pytest

from flaxlm.model.cli import main
from flaxlm.train.dryrun import memory_plan

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
    # Parameters of the test model (vocab 320, embed 32, 4 heads and 2 kv heads of 16,
    # mlp 64, 2 layers, untied), counted by hand: embedding 320*32 = 10,240; per layer
    # q 32*64 + k 32*32 + v 32*32 + o 64*32 = 6,144, gate/up/down 3*32*64 = 6,144,
    # two norms 64: 12,352, times 2 = 24,704; final norm 32; LM head 10,240. Total 45,216.
    assert "45,216 parameters" in out and "(8 devices)" in out
    # float32: 4 bytes each = 180,864, over 8 devices under FSDP (22,608), a full copy under DP.
    assert _bytes(out, "parameters") == (22_608 if mesh == "fsdp=8" else 180_864)
    # AdamW's two moments like the parameters, plus its two int32 step counts (adam,
    # schedule), the int32 train step and the uint32[2] RNG key: 8 + 4 + 8 = 20 bytes.
    assert _bytes(out, "optimizer state") == 2 * _bytes(out, "parameters") + 20
    assert "activations (compiled)" in out  # XLA's memory analysis is available on CPU
    assert _bytes(out, "activations") > 0
    assert _bytes(out, "total") == sum(_bytes(out, row) for row in
                                       ("parameters", "optimizer state", "activations"))
    lowered, compiled = map(float, re.search(
        r"train step: lowered in ([\d.]+) s, compiled in ([\d.]+) s", out).groups())
    assert lowered > 0 and compiled > 0


def test_dry_run_plans_for_devices_that_are_not_here(capsys, tmp_path):
    """A 64-device plan on 8 CPU devices: abstract mesh, formula activations."""
    recipe = tiny_recipe(tmp_path, model={**MODEL, "embed_dim": 64, "head_dim": 16},
                         train={"mesh": "data=2,fsdp=32", "batch_size": 64})
    plan = memory_plan(recipe, num_devices=64)
    assert plan.mesh == {"data": 2, "fsdp": 32, "expert": 1, "tensor": 1}
    assert plan.activation_source == "formula"
    assert plan.compile_seconds is None and "train step:" not in plan.report()
    # Parameters (vocab 320, embed 64, 4 heads and 2 kv heads of 16, mlp 64, 2 layers,
    # untied), by hand: embedding 320*64 = 20,480; per layer q 64*64 + k 64*32 + v 64*32 +
    # o 64*64 = 12,288, gate/up/down 3*64*64 = 12,288, two norms 128: 24,704, times 2 =
    # 49,408; final norm 64; LM head 20,480. Total 90,432; every one splits along embed
    # over fsdp=32: 90,432 * 4 bytes / 32 = 11,304 per device.
    assert plan.num_params == 90_432 and plan.param_bytes == 11_304
    # The formula of flaxlm/train/dryrun.py, by hand: tokens per device = micro-batch 64 *
    # seq_len 32 / (data 2 * fsdp 32) = 32. Per layer: 32 * (4 bytes * (6*64 embed +
    # 4*64 q_dim + 3*64 mlp) + 4 bytes * 4 heads * 32 seq) = 32 * (3,328 + 512) = 122,880;
    # 2 layers: 245,760. Logits: 3 copies * 32 tokens * 320 vocab * 4 bytes = 122,880.
    assert plan.activation_bytes == 245_760 + 122_880
    remat = memory_plan(tiny_recipe(tmp_path, model={**MODEL, "embed_dim": 64, "remat": "full"},
                                    train={"mesh": "data=2,fsdp=32", "batch_size": 64}),
                        num_devices=64)
    # With remat, one layer (122,880) plus each layer's input (2 * 32 tokens * 64 * 4 bytes
    # = 16,384) and the same logits.
    assert remat.activation_bytes == 122_880 + 16_384 + 122_880


def test_dry_run_compiles_the_scanned_step(tmp_path):
    """model.scan_layers: the same state per device, the step compiled with the scan."""
    plans = [memory_plan(tiny_recipe(tmp_path, model={**MODEL, "num_layers": 4,
                                                      "scan_layers": scan}))
             for scan in (False, True)]
    assert [p.activation_source for p in plans] == ["compiled", "compiled"]
    assert plans[0].param_bytes == plans[1].param_bytes
    assert plans[0].optimizer_bytes == plans[1].optimizer_bytes
    assert all(p.compile_seconds > 0 for p in plans)


def test_dry_run_devices_flag(capsys, tmp_path):
    """`--dry-run --devices 64` plans the mesh of 64 devices from here (formula activations)."""
    recipe = tiny_recipe(tmp_path / "no-corpus", model={**MODEL, "embed_dim": 64, "head_dim": 16},
                         train={"mesh": "data=2,fsdp=-1", "batch_size": 64})
    (tmp_path / "recipe.toml").write_text(to_toml(recipe))
    assert main(["train", "--config", str(tmp_path / "recipe.toml"), "--dry-run",
                 "--devices", "64"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=2,fsdp=32,expert=1,tensor=1 (64 devices), 90,432 parameters" in out
    assert _bytes(out, "parameters") == 11_304  # as in the test above
    assert _bytes(out, "activations (formula)") == 245_760 + 122_880


def test_recipe_rules_override_the_table(tmp_path):
    from flaxlm.model import ConfigError

    base = dict(model=MODEL, train={"mesh": "fsdp=8"})
    sharded = memory_plan(tiny_recipe(tmp_path, **base), compile=False)
    replicated = memory_plan(tiny_recipe(tmp_path, model=MODEL,
                                         train={"mesh": "fsdp=8", "rules": ["embed=none"]}),
                             compile=False)
    assert (sharded.param_bytes, replicated.param_bytes) == (22_608, 180_864)  # see above
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
