"""Read a llama GGUF file into Hugging Face form.

`read_gguf` returns what the rest of flaxlm already knows how to load: a
transformers-style LlamaConfig dict, a state dict under HF names and shapes,
plus every GGUF key/value as plain Python (the tokenizer reads `tokenizer.*`).

Two things differ from HF in a llama GGUF and are undone here, exactly as
transformers' own GGUF loader does:

- Shapes: GGUF lists dims fastest first (ne[0]); `gguf.GGUFReader` already
  reverses them, which for a llama weight gives HF's [out_features, in_features].
- Rotary layout: llama.cpp's convert_hf_to_gguf `permute`s the rows of the q
  and k projections (per head, interleaves the two rotary halves); we apply
  the inverse permutation.
"""

import dataclasses
import re
from pathlib import Path

import gguf
import numpy as np

from flaxlm.model.errors import CheckpointError

_QT = gguf.GGMLQuantizationType
READABLE_TYPES = (_QT.F32, _QT.F16, _QT.BF16, _QT.Q8_0, _QT.Q4_0, _QT.Q4_1)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# Llama 3 rope scaling, which convert_hf_to_gguf stores only as per-frequency divisors.
_ROPE_FREQS = "rope_freqs.weight"
_TOKEN_ID_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
_REQUIRED_KEYS = (
    "llama.block_count",
    "llama.context_length",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.layer_norm_rms_epsilon",
)


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A llama GGUF file in HF form.

    `tensors` holds float32 arrays under HF names and shapes; with
    `read_gguf(..., dequantize=False)` it holds the stored data instead (see
    there), and `gguf_tensor_types` says how to read it.
    """

    hf_config: dict
    metadata: dict
    tensors: dict[str, np.ndarray]


def read_gguf(path, dequantize: bool = True) -> GGUFCheckpoint:
    """Read a llama GGUF file into an HF config, metadata and HF-named tensors.

    With `dequantize=False` each tensor is its stored data, rows already in HF
    order (q/k un-permuted): F32 and F16 as those dtypes, BF16 and block types
    (Q8_0, Q4_0, Q4_1) as uint8 of shape [rows, bytes per row].
    """
    path = Path(path)
    reader, metadata = _open(path)
    stored = _stored_tensors(reader, metadata, path)
    config = _hf_config(metadata, stored, path)
    _check_shapes(stored, config, path)
    tensors = {
        hf_name: _hf_tensor(hf_name, tensor, config, dequantize, path)
        for hf_name, tensor in stored.items()
        if hf_name != _ROPE_FREQS
    }
    return GGUFCheckpoint(hf_config=config, metadata=metadata, tensors=tensors)


def gguf_tensor_types(path) -> dict[str, str]:
    """Map each weight's HF name to its GGUF storage type name ('Q8_0', 'F32', ...)."""
    path = Path(path)
    reader, metadata = _open(path)
    stored = _stored_tensors(reader, metadata, path)
    return {name: t.tensor_type.name for name, t in stored.items() if name != _ROPE_FREQS}


def read_gguf_metadata(path) -> dict:
    """Every GGUF key/value of a file as plain python values (str, int, float, bool, lists)."""
    return _read(Path(path))[1]


def _read(path: Path) -> tuple[gguf.GGUFReader, dict]:
    """Parse the file's header; every way it can fail becomes a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
        metadata = {
            name: field.contents()
            for name, field in reader.fields.items()
            if not name.startswith("GGUF.")  # the header's version and counts, not key/values
        }
    except (ValueError, IndexError, KeyError, OSError, OverflowError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e
    return reader, metadata


def _open(path: Path) -> tuple[gguf.GGUFReader, dict]:
    """Parse a llama GGUF file: (reader, metadata)."""
    reader, metadata = _read(path)
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{path}: general.architecture is {arch!r}; flaxlm reads only 'llama' GGUF files"
        )
    return reader, metadata


def _stored_tensors(reader: gguf.GGUFReader, metadata: dict, path: Path) -> dict:
    """The reader's tensors keyed by HF name, after checking that they are complete and readable."""
    n_layers = _required(metadata, "llama.block_count", path)
    expected = {"token_embd.weight", "output_norm.weight"}
    expected |= {f"blk.{i}.{kind}.weight" for i in range(n_layers) for kind in _LAYER_NAMES}
    missing = sorted(expected - {t.name for t in reader.tensors})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing tensors of a {n_layers}-layer llama: {shown}")
    for tensor in reader.tensors:
        if tensor.tensor_type not in READABLE_TYPES:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}; "
                f"flaxlm reads {', '.join(t.name for t in READABLE_TYPES)}"
            )
    return {_hf_name(t.name, n_layers, path): t for t in reader.tensors}


def _hf_name(gguf_name: str, n_layers: int, path: Path) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name == _ROPE_FREQS:
        return _ROPE_FREQS
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match[2] in _LAYER_NAMES and int(match[1]) < n_layers:
        return _layer_hf_name(int(match[1]), match[2])
    raise CheckpointError(f"{path}: unexpected tensor {gguf_name!r} in a llama GGUF with {n_layers} layers")


def _layer_hf_name(layer: int, gguf_kind: str) -> str:
    return f"model.layers.{layer}.{_LAYER_NAMES[gguf_kind]}.weight"


def _required(metadata: dict, key: str, path: Path):
    if key not in metadata:
        raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
    return metadata[key]


