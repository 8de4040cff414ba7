"""PEFT adapter directories in and out: flaxlm-made adapters load in HF PEFT with the same
logits, PEFT-made ones load in flaxlm, mismatches and unsupported features are named."""

import json

import numpy as np
import peft
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from flaxlm.model import CheckpointError, ConfigError, Tokenizer
from flaxlm.model.lora import LoraConfig, adapters, apply_lora
from flaxlm.model.peft_io import load_adapter, save_adapter
from flaxlm.model.prompt_tuning import PromptTuning, apply_prompt_tuning
from tests.hf_models import jitted, make_hf_model, save_tokenizer
from tests.peft_models import (SEQ, ids, load_base, peft_logits, peft_lora, peft_prompt,
                                 randomize_adapters, save_base)

EXPORT_ATOL = 1e-4  # the bound for flaxlm -> PEFT round trips
PEFT_ATOL = 1e-5    # PEFT-made adapters in flaxlm (the forward parity bound)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-gqa")
    save_base("llama-gqa", directory)
    save_tokenizer(directory, 320)
    return directory


def _hf_peft(directory, adapter_dir):
    return peft.PeftModel.from_pretrained(make_hf_model("llama-gqa"), adapter_dir).eval()


@pytest.mark.parametrize("targets,rslora", [
    (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), False),
    ((r"layers\.1\.attn\.(q|v)_proj", "down_proj"), True),  # a subset: a regex in the config
])
def test_export_loads_in_peft_with_equal_logits(tmp_path, llama_dir, targets, rslora):
    model = load_base(llama_dir)
    apply_lora(model, LoraConfig(rank=4, alpha=6, rslora=rslora, targets=targets), nnx.Rngs(0))
    randomize_adapters(model)
    save_adapter(model, tmp_path, base_model_name_or_path=str(llama_dir))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"],
            config["use_rslora"]) == ("LORA", "CAUSAL_LM", 4, 6, rslora)
    assert config["base_model_name_or_path"] == str(llama_dir)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (64, 4)
    reference = _hf_peft(llama_dir, tmp_path)
    loaded = {n for n, _ in reference.named_modules() if n.endswith(".lora_A.default")}
    assert len(loaded) == len(adapters(model))  # PEFT adapted exactly these modules
    tokens = ids(2, SEQ, model.config.vocab_size)
    assert np.abs(jitted(model)(tokens) - peft_logits(reference, tokens)).max() <= EXPORT_ATOL
    # ... and back into flaxlm, bit for bit.
    again = load_base(llama_dir)
    load_adapter(again, tmp_path)
    for path, lora in adapters(model).items():
        np.testing.assert_array_equal(adapters(again)[path].b[...], lora.b[...])


def test_peft_made_adapter_round_trips(tmp_path):
    reference = peft_lora("llama-gqa", r=3, lora_alpha=5)
    reference.save_pretrained(tmp_path / "peft")
    model_dir = tmp_path / "base"
    save_base("llama-gqa", model_dir)
    model = load_base(model_dir)
    load_adapter(model, tmp_path / "peft")
    save_adapter(model, tmp_path / "ours", base_model_name_or_path=str(model_dir))
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_phi3_fused_adapters_load_split(tmp_path):
    reference = peft_lora("phi3-window", target_modules=["qkv_proj", "o_proj", "gate_up_proj",
                                                         "down_proj"])
    reference.save_pretrained(tmp_path / "peft")
    save_base("phi3-window", tmp_path / "base")
    model = load_base(tmp_path / "base")
    load_adapter(model, tmp_path / "peft")
    assert len(adapters(model)) == 2 * 7  # q, k, v and gate, up each get the shared A
    tokens = ids(2, SEQ, model.config.vocab_size)
    assert np.abs(jitted(model)(tokens) - peft_logits(reference, tokens)).max() <= PEFT_ATOL


# ------------------------------------------------------------------ prompt tuning

