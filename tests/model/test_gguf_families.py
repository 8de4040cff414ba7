"""GGUF files of every architecture, written from tiny random HF models as llama.cpp's
converter writes them, read back into the HF config and state dict they came from,
and loaded with the logits of their (dequantized) weights."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flaxlm.model import flat_params, load
from flaxlm.model.gguf_io import GGUFCheckpoint, read_gguf
from tests.model.gguf_convert import QT, dequantized, write_like_llama_cpp

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16)  # a window shorter than the test sequence
FAMILIES = {  # name -> (config class, settings over TINY)
    "llama": (transformers.LlamaConfig, {}),
    "llama3-rope": (transformers.LlamaConfig, dict(max_position_embeddings=512, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=256))),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3-yarn": (transformers.Qwen3Config, dict(head_dim=32, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32))),
    "gemma2": (transformers.Gemma2Config, GEMMA | dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": (transformers.Gemma3TextConfig, GEMMA | dict(num_hidden_layers=7, rope_parameters=dict(
        full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1e6),
        sliding_attention=dict(rope_type="default", rope_theta=1e4)))),
    "phi3-longrope": (transformers.Phi3Config, dict(max_position_embeddings=128, original_max_position_embeddings=32,
                                                     rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, long_factor=[1.0 + 0.5 * i for i in range(8)],
        short_factor=[1.0 + 0.05 * i for i in range(8)]))),
    "smollm3": (transformers.SmolLM3Config, dict(num_hidden_layers=4)),  # layer 3 has no RoPE
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),  # `llama` + experts
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                     norm_topk_prob=True)),
}
# Families transformers' own GGUF loader reads (it has no smollm3, and reads Mixtral's `llama` file as Llama).
TRANSFORMERS_READS = ("llama", "llama3-rope", "qwen2", "qwen3-yarn", "gemma2", "gemma3", "phi3-longrope", "qwen3-moe")


def mixed_types(hf_name: str) -> QT:
    """A GGUF of several quantized types, as llama.cpp's mixes are."""
    if "embed" in hf_name or "lm_head" in hf_name:
        return QT.Q8_0
    return QT.Q5_1 if "self_attn" in hf_name else QT.Q4_0


@dataclasses.dataclass
class Family:
    name: str
    model: transformers.PreTrainedModel
    f32_path: Path
    quant_path: Path
    f32: GGUFCheckpoint
    quant: GGUFCheckpoint


def make_model(name: str) -> transformers.PreTrainedModel:
    config_cls, settings = FAMILIES[name]
    config = config_cls(**{**TINY, **settings})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():  # norms are 1 (Gemma's 0) at init: randomize them too
            p.add_(0.1 * torch.randn_like(p))
    return model.eval().float()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> Family:
    model = make_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    f32_path = write_like_llama_cpp(model, folder / "f32.gguf")
    quant_path = write_like_llama_cpp(model, folder / "mixed.gguf", mixed_types)
    return Family(request.param, model, f32_path, quant_path, read_gguf(f32_path), read_gguf(quant_path))


def same(ours, theirs) -> bool:
    """Config values equal, floats to float32 precision (GGUF stores float32)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(same(ours[k], theirs[k]) for k in ours)
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)):
        return len(ours) == len(theirs) and all(same(a, b) for a, b in zip(ours, theirs))
    if isinstance(ours, float) or isinstance(theirs, float):
        return theirs is not None and ours is not None and np.isclose(ours, theirs, rtol=1e-6, atol=0)
    return ours == theirs


def test_config_is_the_hf_config(family):
    """Our dict, read by the family's transformers config class, equals the model's own config."""
    hf = family.model.config.to_dict()
    hf["head_dim"] = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]  # None means this
    ours = type(family.model.config)(**copy.deepcopy(family.f32.hf_config)).to_dict()
    ignored = {"architectures", "_name_or_path", "transformers_version", "dtype"}
    diffs = {key: (ours.get(key), value) for key, value in hf.items()
             if key not in ignored and not same(ours.get(key), value)}
    assert diffs == {}
    assert family.f32.hf_config["architectures"] == [type(family.model).__name__]


def test_tensors_are_the_hf_state_dict(family):
    state = {k: v.numpy() for k, v in family.model.state_dict().items()}
    if family.model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    assert set(family.f32.tensors) == set(state)
    for name, ours in family.f32.tensors.items():
        assert ours.dtype == np.float32 and ours.shape == state[name].shape, name
        # Gemma's norms went through w + 1 - 1 in float32
        tolerance = 2 ** -23 if family.name.startswith("gemma") and name.endswith("norm.weight") else 0
        np.testing.assert_allclose(ours, state[name], rtol=0, atol=tolerance, err_msg=name)


def test_quantized_tensors_are_the_dequantized_weights(family):
    reference = dequantized(family.model, mixed_types)
    assert {family.quant.types[n] for n in family.quant.tensors} == {"Q8_0", "Q5_1", "Q4_0", "F32"}
    for name, ours in family.quant.tensors.items():
        tolerance = 2 ** -23 if family.name.startswith("gemma") and name.endswith("norm.weight") else 0
        np.testing.assert_allclose(ours, reference[name], rtol=0, atol=tolerance, err_msg=name)


def test_transformers_reads_the_same_tensors(family):
    """transformers' own GGUF loader is an independent inverse of llama.cpp's converter (given the
    model's config: it reads neither Qwen3's key_length nor Phi-3's RoPE tables from the file)."""
    if family.name not in TRANSFORMERS_READS:
        assert family.name in ("smollm3", "mixtral")
        return
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        family.f32_path.parent, gguf_file=family.f32_path.name, config=family.model.config,
        dtype=torch.float32).state_dict()
    for name, ours in family.f32.tensors.items():
        np.testing.assert_array_equal(ours, theirs[name].numpy(), err_msg=name)


def test_logits_are_those_of_the_dequantized_weights(family):
    """flaxlm's model from the mixed-type GGUF against the HF model holding the same dequantized weights."""
    reference = copy.deepcopy(family.model)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in dequantized(family.model, mixed_types).items()})
    ids = np.random.default_rng(0).integers(3, TINY["vocab_size"], size=(2, 64))
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids)).logits.numpy()
    model, tokenizer = load(family.quant_path)
    got = np.asarray(model(ids))
    assert tokenizer.vocab_size == TINY["vocab_size"]
    difference = float(np.abs(got - expected).max())
    print(f"{family.name}: max |logit difference| {difference:.2e}, max |logit| {np.abs(expected).max():.2f}")
    assert difference < 1e-4


@pytest.mark.parametrize("name", ["qwen3-yarn", "gemma2", "phi3-longrope"])  # llama's: test_quant.py
def test_q8_0_loads_as_int8_blocks(name, tmp_path):
    """quantize='q8_0' keeps a Q8_0 GGUF's own int8 blocks (Phi-3's fused rows split like the float
    weights): the same values as the dequantized load, so the logits differ by float32 rounding only."""
    path = write_like_llama_cpp(make_model(name), tmp_path / "q8.gguf", lambda hf_name: QT.Q8_0)
    int8_model, _ = load(path, quantize="q8_0")
    float_model, _ = load(path)
    params = flat_params(int8_model)
    for kernel in ("layers.0.attn.q_proj.kernel", "layers.0.attn.v_proj.kernel", "layers.1.mlp.up_proj.kernel"):
        assert params[kernel].dtype == jnp.int8, kernel
    ids = np.random.default_rng(1).integers(3, TINY["vocab_size"], size=(1, 32))
    ref = np.asarray(float_model(ids))
    assert np.abs(np.asarray(int8_model(ids)) - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
