"""GGUF reading: the real SmolLM2 file against transformers' own GGUF loader,
tiny hand-written files for each tensor type and rope setting, and every bad input."""

import gguf
import numpy as np
import pytest

from flaxlm.model.embedded import smollm2_gguf_path
from flaxlm.model.errors import CheckpointError
from flaxlm.model.gguf_io import can_dequantize, gguf_tensor_types, read_gguf

QT = gguf.GGMLQuantizationType

# A tiny GQA llama; rows and columns are multiples of the 32-value quant blocks.
TINY = dict(vocab=64, hidden=32, heads=4, kv_heads=2, inter=64, layers=2)
HEAD_DIM = TINY["hidden"] // TINY["heads"]
LAYER_SHAPES = {  # GGUF kind -> (HF name, HF shape [out, in])
    "attn_q": ("self_attn.q_proj", (TINY["heads"] * HEAD_DIM, TINY["hidden"])),
    "attn_k": ("self_attn.k_proj", (TINY["kv_heads"] * HEAD_DIM, TINY["hidden"])),
    "attn_v": ("self_attn.v_proj", (TINY["kv_heads"] * HEAD_DIM, TINY["hidden"])),
    "attn_output": ("self_attn.o_proj", (TINY["hidden"], TINY["heads"] * HEAD_DIM)),
    "ffn_gate": ("mlp.gate_proj", (TINY["inter"], TINY["hidden"])),
    "ffn_up": ("mlp.up_proj", (TINY["inter"], TINY["hidden"])),
    "ffn_down": ("mlp.down_proj", (TINY["hidden"], TINY["inter"])),
    "attn_norm": ("input_layernorm", (TINY["hidden"],)),
    "ffn_norm": ("post_attention_layernorm", (TINY["hidden"],)),
}
TINY_KV = {
    "llama.block_count": TINY["layers"],
    "llama.context_length": 256,
    "llama.embedding_length": TINY["hidden"],
    "llama.feed_forward_length": TINY["inter"],
    "llama.attention.head_count": TINY["heads"],
    "llama.attention.head_count_kv": TINY["kv_heads"],
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.rope.freq_base": 10000.0,
    "llama.rope.dimension_count": HEAD_DIM,
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
}


def llama_cpp_permute(weights, n_head, n_head_kv):
    """convert_hf_to_gguf.py's `permute` (LlamaModel), verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama_cpp_rope_freqs(head_dim, base, factor, low_freq_factor, high_freq_factor, old_context_len):
    """convert_hf_to_gguf.py's llama3 `rope_freqs` tensor (LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / float(freq)
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def tiny_hf_weights(seed=0) -> dict[str, np.ndarray]:
    """Random float32 weights of the tiny llama under HF names, untied."""
    rng = np.random.default_rng(seed)
    shapes = {
        "model.embed_tokens.weight": (TINY["vocab"], TINY["hidden"]),
        "model.norm.weight": (TINY["hidden"],),
        "lm_head.weight": (TINY["vocab"], TINY["hidden"]),
    }
    for i in range(TINY["layers"]):
        shapes |= {f"model.layers.{i}.{name}.weight": shape for name, shape in LAYER_SHAPES.values()}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    layer, kind = hf_name.split(".")[2], hf_name.split(".", 3)[3].removesuffix(".weight")
    return f"blk.{layer}.{next(g for g, (h, _) in LAYER_SHAPES.items() if h == kind)}.weight"


