"""Recipes: every shipped file loads, overrides apply, bad keys name the nearest valid key."""

from __future__ import annotations

import importlib.resources
import re

import jax
import pytest

from flaxlm.model import ConfigError, ModelConfig
from flaxlm.model.arithmetic import arithmetic_problems
from flaxlm.model.params import abstract_model
from flaxlm.train.recipe import Recipe, apply_override

RECIPES = sorted(p for p in (importlib.resources.files("flaxlm.configs") / "train").iterdir()
                 if p.name.endswith(".toml"))


def test_recipes_are_shipped():
    assert {p.name for p in RECIPES} >= {"tiny.toml", "smollm2-135m.toml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    recipe = Recipe.load(path)
    config = recipe.model_config()
    assert recipe.data.seq_len <= config.max_seq_len
    assert recipe.train.batch_size % recipe.train.grad_accum == 0
    model = abstract_model(config)  # shapes only: nothing is allocated
    assert jax.tree.leaves(model)


def test_smollm2_recipe_is_mixed_precision():
    """README: bfloat16 compute, float32 master weights, 2048-token sequences, 0.5M tokens
    per step, SmolLM2's own tokenizer."""
    recipe = Recipe.load(next(p for p in RECIPES if p.name == "smollm2-135m.toml"))
    config = recipe.model_config()
    assert (config.dtype, config.param_dtype) == ("bfloat16", "float32")
    assert config == ModelConfig.preset("smollm2-135m").replace(
        dtype="bfloat16", remat=config.remat)
    assert recipe.data.seq_len == 2048 and recipe.train.batch_size * 2048 == 2 ** 19
    assert recipe.tokenizer.source == "smollm2-135m-instruct"


def test_tiny_recipe_trains_its_own_tokenizer_on_the_stdlib():
    """README: tiny.toml trains a 512-token BPE (the model's vocabulary) on the standard
    library source (no data.files)."""
    recipe = Recipe.load(next(p for p in RECIPES if p.name == "tiny.toml"))
    assert recipe.data.files == () and recipe.tokenizer.source == "train"
    assert (recipe.tokenizer.vocab_size or recipe.model_config().vocab_size) == 512
    assert recipe.model_config() == ModelConfig.preset("tiny-llama").replace(
        dtype="float32", remat="none")


def test_overrides_parse_toml_values():
    path = next(p for p in RECIPES if p.name == "tiny.toml")
    recipe = Recipe.load(path, ("optimizer.lr=3e-4", "train.steps=7", "model.remat=\"full\"",
                                "data.files=[\"a/*.txt\", \"b.jsonl\"]", "log.progress=false",
                                "tokenizer.source=smollm2-135m-instruct"))
    assert recipe.optimizer.lr == 3e-4 and recipe.train.steps == 7
    assert recipe.model_config().remat == "full"
    assert recipe.data.files == ("a/*.txt", "b.jsonl")
    assert recipe.log.progress is False
    assert recipe.tokenizer.source == "smollm2-135m-instruct"


@pytest.mark.parametrize("item, hint", [
    ("optimizer.lrr=1", "optimizer.lr"),
    ("optimiser.lr=1", "optimizer.lr"),
    ("train.batchsize=8", "train.batch_size"),
    ("model.num_layer=2", "model.num_layers"),
])
def test_unknown_override_names_the_nearest_key(item, hint):
    with pytest.raises(ConfigError, match=f"did you mean '{hint}'"):
        apply_override({}, item)


def test_unknown_key_in_file_names_the_nearest_key(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[model]\npreset = "tiny-llama"\n[optimizer]\nwarmup_step = 3\n')
    with pytest.raises(ConfigError, match="did you mean 'optimizer.warmup_steps'"):
        Recipe.load(path)
    path.write_text('[model]\npreset = "tiny-llama"\n[optimiser]\nlr = 3\n')
    with pytest.raises(ConfigError, match=r"did you mean \[optimizer\]"):
        Recipe.load(path)


@pytest.mark.parametrize("item, message", [
    ("train.steps=abc", "train.steps must be int"),
    ("optimizer.lr=-1", "optimizer.lr must be > 0"),
    ("train.grad_accum=3", "not divisible by train.grad_accum"),
    ("data.format=csv", "data.format 'csv' is not one of"),
    ("model.preset=tiny-lama", "did you mean 'tiny-llama'"),
    ("model.remat=everything", "remat 'everything' is not one of"),
    ("train.steps", "expected section.key=value"),
])
def test_bad_values_are_config_errors(item, message):
    path = next(p for p in RECIPES if p.name == "tiny.toml")
    with pytest.raises(ConfigError, match=message) as info:
        Recipe.load(path, (item,))
    if item != "train.steps":  # not a key=value: the --set item itself is named
        assert str(info.value).startswith(f"{path}: "), info.value


@pytest.mark.parametrize("table, message", [
    ('[model]\npreset = "tiny-llama"\n[data]\nformat = "csv"', "data.format 'csv'"),
    ('[model]\npreset = "tiny-llama"\nnum_kv_heads = 3', "multiple of num_kv_heads"),
    ('[model]\npreset = "tiny-llama"\n[train]\nmesh = "data=x"', "mesh"),
    ('[model]\npreset = "tiny-llama"\n[optimizer]\nlr = "fast"', "optimizer.lr must be float"),
    ('[model\n', "cannot read recipe"),
])
def test_errors_in_a_recipe_file_name_the_file(tmp_path, table, message):
    path = tmp_path / "bad.toml"
    path.write_text(table + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        Recipe.load(path)
    assert str(path) in str(info.value) and str(info.value).count(str(path)) == 1, info.value


def test_round_trip_through_dict():
    recipe = Recipe.load(next(p for p in RECIPES if p.name == "tiny.toml"))
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_init_takes_the_shape_from_the_model():
    tiny = ModelConfig.preset("tiny-llama")
    recipe = Recipe.from_dict({"model": {"dtype": "bfloat16", "remat": "full"}})
    assert recipe.model_config(tiny) == tiny.replace(dtype="bfloat16", remat="full")
    with pytest.raises(ConfigError, match="needs a preset"):
        recipe.model_config()
    clash = Recipe.from_dict({"model": {"preset": "smollm2-135m"}})
    with pytest.raises(ConfigError, match="in the --init model"):
        clash.model_config(tiny)


FINETUNE = sorted(p for p in (importlib.resources.files("flaxlm.configs") / "finetune").iterdir()
                  if p.name.endswith(".toml"))


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: p.name)
def test_every_finetune_recipe_loads(path):
    """configs/finetune/smollm2-METHOD[-OBJECTIVE]-docstrings.toml: that method (and
    objective, SFT when not named) on the embedded SmolLM2,
    the docstrings task (no data.files), settings that fit SmolLM2-135M's shape."""
    recipe = Recipe.load(path)
    assert recipe.finetune.method == path.name.split("-")[1]
    assert recipe.data.files == ()
    if recipe.finetune.base:
        assert recipe.finetune.base == "smollm2-135m-instruct"
        config = recipe.model_config(ModelConfig.preset("smollm2-135m"))
    else:  # a new student with SmolLM2's tokenizer, distilled from SmolLM2
        assert recipe.tokenizer.source == recipe.finetune.distill_teacher == "smollm2-135m-instruct"
        config = recipe.model_config()
        assert config.vocab_size == ModelConfig.preset("smollm2-135m").vocab_size
    assert recipe.data.seq_len <= config.max_seq_len and config.dtype == "float32"
    assert recipe.finetune.objective == ("sft" if len(path.name.split("-")) == 3
                                         else path.name.split("-")[2])
    assert recipe.finetune.report_examples > 0 or recipe.finetune.objective != "sft"
    if recipe.finetune.objective in ("grpo", "ppo"):  # the arithmetic task holds its sizes
        ft = recipe.finetune
        for split, count in (("train", ft.arithmetic_train),
                             ("test", recipe.log.eval_batches * recipe.train.micro_batch)):
            assert len(arithmetic_problems(split, count, seed=recipe.data.seed,
                                           max_operand=ft.arithmetic_max_operand,
                                           operations=ft.arithmetic_operations)) == count


def test_finetune_table_is_checked():
    assert {p.name.split("-")[1] for p in FINETUNE} == {"full", "lora", "prompt"}
    base = {"finetune": {"method": "lora"}}
    assert Recipe.from_dict(base).finetune.lora_rank == 8
    assert Recipe.from_dict({}).finetune is None  # `flaxlm train` recipes have none
    for table, message in [({"method": "adapter"}, "is not one of full, lora, prompt"),
                           ({"lora_rank": -1}, "lora_rank must be > 0"),
                           ({"prompt_tokens": 0}, "prompt_tokens must be > 0"),
                           ({"method": "lora", "freeze": ["embed"]}, "freeze is for method full"),
                           ({"lora_targets": ["q_proj("]}, "is not a regular expression"),
                           ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
                           ({"objective": "kto"}, "finetune.objective 'kto' is not one of"),
                           ({"objective": "ppo", "method": "prompt"}, "use method full or lora"),
                           ({"dpo_beta": 0.0}, "dpo_beta must be > 0"),
                           ({"dpo_label_smoothing": 0.5}, "must be in [0, 0.5)")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            Recipe.from_dict({"finetune": table}, source="r.toml")
    with pytest.raises(ConfigError, match=r"r.toml: unknown setting 'finetune.lora_rnak' "
                                          r"\(did you mean 'finetune.lora_rank'\?\)"):
        Recipe.from_dict({"finetune": {"lora_rnak": 4}}, source="r.toml")
