"""Each bad checkpoint gets a flaxlm error that names the file and the problem; the
dtype arguments of `load`."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flaxlm.model import CheckpointError, ConfigError, flat_params, load
from tests.hf_models import make_hf_model


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    make_hf_model("llama-gqa").save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture
def bad_dir(good_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(good_dir, directory)
    return directory


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def assert_load_error(path, file, *words):
    """load(path) raises a CheckpointError that names `file` and says each of `words`."""
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert str(file) in message, message
    for word in words:
        assert word in message, message


def test_unknown_name():
    with pytest.raises(CheckpointError, match="unknown model 'no-such-model'"):
        load("no-such-model")


def test_missing_config(bad_dir):
    (bad_dir / "config.json").unlink()
    assert_load_error(bad_dir, bad_dir / "config.json", "file not found")


def test_unreadable_config(bad_dir):
    (bad_dir / "config.json").write_text("{not json")
    assert_load_error(bad_dir, bad_dir / "config.json", "cannot read JSON")


def test_no_weights(bad_dir):
    (bad_dir / "model.safetensors").unlink()
    assert_load_error(bad_dir, bad_dir, "no *.safetensors weights")


def test_corrupt_safetensors_header(bad_dir):
    path = bad_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"x" * 32  # inside the JSON header
    path.write_bytes(bytes(data))
    assert_load_error(bad_dir, path, "corrupt or unreadable")


def test_truncated_safetensors(bad_dir):
    path = bad_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    assert_load_error(bad_dir, path, "corrupt or unreadable")


def test_missing_tensor(bad_dir):
    _edit_tensors(bad_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert_load_error(bad_dir, bad_dir, "missing tensor 'model.layers.1.mlp.up_proj.weight'")


def test_shape_mismatch(bad_dir):
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = np.zeros((64, 95), np.float32)
    _edit_tensors(bad_dir, shrink)
    assert_load_error(bad_dir, bad_dir, "layers.0.mlp.down_proj.kernel has shape (95, 64)")


def test_config_shapes_disagree(bad_dir):
    _edit_config(bad_dir, num_key_value_heads=4)  # the weights have 2 kv heads
    assert_load_error(bad_dir, bad_dir, "'model.layers.0.self_attn.k_proj.weight' has shape (64, 32)",
                      "(64, 4, 16)")


def test_unknown_model_type(bad_dir):
    _edit_config(bad_dir, model_type="bert")
    assert_load_error(bad_dir, bad_dir, "unsupported model_type 'bert'")


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])  # transformers 5 / 4
def test_unsupported_rope(bad_dir, key):
    config = json.loads((bad_dir / "config.json").read_text())
    config.pop("rope_parameters", None)
    config[key] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (bad_dir / "config.json").write_text(json.dumps(config))
    assert_load_error(bad_dir, bad_dir, "RoPE scaling type 'dynamic'")


def test_sharded_index_with_missing_shard(bad_dir):
    (bad_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    assert_load_error(bad_dir, bad_dir / "model.safetensors.index.json",
                      "names shard model-00001-of-00002.safetensors")


def test_bad_dtype(good_dir):
    with pytest.raises(ConfigError, match="dtype 'float8'"):
        load(good_dir, dtype="float8")
    with pytest.raises(ConfigError, match="param_dtype 'int4'"):
        load(good_dir, param_dtype="int4")


def test_dtype_and_param_dtype(good_dir):
    """load(dtype=, param_dtype=): compute and storage dtypes; param_dtype defaults to dtype."""
    for kwargs, stored in (({"dtype": "bfloat16"}, "bfloat16"),
                           ({"dtype": "bfloat16", "param_dtype": "float32"}, "float32")):
        model, _ = load(good_dir, **kwargs)
        assert model.config.dtype == "bfloat16" and model.config.param_dtype == stored
        assert {str(v.dtype) for v in flat_params(model).values()} == {stored}


def test_sharded_checkpoint_loads(good_dir, tmp_path):
    """A checkpoint split over two shards with an index loads like the single file."""
    tensors = load_file(good_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard)
    shutil.copy(good_dir / "config.json", tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    sharded, _ = load(tmp_path)
    single, _ = load(good_dir)
    tokens = np.arange(10)[None]
    np.testing.assert_array_equal(np.asarray(sharded(tokens)), np.asarray(single(tokens)))