def store(hf_name: str, weight: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """What convert_hf_to_gguf writes for one HF weight: q/k permuted, 2-D weights quantized."""
    if hf_name.endswith("q_proj.weight"):
        weight = llama_cpp_permute(weight, TINY["heads"], TINY["heads"])
    if hf_name.endswith("k_proj.weight"):
        weight = llama_cpp_permute(weight, TINY["heads"], TINY["kv_heads"])
    qtype = qtype if weight.ndim == 2 else QT.F32
    return gguf.quants.quantize(weight, qtype), qtype


def write_gguf(path, tensors: dict, kv: dict, arch="llama"):
    """Write a GGUF file: tensors maps GGUF names to (stored array, type)."""
    writer = gguf.GGUFWriter(path, arch)
    value_types = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32,
                   float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING}
    for key, value in kv.items():
        writer.add_key_value(key, value, value_types[type(value)])
    for name, (data, qtype) in tensors.items():
        raw = qtype if data.dtype == np.uint8 else None
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny(path, qtype=QT.F32, weights=None, kv=TINY_KV, drop=(), extra=None, arch="llama"):
    weights = tiny_hf_weights() if weights is None else weights
    tensors = {gguf_name(n): store(n, w, qtype) for n, w in weights.items()}
    tensors = {n: t for n, t in tensors.items() if n not in drop} | (extra or {})
    return write_gguf(path, tensors, kv, arch)


def write_tiny_gguf(path, qtype_of):
    """The tiny llama of test_gguf_io with a small tokenizer; qtype_of(hf_name) picks each 2-D type."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in TINY_KV.items():
        kind = gguf.GGUFValueType.UINT32 if isinstance(value, int) else gguf.GGUFValueType.FLOAT32
        writer.add_key_value(key, value, kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chr(ord("a") + i) for i in range(26)]
                          + [f"<t{i}>" for i in range(26, TINY["vocab"] - 1)] + ["ab"])
    writer.add_token_merges(["a b"])
    for hf_name, weight in tiny_hf_weights().items():
        data, stored = store(hf_name, weight, qtype_of(hf_name))
        writer.add_tensor(gguf_name(hf_name), data, raw_dtype=stored if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- the real SmolLM2 GGUF against transformers ---------------------------------------------


@pytest.fixture(scope="module")
def smollm2_path():
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_path):
    return read_gguf(smollm2_path)


def test_smollm2_tensors_equal_transformers(smollm2_gguf, smollm2_hf):
    """Against the session's transformers load of the same file (tests/conftest.py)."""
    hf_tensors = {k: v.numpy() for k, v in smollm2_hf.state_dict().items()}
    assert smollm2_gguf.hf_config["tie_word_embeddings"] is True
    assert set(hf_tensors) == set(smollm2_gguf.tensors) | {"lm_head.weight"}  # HF lists the tied head too
    for name, ours in smollm2_gguf.tensors.items():
        assert ours.dtype == np.float32 and ours.shape == hf_tensors[name].shape, name
        np.testing.assert_array_equal(ours, hf_tensors[name], err_msg=name)


def test_smollm2_config_equals_transformers(smollm2_gguf, smollm2_hf):
    import transformers
    hf_config = smollm2_hf.config
    ours = transformers.LlamaConfig(**smollm2_gguf.hf_config)  # our dict is a valid LlamaConfig
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters", "hidden_act"):
        assert getattr(ours, key) == getattr(hf_config, key), key
    # transformers keeps the float32 value; we keep the decimal that was written (SmolLM2's config.json: 1e-05).
    assert ours.rms_norm_eps == 1e-5 and np.float32(hf_config.rms_norm_eps) == np.float32(1e-5)
    assert "rope_scaling" not in smollm2_gguf.hf_config and smollm2_gguf.hf_config["rope_theta"] == 100000.0


def test_smollm2_metadata_is_plain_python(smollm2_gguf):
    meta = smollm2_gguf.metadata
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    assert type(tokens) is list and len(tokens) == 49152 and all(type(t) is str for t in tokens)
    assert type(merges) is list and type(merges[0]) is str and " " in merges[0]
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert type(meta["tokenizer.ggml.token_type"][0]) is int
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert meta["general.architecture"] == "llama" and not any(k.startswith("GGUF.") for k in meta)


def test_smollm2_tensor_types_and_raw_data(smollm2_path):
    types = gguf_tensor_types(smollm2_path)
    assert types["model.embed_tokens.weight"] == "Q8_0"
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert types["model.norm.weight"] == "F32"
    raw = read_gguf(smollm2_path, dequantize=False).tensors["model.embed_tokens.weight"]
    assert raw.dtype == np.uint8 and raw.shape == (49152, 576 // 32 * 34)  # 34-byte Q8_0 blocks per row


# --- tiny hand-written files ------------------------------------------------------------------


# The types the gguf package can also write (its quantizers), on 32-value blocks.
QUANTIZABLE_32 = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.MXFP4]


