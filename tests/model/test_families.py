"""Every architecture option does what it claims, per family: what save_hf writes,
that each option changes the logits (so the parity tests can see it), int8 and
sharded forwards, and the errors for configs flaxlm cannot run.

Logit parity with transformers for every family is tests/model/test_hf_parity.py;
generation and beam search tests/infer/test_families.py; training
tests/train/test_moe.py."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from flaxlm.model import (CheckpointError, ConfigError, ModelConfig, RopeScaling,
                          dequantize_model, quantize)
from flaxlm.model.hf_config import SUPPORTED_TYPES, config_from_hf
from flaxlm.model.hf_export import config_to_hf
from flaxlm.model.hf_weights import params_from_hf
from flaxlm.model.params import build_model, flat_params
from flaxlm.model.sharding import RULES, make_mesh, param_shardings, shard_model, use_sharding
from tests.hf_models import jitted, make_hf_model

FAMILIES = ["qwen3-window", "gemma2-softcap", "gemma3-local-global", "phi3-longrope",
            "smollm3-nope", "mixtral-moe", "qwen3-moe"]
SEQ = 72


@pytest.fixture(scope="module")
def built():
    """name -> (flaxlm model of a tiny HF model's weights, its jitted forward), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            hf_model = make_hf_model(name)
            config = config_from_hf(hf_model.config.to_dict(), name)
            tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
            model = build_model(config, params_from_hf(config, tensors, name), name)
            cache[name] = model, jitted(model)
        return cache[name]

    return get


def _ids(seq=SEQ, batch=2, seed=0, vocab=320):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


@pytest.mark.parametrize("name, model_type", [
    ("llama-gqa", "llama"), ("mistral-window", "mistral"), ("qwen2-bias", "qwen2"),
    ("qwen3-window", "qwen3"), ("gemma2-softcap", "gemma2"),
    ("gemma3-local-global", "gemma3_text"), ("smollm3-nope", "smollm3"),
    ("mixtral-moe", "mixtral"), ("qwen3-moe", "qwen3_moe"), ("gpt2", "gpt2"),
    # Phi-3 loads split; written unfused it is a mistral (its window) unless a
    # partially rotated head needs phi3, which then gets its fused tensors back.
    ("phi3-window", "mistral"), ("phi3-longrope", "phi3"),
])
def test_exported_model_type(name, model_type):
    config = config_from_hf(make_hf_model(name).config.to_dict(), name)
    assert config_to_hf(config)["model_type"] == model_type


@pytest.mark.parametrize("change, message", [
    (dict(post_mlp_norm=True), "the closest, llama, cannot express post_mlp_norm=True"),
    (dict(qk_norm=True, final_softcap=5.0), "the closest, qwen3, cannot express final_softcap=5.0"),
])
def test_export_names_what_no_hf_type_expresses(change, message):
    with pytest.raises(CheckpointError, match=message):
        config_to_hf(ModelConfig.preset("tiny-llama").replace(**change))


@pytest.mark.parametrize("name, change", [
    ("gemma2-softcap", dict(attn_softcap=None)),
    ("gemma2-softcap", dict(final_softcap=None)),
    ("gemma2-softcap", dict(query_pre_attn_scalar=None)),
    ("gemma2-softcap", dict(layer_attention=("full",), sliding_window=None)),
    ("gemma3-local-global", dict(local_rope_theta=None)),
    ("phi3-longrope", dict(rope_scaling=RopeScaling())),  # plain RoPE on half the head
    ("smollm3-nope", dict(layer_positions=("rope",))),
    ("qwen3-moe", dict(router_renormalize=True)),
])
def test_each_option_changes_the_logits(built, name, change):
    """Turning one option off (or another way) moves the logits far past the parity
    tolerance: the parity tests would catch it being ignored."""
    model, forward = built(name)
    config = model.config
    changed = nnx.merge(nnx.graphdef(nnx.eval_shape(
        lambda: type(model)(config.replace(**change), rngs=nnx.Rngs(0)))), nnx.state(model))
    ids = _ids()
    assert np.abs(jitted(changed)(ids) - forward(ids)).max() > 1e-2


def test_longrope_switches_on_the_calls_longest_position(built):
    """Short factors while a call stays within original_max_position_embeddings (32),
    long ones past it, for the whole call (as HF)."""
    _, forward = built("phi3-longrope")
    ids = _ids()
    short = forward(ids[:, :32])
    np.testing.assert_allclose(forward(ids[:, :32]), short, atol=1e-6)
    assert np.abs(forward(ids[:, :33])[:, :32] - short).max() > 1e-2


@pytest.mark.parametrize("name", FAMILIES)
def test_int8_computes_its_dequantized_weights(built, name):
    """Every projection (MoE experts included, routers kept float) is int8, and the
    int8 model's logits are those of the float model of its dequantized weights."""
    model, forward = built(name)
    q = quantize(model)
    dtypes = {k: v.dtype for k, v in flat_params(q).items()}
    assert all(dtypes[k] == np.int8 for k in dtypes
               if k.endswith(("_proj.kernel", "embed.embedding")))
    assert all(dtypes[k] == np.float32 for k in dtypes if k.endswith((".router", "norm.scale")))
    ids = _ids()
    ours, exact = jitted(q)(ids), jitted(dequantize_model(q))(ids)
    assert np.abs(ours - exact).max() <= 1e-4
    # And close to the float model: per-channel int8 of these random tiny models moves
    # logits by ~2% of their mean size (1.5-2.3% measured), keeps >= 95% of the argmaxes.
    float_logits = forward(ids)
    assert np.abs(ours - float_logits).mean() < 0.05 * np.abs(float_logits).mean()
    assert (ours.argmax(-1) == float_logits.argmax(-1)).mean() >= 0.9


def _mesh(config):
    """8 devices: tensor parallel where the kv heads split, experts over `expert`."""
    tensor = 2 if config.num_kv_heads % 2 == 0 else 1
    return make_mesh({"fsdp": 4 // tensor, "expert": 2, "tensor": tensor}), tensor


@pytest.mark.parametrize("name", FAMILIES)
def test_every_parameter_shards_by_the_rules(built, name):
    model, _ = built(name)
    mesh, tensor = _mesh(model.config)
    specs = {path: var.get_value().spec for path, var in nnx.to_flat_state(
        param_shardings(nnx.state(model, nnx.Param), mesh, RULES))}
    for path, spec in specs.items():
        if path[-2:] == ("gate_proj", "kernel") and model.config.num_experts:
            assert spec in (P("expert", "fsdp", "tensor" if tensor > 1 else None),
                            P("fsdp", "tensor" if tensor > 1 else None))  # MoE or dense layer


@pytest.mark.parametrize("name", ["gemma3-local-global", "mixtral-moe", "qwen3-moe"])
def test_sharded_forward_equals_unsharded(built, name):
    """Sharded over fsdp, expert (and tensor) the logits are the single-device ones;
    with experts split over `expert` the MoE layers take the all-experts einsum."""
    model, forward = built(name)
    mesh, _ = _mesh(model.config)
    ids = _ids(batch=8)
    graphdef, state = nnx.split(shard_model(nnx.clone(model), mesh))
    with use_sharding(mesh):
        run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        out = np.asarray(run(state, ids))
    np.testing.assert_allclose(out, forward(ids), atol=1e-5)


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(CheckpointError, match="unsupported model_type 'bert'.*gemma3_text") as e:
        config_from_hf({"model_type": "bert"}, "cfg")
    assert all(t in str(e.value) for t in SUPPORTED_TYPES)


def _hf(name, **changes):
    return {**make_hf_model(name).config.to_dict(), **changes}


@pytest.mark.parametrize("hf, message", [
    (lambda: _hf("llama-gqa", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                               "rope_theta": 1e4}),
     r"RoPE scaling type 'dynamic' \(rope_scaling.rope_type\) is not supported"),
    (lambda: _hf("gemma3-local-global", use_bidirectional_attention=True),
     "gemma3_text: use_bidirectional_attention=true is not supported"),
    (lambda: _hf("gemma3-local-global", rope_parameters={
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
     r"'linear' on sliding layers \(rope_parameters.sliding_attention\)"),
    (lambda: _hf("smollm3-nope", no_rope_layers=[1, 0, 1]),
     "no_rope_layers has 3 entries for 2 layers"),
    (lambda: _hf("qwen3-window", layer_types=["full_attention", "chunked_attention"]),
     "layer_types entry 'chunked_attention' is not supported"),
    (lambda: _hf("llama-gqa", hidden_act="relu2"), "hidden_act 'relu2' is not supported"),
    (lambda: _hf("phi3-longrope", rope_parameters={
        "rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
        "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "rope_scaling.short_factor has 1 entries, the rotary dimension 8 needs 4"),
    (lambda: _hf("mixtral-moe", num_experts_per_tok=5),
     r"experts_per_token must be in \[1, num_experts=4\], got 5"),
])
def test_unsupported_configs_name_the_field(hf, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(hf(), "cfg")


@pytest.mark.parametrize("change, message", [
    (dict(layer_attention=("sliding",)), "'sliding' layers but sliding_window is unset"),
    (dict(sliding_window=8), "no layer_attention entry is 'sliding'"),
    (dict(layer_mlp=("moe",)), "'moe' layers need num_experts >= 2"),
    (dict(num_experts=4), "num_experts is set but no layer_mlp entry is 'moe'"),
    (dict(layer_positions=("rope", "none", "rope")), "layer_positions needs 1 to num_layers"),
    (dict(local_rope_theta=1e4), "no sliding layer uses RoPE"),
    (dict(rope_scaling=dict(kind="su")), "rope_scaling.kind 'su' is not one of"),
])
def test_invalid_combinations(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.preset("tiny-llama").replace(**change)


def test_patterns_are_stored_shortest():
    cfg = ModelConfig.preset("tiny-llama").replace(
        num_layers=6, layer_attention=("sliding", "full") * 3, sliding_window=4)
    assert cfg.layer_attention == ("sliding", "full")
    assert cfg.layer_kinds("attention") == ("sliding", "full") * 3
    gemma3 = ModelConfig.preset("gemma-3-1b")
    assert gemma3.layer_kinds("attention").count("full") == 4  # layers 6, 12, 18, 24 of 26