def _as_written(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _hf_config(metadata: dict, stored: dict, path: Path) -> dict:
    """A transformers LlamaConfig dict, the way llama.cpp reads the same keys."""
    for key in _REQUIRED_KEYS:
        _required(metadata, key, path)
    hidden = metadata["llama.embedding_length"]
    n_heads = metadata["llama.attention.head_count"]
    head_dim = metadata.get("llama.attention.key_length", hidden // n_heads)
    rotary_dims = metadata.get("llama.rope.dimension_count", head_dim)
    if rotary_dims != head_dim:
        raise CheckpointError(
            f"{path}: llama.rope.dimension_count is {rotary_dims} but the head dim is {head_dim}; "
            "llama rotates the whole head"
        )
    rope_theta = _as_written(metadata.get("llama.rope.freq_base", 10000.0))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(stored["model.embed_tokens.weight"].shape[-1]),  # ne = [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": metadata["llama.feed_forward_length"],
        "num_hidden_layers": metadata["llama.block_count"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": metadata.get("llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _as_written(metadata["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": rope_theta,
        "max_position_embeddings": metadata["llama.context_length"],
        "tie_word_embeddings": "lm_head.weight" not in stored,
        "hidden_act": "silu",
    }
    rope_scaling = _rope_scaling(metadata, stored, head_dim, rope_theta, path)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    for gguf_key, hf_key in _TOKEN_ID_KEYS.items():
        if gguf_key in metadata:
            config[hf_key] = metadata[gguf_key]
    return config


def _check_shapes(stored: dict, config: dict, path: Path) -> None:
    """Every weight's HF shape must follow from the config (a wrong head count shows here)."""
    hidden, head_dim, ffn = config["hidden_size"], config["head_dim"], config["intermediate_size"]
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    expected = {  # last part of the HF name -> [out, in]
        "embed_tokens": (config["vocab_size"], hidden), "lm_head": (config["vocab_size"], hidden),
        "norm": (hidden,), "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
        "q_proj": (q_rows, hidden), "k_proj": (kv_rows, hidden), "v_proj": (kv_rows, hidden),
        "o_proj": (hidden, q_rows), "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn),
    }
    for name, tensor in stored.items():
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest first
        want = expected.get(name.removesuffix(".weight").rsplit(".", 1)[-1])
        if want is not None and shape != want:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} has shape {list(shape)} but the metadata implies {list(want)}"
            )


def _rope_scaling(metadata: dict, stored: dict, head_dim: int, theta: float, path: Path) -> dict | None:
    if _ROPE_FREQS in stored:
        divisors = np.array(stored[_ROPE_FREQS].data, dtype=np.float64)
        return _llama3_rope_scaling(divisors, head_dim, theta, path)
    kind = metadata.get("llama.rope.scaling.type", "none")
    factor = metadata.get("llama.rope.scaling.factor", metadata.get("llama.rope.scale_linear", 1.0))
    if kind == "none" and factor == 1.0:
        return None
    if kind in ("linear", "none"):  # old files carry only `rope.scale_linear`
        return {"rope_type": "linear", "factor": _as_written(factor)}
    raise CheckpointError(f"{path}: rope scaling type {kind!r} is not supported (flaxlm reads linear and llama3)")


def _llama3_rope_divisors(
    head_dim: int, theta: float, factor: float, low_freq_factor: float, high_freq_factor: float, original_context: int
) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling, as convert_hf_to_gguf writes `rope_freqs.weight`."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)  # [head_dim // 2]
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    middle = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen > original_context / low_freq_factor, factor, middle)
    return np.where(wavelen < original_context / high_freq_factor, 1.0, divisors)


def _llama3_rope_scaling(divisors: np.ndarray, head_dim: int, theta: float, path: Path) -> dict:
    """Recover HF's llama3 rope_scaling from the stored divisors.

    Four numbers made the divisors; they determine the factor and, given
    Meta's low/high frequency factors 1 and 4 (every Llama 3.x release), the
    original context length. The result is checked by recomputing the divisors.
    """
    low, high = 1.0, 4.0
    factor = float(divisors.max())
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    inner = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    if divisors.shape != wavelen.shape or factor <= 1 or not inner.any():
        raise CheckpointError(f"{path}: {_ROPE_FREQS} is not llama3 rope scaling that flaxlm can recover")
    smooth = (1 / divisors[inner] - 1 / factor) / (1 - 1 / factor)
    original = int(round(float(np.median(wavelen[inner] * (low + (high - low) * smooth)))))
    scaling = {
        "rope_type": "llama3",
        "factor": _as_written(factor),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
    recomputed = _llama3_rope_divisors(head_dim, theta, scaling["factor"], low, high, original)
    if not np.allclose(recomputed, divisors, rtol=1e-4):
        raise CheckpointError(
            f"{path}: {_ROPE_FREQS} does not match llama3 rope scaling with low/high frequency factors 1 and 4"
        )
    return scaling


def _hf_tensor(hf_name: str, tensor, config: dict, dequantize: bool, path: Path) -> np.ndarray:
    """One tensor in HF layout: float32 (or stored data), q/k rows un-permuted."""
    if dequantize:
        data = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    else:
        data = np.array(tensor.data)  # a copy: the reader's arrays view a read-only memmap
    if hf_name.endswith("self_attn.q_proj.weight"):
        return _unpermute_qk_rows(data, config["num_attention_heads"])
    if hf_name.endswith("self_attn.k_proj.weight"):
        return _unpermute_qk_rows(data, config["num_key_value_heads"])
    return data


def _unpermute_qk_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of q/k rows (transformers' `_reverse_permute_weights`).

    llama.cpp interleaves each head's two rotary halves; HF keeps them as halves.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