@pytest.mark.parametrize("qtype", QUANTIZABLE_32, ids=lambda q: q.name)
def test_tiny_dequantizes_like_gguf_in_hf_order(tmp_path, qtype):
    weights = tiny_hf_weights()
    ckpt = read_gguf(write_tiny(tmp_path / "tiny.gguf", qtype, weights))
    assert set(ckpt.tensors) == set(weights)
    for name, weight in weights.items():
        stored_type = qtype if weight.ndim == 2 else QT.F32
        # Quantization works within rows, so it commutes with the q/k row permutation.
        expected = gguf.quants.dequantize(gguf.quants.quantize(weight, stored_type), stored_type)
        got = ckpt.tensors[name]
        assert got.dtype == np.float32 and got.shape == weight.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    assert gguf_tensor_types(tmp_path / "tiny.gguf")["model.layers.1.mlp.down_proj.weight"] == qtype.name


# Every other type the package dequantizes: K-quants, IQ and ternary types (mostly
# 256-value blocks). It has no quantizer for them, so their rows are random bytes,
# redrawn until every value they decode to is finite: real blocks of the format.
DEQUANTIZE_ONLY = [q for q in QT if can_dequantize(q) and q not in QUANTIZABLE_32]
WIDE = dict(vocab=16, hidden=256, heads=2, kv_heads=1, inter=256)  # rows of whole 256-value blocks