def test_peft_prompt_tuning_loads_with_equal_logits(tmp_path, llama_dir):
    reference = peft_prompt("llama-gqa", num_virtual_tokens=5)
    reference.save_pretrained(tmp_path)
    model = load_base(llama_dir)
    assert load_adapter(model, tmp_path) == "prompt"
    tokens = ids(2, SEQ, model.config.vocab_size)
    ours = jitted(model)(tokens)
    assert ours.shape == (2, SEQ, model.config.vocab_size)
    assert np.abs(ours - peft_logits(reference, tokens)).max() <= PEFT_ATOL


def test_prompt_tuning_export_and_text_init_match_peft(tmp_path, llama_dir):
    model = load_base(llama_dir)
    tokenizer = Tokenizer.from_hf_dir(llama_dir)
    text = "def main(): return 42"
    apply_prompt_tuning(model, PromptTuning(num_virtual_tokens=7, init="text", init_text=text),
                        nnx.Rngs(0), tokenizer)
    # PEFT's own text init from the same tokenizer directory gives the same embeddings.
    reference_init = peft.get_peft_model(make_hf_model("llama-gqa"), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=str(llama_dir)))
    np.testing.assert_allclose(
        model.soft_prompt.embedding[...],
        reference_init.prompt_encoder["default"].embedding.weight.detach().numpy(), atol=0)
    model.soft_prompt.embedding[...] += 0.3  # trained
    save_adapter(model, tmp_path / "out", base_model_name_or_path=str(llama_dir))
    reference = _hf_peft(llama_dir, tmp_path / "out")
    tokens = ids(2, SEQ, model.config.vocab_size)
    assert np.abs(jitted(model)(tokens) - peft_logits(reference, tokens)).max() <= EXPORT_ATOL


# ------------------------------------------------------------------ bad input

def test_mismatched_base_names_tensor_and_shapes(tmp_path, llama_dir):
    peft_lora("qwen2-bias").save_pretrained(tmp_path)  # same shapes, fine ...
    model = load_base(llama_dir)
    load_adapter(model, tmp_path)
    # ... a wider model's adapter is not.
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    tensors[key] = np.zeros((48, 4), np.float32)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = load_base(llama_dir)
    with pytest.raises(CheckpointError, match=rf"tensor {key} has shape \(48, 4\), the model "
                                              r"needs \(32, 4\)"):
        load_adapter(model, tmp_path)
    assert not adapters(model)  # checked before anything changed


def test_base_named_in_config_must_match(tmp_path, llama_dir):
    other = tmp_path / "other"
    save_base("llama-mha", other)  # 4 kv heads, not 2
    peft_lora("llama-mha").save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    with pytest.raises(CheckpointError, match="num_kv_heads=4, the model has num_kv_heads=2"):
        load_adapter(load_base(llama_dir), tmp_path / "adapter")


def test_unknown_and_unsupported_adapters_are_named(tmp_path, llama_dir):
    model = load_base(llama_dir)
    with pytest.raises(CheckpointError, match="not an adapter directory"):
        load_adapter(model, tmp_path / "missing")
    peft_lora("llama-gqa", layers_to_transform=[1]).save_pretrained(tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        load_adapter(model, tmp_path / "a")
    config_path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="peft_type 'IA3'"):
        load_adapter(model, tmp_path / "a")
    config_path.write_text(json.dumps(config))
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = \
        np.zeros((4, 64), np.float32)
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = \
        np.zeros((64, 4), np.float32)
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="layers.7.self_attn.q_proj, which this model "
                                              r"\(2 layers\) does not have"):
        load_adapter(model, tmp_path / "a")
    assert not adapters(model)


def test_save_refuses_to_overwrite_and_needs_an_adapter(tmp_path, llama_dir):
    model = load_base(llama_dir)
    with pytest.raises(ConfigError, match="no adapter to save"):
        save_adapter(model, tmp_path, base_model_name_or_path="x")
    apply_lora(model, LoraConfig(rank=2, alpha=2), nnx.Rngs(0))
    save_adapter(model, tmp_path, base_model_name_or_path="x")
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model)
    with pytest.raises(CheckpointError, match="already holds adapter_config.json.*overwrite"):
        save_adapter(model, tmp_path, base_model_name_or_path="x")
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    save_adapter(model, tmp_path, base_model_name_or_path="x", overwrite=True)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() != before
