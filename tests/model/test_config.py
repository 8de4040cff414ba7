"""Every preset loads; eval_shape parameter counts equal the HF model's of the same config."""

import dataclasses

import numpy as np
import pytest
import torch
import transformers

from flaxlm.model import ConfigError, ModelConfig, abstract_model, param_stats, preset_names
from flaxlm.model.hf_config import config_from_hf
from flaxlm.model.hf_export import config_to_hf

REQUIRED = {"smollm2-135m", "smollm2-360m", "smollm2-1.7b", "llama-3.2-1b", "gpt2",
            "qwen3-0.6b", "gemma-2-2b", "gemma-3-1b", "phi-3-mini-4k", "smollm3-3b",
            "mixtral-8x7b", "qwen3-30b-a3b"}
# Published parameter counts (tied embeddings counted once).
KNOWN_COUNTS = {"smollm2-135m": 134_515_008, "gpt2": 124_439_808,
                "qwen3-0.6b": 596_049_920, "gemma-2-2b": 2_614_341_888,
                "gemma-3-1b": 999_885_952, "phi-3-mini-4k": 3_821_079_552,
                "smollm3-3b": 3_075_098_624, "mixtral-8x7b": 46_702_792_704,
                "qwen3-30b-a3b": 30_532_122_624}


def test_required_presets_exist():
    assert REQUIRED <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_preset_param_count_matches_hf(name):
    cfg = ModelConfig.preset(name)
    count, by_dtype = param_stats(abstract_model(cfg))  # nothing allocated
    assert by_dtype == {"float32": 4 * count}
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(cfg))
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf_count = sum(p.numel() for p in hf_model.parameters())
    assert count == hf_count
    if name in KNOWN_COUNTS:
        assert count == KNOWN_COUNTS[name]
    # and the HF config reads back as the same ModelConfig
    assert config_from_hf(hf_config.to_dict(), name) == cfg


def test_bfloat16_params():
    cfg = ModelConfig.preset("tiny-llama").replace(param_dtype="bfloat16", dtype="bfloat16")
    count, by_dtype = param_stats(abstract_model(cfg))
    assert by_dtype == {"bfloat16": 2 * count}


def test_unknown_setting_suggests_nearest():
    data = dataclasses.asdict(ModelConfig.preset("tiny-llama"))
    data["num_layer"] = data.pop("num_layers")
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("change, message", [
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(norm="batchnorm"), "norm"),
    (dict(dtype="int4"), "dtype"),
    (dict(head_dim=15), "even rotary dimension"),
    (dict(embed_dim=0), "embed_dim must be >= 1"),
])
def test_invalid_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.preset("tiny-llama").replace(**change)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'smollm2-135'.*did you mean"):
        ModelConfig.preset("smollm2-135")


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        ModelConfig.from_toml(bad)
    with pytest.raises(ConfigError, match="missing.toml"):
        ModelConfig.from_toml(tmp_path / "missing.toml")
    np.testing.assert_equal(ModelConfig.from_toml(
        __import__("importlib").resources.files("flaxlm.configs") / "models" / "gpt2.toml"),
        ModelConfig.preset("gpt2"))