def random_blocks(qtype, rows, cols, rng):
    """uint8 [rows, bytes] holding `cols` values per row in `qtype`, all finite when dequantized."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
    for _ in range(100):
        with np.errstate(invalid="ignore", over="ignore"):
            bad = ~np.isfinite(gguf.quants.dequantize(data, qtype)).all(axis=1)
        if not bad.any():
            return data
        data[bad] = rng.integers(0, 256, size=(int(bad.sum()), data.shape[1]), dtype=np.uint8)
    raise AssertionError(f"no finite {qtype.name} rows drawn")


def write_wide(path, qtype, rng):
    """A one-layer llama whose 2-D weights are random `qtype` rows; returns {GGUF name: stored rows}."""
    h, hd = WIDE["hidden"], WIDE["hidden"] // WIDE["heads"]
    shapes = {"token_embd.weight": (WIDE["vocab"], h), "output.weight": (WIDE["vocab"], h),
              "blk.0.attn_q.weight": (h, h), "blk.0.attn_k.weight": (WIDE["kv_heads"] * hd, h),
              "blk.0.attn_v.weight": (WIDE["kv_heads"] * hd, h), "blk.0.attn_output.weight": (h, h),
              "blk.0.ffn_gate.weight": (WIDE["inter"], h), "blk.0.ffn_up.weight": (WIDE["inter"], h),
              "blk.0.ffn_down.weight": (h, WIDE["inter"])}
    stored = {name: random_blocks(qtype, rows, cols, rng) for name, (rows, cols) in shapes.items()}
    norms = {name: (np.ones(h, np.float32), QT.F32)
             for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight")}
    kv = TINY_KV | {"llama.block_count": 1, "llama.embedding_length": h, "llama.feed_forward_length": WIDE["inter"],
                    "llama.attention.head_count": WIDE["heads"], "llama.attention.head_count_kv": WIDE["kv_heads"],
                    "llama.rope.dimension_count": hd}
    write_gguf(path, {name: (data, qtype) for name, data in stored.items()} | norms, kv)
    return stored


@pytest.mark.parametrize("qtype", DEQUANTIZE_ONLY, ids=lambda q: q.name)
def test_every_dequantizable_type_reads_in_hf_order(tmp_path, qtype):
    stored = write_wide(tmp_path / f"{qtype.name}.gguf", qtype, np.random.default_rng(qtype.value))
    ckpt = read_gguf(tmp_path / f"{qtype.name}.gguf")
    assert ckpt.types["model.layers.0.mlp.down_proj.weight"] == qtype.name
    for name, data in stored.items():
        hf_name = gguf_name_to_hf(name)
        got = ckpt.tensors[hf_name]
        if name.endswith(("attn_q.weight", "attn_k.weight")):  # back into llama.cpp's row order
            got = llama_cpp_permute(got, WIDE["heads"], WIDE["heads"] if "attn_q" in name else WIDE["kv_heads"])
        np.testing.assert_array_equal(got, gguf.quants.dequantize(data, qtype), err_msg=name)
    assert {name: ckpt.tensors[name].shape for name in ("model.layers.0.self_attn.k_proj.weight",
                                                         "model.embed_tokens.weight")} == {
        "model.layers.0.self_attn.k_proj.weight": (128, 256), "model.embed_tokens.weight": (16, 256)}


def gguf_name_to_hf(name: str) -> str:
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    kind = name.split(".")[2]
    return f"model.layers.0.{LAYER_SHAPES[kind][0]}.weight"


def test_tiny_qk_permute_round_trip_is_exact(tmp_path):
    weights = tiny_hf_weights(seed=1)
    tensors = read_gguf(write_tiny(tmp_path / "f32.gguf", QT.F32, weights)).tensors
    for i in range(TINY["layers"]):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            assert not np.array_equal(store(name, weights[name], QT.F32)[0], weights[name])  # really permuted
            np.testing.assert_array_equal(tensors[name], weights[name], err_msg=name)


def test_tiny_raw_q8_0_rows_in_hf_order(tmp_path):
    weights = tiny_hf_weights()
    path = write_tiny(tmp_path / "q8.gguf", QT.Q8_0, weights)
    raw = read_gguf(path, dequantize=False).tensors
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight"):
        np.testing.assert_array_equal(raw[name], gguf.quants.quantize(weights[name], QT.Q8_0), err_msg=name)
    np.testing.assert_array_equal(raw["model.norm.weight"], weights["model.norm.weight"])


def test_tiny_config(tmp_path):
    config = read_gguf(write_tiny(tmp_path / "tiny.gguf")).hf_config
    assert config == {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    }


def test_tiny_tied_when_no_output_weight(tmp_path):
    ckpt = read_gguf(write_tiny(tmp_path / "tied.gguf", drop=("output.weight",)))
    assert ckpt.hf_config["tie_word_embeddings"] is True and "lm_head.weight" not in ckpt.tensors


def test_linear_rope_scaling(tmp_path):
    kv = TINY_KV | {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    config = read_gguf(write_tiny(tmp_path / "linear.gguf", kv=kv)).hf_config
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    kv = TINY_KV | {"llama.context_length": 8192}
    freqs = llama_cpp_rope_freqs(HEAD_DIM, TINY_KV["llama.rope.freq_base"], 8.0, 1.0, 4.0, 1024)
    assert ((freqs > 1) & (freqs < 8)).any()  # the file has a smoothly scaled frequency to recover from
    ckpt = read_gguf(write_tiny(tmp_path / "llama3.gguf", kv=kv, extra={"rope_freqs.weight": (freqs, QT.F32)}))
    assert ckpt.hf_config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    }
    assert "rope_freqs.weight" not in ckpt.tensors


# --- bad input --------------------------------------------------------------------------------


def assert_error(path, *words, **read_kwargs):
    with pytest.raises(CheckpointError) as info:
        read_gguf(path, **read_kwargs)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message
    return message


def test_missing_file(tmp_path):
    assert_error(tmp_path / "absent.gguf", "not found")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b'{"__metadata__": {}}' + bytes(64))
    assert_error(path, "not a GGUF")


@pytest.fixture(scope="module")
def tiny_cuts(tmp_path_factory):
    """A tiny GGUF with a tokenizer (tests/model/test_quant.py's) and offsets to cut it at,
    one inside each part of the file, found by the gguf reader."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("cuts") / "tiny.gguf", lambda name: QT.Q8_0)
    reader = gguf.GGUFReader(path)
    fields, tensors, data = reader.fields, reader.tensors, path.read_bytes()

    def inside(field):  # the middle byte of a key/value (or tensor info) record
        return field.offset + sum(int(part.nbytes) for part in field.parts) // 2

    info = tensors[len(tensors) // 2].field
    biggest = max(tensors, key=lambda t: t.n_bytes)
    end_of_data = max(int(t.data_offset) + int(t.n_bytes) for t in tensors)
    offsets = {"version": fields["GGUF.version"].offset + 2,
               "kv_count": fields["GGUF.kv_count"].offset + 4,
               "kv": inside(fields["llama.block_count"]),
               "tokens": inside(fields["tokenizer.ggml.tokens"]),
               "tensor_info": inside(info),
               "data": int(biggest.data_offset) + int(biggest.n_bytes) // 2,
               "last_byte": end_of_data - 1}
    assert fields["GGUF.version"].offset == 4 and info.offset < reader.data_offset
    assert reader.data_offset < offsets["data"] < end_of_data <= len(data)
    return data, offsets


@pytest.mark.parametrize("where", ["version", "kv_count", "kv", "tokens", "tensor_info", "data", "last_byte"])
def test_truncated_gguf(tmp_path, tiny_cuts, where):
    data, offsets = tiny_cuts
    path = tmp_path / f"cut_{where}.gguf"
    path.write_bytes(data[: offsets[where]])
    assert_error(path, "truncated or corrupt")


def test_other_architecture(tmp_path):
    path = write_tiny(tmp_path / "gpt2.gguf", arch="gpt2")
    message = assert_error(path, "'gpt2'", "general.architecture")
    for supported in ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "smollm3"):
        assert supported in message
    with pytest.raises(CheckpointError, match="gpt2"):
        gguf_tensor_types(path)


def test_missing_metadata_key(tmp_path):
    kv = {k: v for k, v in TINY_KV.items() if k != "llama.feed_forward_length"}
    assert_error(write_tiny(tmp_path / "nokey.gguf", kv=kv), "llama.feed_forward_length", "missing")


def test_shape_disagrees_with_metadata(tmp_path):
    kv = TINY_KV | {"llama.attention.head_count_kv": 1}
    assert_error(write_tiny(tmp_path / "heads.gguf", kv=kv), "'blk.0.attn_k.weight'", "[16, 32]", "[8, 32]")


def test_missing_tensor(tmp_path):
    assert_error(write_tiny(tmp_path / "notensor.gguf", drop=("blk.1.ffn_up.weight",)), "blk.1.ffn_up.weight")


def test_unexpected_tensor(tmp_path):
    bias = (np.zeros(TINY["hidden"], np.float32), QT.F32)
    assert_error(write_tiny(tmp_path / "bias.gguf", extra={"blk.0.attn_q.bias": bias}), "blk.0.attn_q.bias")


def test_unreadable_tensor_type_is_named_with_the_tensor(tmp_path):
    """Q8_1 is a ggml type (llama.cpp's activation format) that the gguf package cannot dequantize."""
    assert not can_dequantize(QT.Q8_1)
    rows = TINY["hidden"]
    q8_1 = (np.zeros((rows, TINY["inter"] // 32 * 40), np.uint8), QT.Q8_1)  # 40-byte blocks of 32
    path = write_tiny(tmp_path / "q8_1.gguf", extra={"blk.0.ffn_down.weight": q8_1})
    message = assert_error(path, "'blk.0.ffn_down.weight'", "Q8_1", "cannot dequantize")
    assert "Q4_K" in message and "IQ2_XXS" in message  # and the types it does read
    assert_error(path, "Q8_1", dequantize=False)


def test_unrecoverable_rope_freqs(tmp_path):
    ones = (np.ones(HEAD_DIM // 2, np.float32), QT.F32)
    assert_error(write_tiny(tmp_path / "rope.gguf", extra={"rope_freqs.weight": ones}), "rope_freqs.weight")
