"""Mesh construction, the rules table and parameter shardings (8 CPU devices)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from flaxlm.model import ConfigError, Decoder, ModelConfig
from flaxlm.model.params import param_stats
from flaxlm.model.sharding import (RULES, make_mesh, make_rules, param_shardings, shard_model,
                                   spec_for)


def test_eight_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("spec, sizes", [
    ("data=8", {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}),
    ("fsdp=-1", {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}),
    ({"data": 4, "tensor": 2}, {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}),
    ("data=2,fsdp=2,tensor=2", {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}),
    ("expert=4,data=2", {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}),
])
def test_make_mesh(spec, sizes):
    assert dict(make_mesh(spec).shape) == sizes


@pytest.mark.parametrize("spec, message", [
    ("data=3", "has 3 devices, but 8 are available"),
    ("data=3,tensor=-1", "not divisible by 3"),
    ("model=8", "unknown mesh axis 'model'"),
    ("data", "AXIS=SIZE"),
    ("data=-1,tensor=-1", "one may be -1"),
])
def test_bad_mesh(spec, message):
    with pytest.raises(ConfigError, match=message):
        make_mesh(spec)


def test_rule_naming_unknown_axis():
    with pytest.raises(ConfigError, match="rule 'mlp' names unknown mesh axis 'model'"):
        make_rules({"mlp": "model"})


def test_spec_for_uses_each_mesh_axis_once():
    assert spec_for(("embed", "heads", "head_dim"), RULES) == P("fsdp", "tensor", None)
    assert spec_for(("batch", "seq", "embed"), RULES) == P(("data", "fsdp", "expert"), None, None)
    assert spec_for(("expert", "embed", "mlp"), RULES) == P("expert", "fsdp", "tensor")
    assert spec_for(("vocab", "embed"), make_rules({"embed": "tensor"})) == P("tensor", None)


# RULES applied by hand to each parameter's logical axes (vocab, heads, kv_heads, mlp ->
# tensor; embed -> fsdp; head_dim -> not split). Keys are parameter paths without the
# layer index.
SPECS = {
    "embed.embedding": P("tensor", "fsdp"),           # [vocab, embed]
    "attn.q_proj.kernel": P("fsdp", "tensor", None),  # [embed, heads, head_dim]
    "attn.k_proj.kernel": P("fsdp", "tensor", None),  # [embed, kv_heads, head_dim]
    "attn.v_proj.kernel": P("fsdp", "tensor", None),  # [embed, kv_heads, head_dim]
    "attn.o_proj.kernel": P("tensor", None, "fsdp"),  # [heads, head_dim, embed]
    "mlp.gate_proj.kernel": P("fsdp", "tensor"),      # [embed, mlp]
    "mlp.up_proj.kernel": P("fsdp", "tensor"),        # [embed, mlp]
    "mlp.down_proj.kernel": P("tensor", "fsdp"),      # [mlp, embed]
    "attn_norm.scale": P("fsdp"),                     # [embed]
    "mlp_norm.scale": P("fsdp"),                      # [embed]
    "final_norm.scale": P("fsdp"),                    # [embed]
    "lm_head": P("fsdp", "tensor"),                   # [embed, vocab]
}


def expected_spec(path) -> P:
    """The hand-written spec of a parameter path ("layers.0.attn.q_proj.kernel" or its
    pieces)."""
    parts = path.split(".") if isinstance(path, str) else [str(p) for p in path]
    return SPECS[".".join(p for p in parts if p != "layers" and not p.isdigit())]


def _model(**changes):
    return Decoder(ModelConfig.preset("tiny-llama").replace(**changes), rngs=nnx.Rngs(0))


# Per-device slices of three tiny-llama parameters, each dimension divided by hand by the
# sizes of the mesh axes its spec names: q_proj [64 embed, 4 heads, 16], o_proj
# [4 heads, 16, 64 embed], embedding [512 vocab, 64 embed].
SHARD_SHAPES = {
    "fsdp=8": {"q_proj": (8, 4, 16), "o_proj": (4, 16, 8), "embedding": (512, 8)},
    "data=4,tensor=2": {"q_proj": (64, 2, 16), "o_proj": (2, 16, 64), "embedding": (256, 64)},
    "data=2,fsdp=2,tensor=2": {"q_proj": (32, 2, 16), "o_proj": (2, 16, 32),
                               "embedding": (256, 32)},
}


@pytest.mark.parametrize("mesh_spec", sorted(SHARD_SHAPES))
def test_param_specs_follow_rules(mesh_spec):
    mesh = make_mesh(mesh_spec)
    model = shard_model(_model(), mesh)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in params.items():
        assert var.get_value().sharding.spec == expected_spec(path), path
    layer = params[("layers", 0, "attn", "q_proj", "kernel")].get_value()
    shapes = {"q_proj": layer, "embedding": params[("embed", "embedding")].get_value(),
              "o_proj": params[("layers", 0, "attn", "o_proj", "kernel")].get_value()}
    for name, value in shapes.items():
        assert value.sharding.shard_shape(value.shape) == SHARD_SHAPES[mesh_spec][name], name
        assert {s.data.shape for s in value.addressable_shards} == {SHARD_SHAPES[mesh_spec][name]}


def test_fsdp_splits_parameter_bytes():
    mesh = make_mesh("fsdp=8")
    model = shard_model(_model(embed_dim=64), mesh)
    total = sum(param_stats(model)[1].values())
    per_device = sum(shard.data.nbytes for leaf in jax.tree.leaves(nnx.state(model))
                     for shard in leaf.addressable_shards if shard.device == jax.devices()[0])
    assert per_device * 8 == total


def test_indivisible_dimension_is_named():
    model = _model(num_heads=6, num_kv_heads=3)  # 3 kv heads over 2 tensor shards
    with pytest.raises(ConfigError, match=r"k_proj.kernel of shape \(64, 3, 16\): dimension 1 "
                                          r"\(3\) is not divisible by mesh axis 'tensor' of size 2"):
        param_shardings(nnx.state(model), make_mesh("data=4,tensor=2"), RULES)


def test_sharded_forward_equals_unsharded():
    model = _model()
    tokens = np.random.default_rng(0).integers(0, 512, (8, 24))
    expected = np.asarray(model(tokens))
    sharded = shard_model(_model(), make_mesh("data=2,fsdp=2,tensor=2"))
    np.testing.assert_allclose(np.asarray(sharded(tokens)), expected, atol=1e-5)
