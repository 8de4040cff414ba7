"""Read a GGUF file, as llama.cpp writes it, into Hugging Face form.

`read_gguf` returns what the rest of flaxlm already knows how to load: a
transformers config.json dict of the file's family (`flaxlm.model.gguf_arch`
says which architectures and how each maps), a state dict under HF names and
shapes, plus every GGUF key/value as plain Python (the tokenizer reads
`tokenizer.*`).

What convert_hf_to_gguf changed is undone here, as transformers' own GGUF
loader does:

- Shapes: GGUF lists dims fastest first (ne[0]); `gguf.GGUFReader` already
  reverses them, which for a weight gives HF's [out_features, in_features].
- Rotary layout: for llama-style architectures the converter `permute`s the
  rows of the q and k projections (per head, interleaving the two rotary
  halves); we apply the inverse permutation.
- Gemma's norm weights were stored as 1 + w (Gemma computes x * (1 + w)); we
  subtract the 1 again, so the tensors are the HF checkpoint's w.

Every tensor type the `gguf` package can dequantize is read (the K-quants and
IQ types included); one it cannot is an error naming the tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import gguf
import numpy as np

from flaxlm.model.errors import CheckpointError
from flaxlm.model.gguf_arch import (ARCHS, EXPERT_GATE_UP, GLOBAL_NAMES, ROPE_FREQS, ROPE_LONG, ROPE_SHORT, GGUFArch,
                                    Metadata, architecture, expected_shapes, hf_config)

_QT = gguf.GGMLQuantizationType
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_TABLES = (ROPE_FREQS, ROPE_LONG, ROPE_SHORT)
SUPPORTED_ARCHITECTURES = tuple(ARCHS)  # and `llama` files with experts (Mixtral)


@functools.lru_cache(maxsize=None)
def can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether the installed `gguf` package dequantizes `qtype` (tried on one all-zero block)."""
    if qtype in (_QT.F32, _QT.F16):
        return True
    if qtype not in gguf.GGML_QUANT_SIZES:
        return False
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def readable_types() -> list[str]:
    return [qtype.name for qtype in _QT if can_dequantize(qtype)]


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file in HF form.

    `tensors` holds float32 arrays under HF names and shapes, except that
    `read_gguf(..., dequantize=False)` keeps the weights stored as Q8_0 as
    their stored rows (uint8 [rows, 34 bytes per 32 values], rows in HF
    order); `q8_0_rows` names those. `types` maps each name to its GGUF
    storage type ("Q8_0", "Q4_K", "F32", ...).
    """

    hf_config: dict
    metadata: dict
    tensors: dict[str, np.ndarray]
    types: dict[str, str]
    q8_0_rows: frozenset[str] = frozenset()


def read_gguf(path, dequantize: bool = True) -> GGUFCheckpoint:
    """Read a GGUF file into an HF config, metadata and HF-named tensors (see GGUFCheckpoint)."""
    path = Path(path)
    reader, metadata = _read(path)
    arch, meta = _architecture(metadata, path)
    stored = _stored_tensors(reader, arch, meta)
    shapes = {name: _hf_shape(t) for name, t in stored.items() if name not in _ROPE_TABLES}
    tables = {name: np.array(stored[name].data) for name in _ROPE_TABLES if name in stored}
    config = hf_config(arch, meta, shapes, tables)
    _check_shapes(stored, config, path)
    weights = {name: tensor for name, tensor in stored.items() if name not in _ROPE_TABLES}
    rows = frozenset() if dequantize else frozenset(
        name for name, t in weights.items()
        if t.tensor_type == _QT.Q8_0 and len(t.shape) == 2 and not _is_norm(name, arch))
    tensors = {name: _hf_tensor(name, t, arch, config, name in rows) for name, t in weights.items()}
    types = {name: t.tensor_type.name for name, t in weights.items()}
    _fuse_gate_up_experts(tensors, types)
    return GGUFCheckpoint(hf_config=config, metadata=metadata, tensors=tensors, types=types, q8_0_rows=rows)


def gguf_tensor_types(path) -> dict[str, str]:
    """Map each weight's HF name to its GGUF storage type name ('Q8_0', 'Q4_K', 'F32', ...)."""
    path = Path(path)
    reader, metadata = _read(path)
    arch, meta = _architecture(metadata, path)
    stored = _stored_tensors(reader, arch, meta)
    return {name: t.tensor_type.name for name, t in stored.items() if name not in _ROPE_TABLES}


def read_gguf_metadata(path) -> dict:
    """Every GGUF key/value of a file as plain python values (str, int, float, bool, lists)."""
    return _read(Path(path))[1]


class _Reader(gguf.GGUFReader):
    """`gguf.GGUFReader` over a plain ndarray view of the file's memory map (no copy).
    The reader slices its `data` ~250,000 times to parse a tokenizer's metadata, and every
    slice of an `np.memmap` runs numpy's Python-level memmap hooks: on SmolLM2's GGUF
    (49,152-token vocabulary) parsing takes 1.1 s this way instead of 1.9 s."""

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def _read(path: Path) -> tuple[gguf.GGUFReader, dict]:
    """Parse the file's header; every way it can fail becomes a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = _Reader(path)
        metadata = {
            name: field.contents()
            for name, field in reader.fields.items()
            if not name.startswith("GGUF.")  # the header's version and counts, not key/values
        }
    except (ValueError, IndexError, KeyError, OSError, OverflowError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e
    return reader, metadata


def _architecture(metadata: dict, path: Path) -> tuple[GGUFArch, Metadata]:
    name = metadata.get("general.architecture")
    arch = architecture(name, metadata)
    if arch is None:
        raise CheckpointError(f"{path}: general.architecture is {name!r}; flaxlm reads GGUF files of the "
                              f"architectures {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch, Metadata(metadata, name, path)


def _stored_tensors(reader: gguf.GGUFReader, arch: GGUFArch, meta: Metadata) -> dict:
    """The reader's tensors keyed by HF name, after checking that they are complete and readable."""
    n_layers = meta.required("block_count")
    by_name = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight"}
    expected |= {f"blk.{i}.{kind}.weight" for i in range(n_layers) for kind in arch.layer}
    expected |= {f"blk.{i}.{kind}.bias" for i in range(n_layers) for kind in arch.biases}
    if arch.experts:  # gate and up experts, or both fused
        expected |= {f"blk.{i}.{kind}.weight" for i in range(n_layers) for kind in ("ffn_gate_exps", "ffn_up_exps")
                     if f"blk.{i}.ffn_gate_up_exps.weight" not in by_name}
    missing = sorted(expected - set(by_name))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise meta.error(f"missing tensors of a {n_layers}-layer {meta.arch}: {shown}")
    for tensor in reader.tensors:
        if not can_dequantize(tensor.tensor_type):
            raise meta.error(f"tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the gguf package "
                             f"cannot dequantize; flaxlm reads {', '.join(readable_types())}")
    return {_hf_name(t.name, arch, meta, n_layers): t for t in reader.tensors}


def _hf_name(gguf_name: str, arch: GGUFArch, meta: Metadata, n_layers: int) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if suffix == "weight" and base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.weight"
    if gguf_name in _ROPE_TABLES:
        return gguf_name
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and int(match[1]) < n_layers and arch.experts and match[3] == "weight" and (
            match[2] in EXPERT_GATE_UP or match[2] == "ffn_down_exps"):
        return f"model.layers.{match[1]}.{EXPERT_GATE_UP.get(match[2], arch.layer.get(match[2]))}"
    if match and int(match[1]) < n_layers and match[2] in arch.layer and (
            match[3] == "weight" or match[2] in arch.biases):
        return f"model.layers.{match[1]}.{arch.layer[match[2]]}.{match[3]}"
    raise meta.error(f"unexpected tensor {gguf_name!r} in a {meta.arch} GGUF with {n_layers} layers")


def _fuse_gate_up_experts(tensors: dict, types: dict) -> None:
    """Stacked gate and up experts [E, F, D] into HF's `mlp.experts.gate_up_proj` [E, 2F, D], gate first."""
    for gate_name in [name for name in tensors if name.endswith(".mlp.experts.gate_proj")]:
        up_name = gate_name.replace(".gate_proj", ".up_proj")
        fused = gate_name.replace(".gate_proj", ".gate_up_proj")
        tensors[fused] = np.concatenate([tensors.pop(gate_name), tensors.pop(up_name)], axis=1)
        gate_type, up_type = types.pop(gate_name), types.pop(up_name)
        types[fused] = gate_type if gate_type == up_type else f"{gate_type}+{up_type}"


def _hf_shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest first


def _check_shapes(stored: dict, config: dict, path: Path) -> None:
    """Every weight's HF shape must follow from the config (a wrong head count shows here)."""
    expected = expected_shapes(config)
    for name, tensor in stored.items():  # experts' names have no .weight: their last two parts still key
        want = expected.get(".".join(name.rsplit(".", 2)[-2:]))
        if want is not None and _hf_shape(tensor) != want:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} has shape {list(_hf_shape(tensor))} "
                                  f"but the metadata implies {list(want)}")


def _is_norm(hf_name: str, arch: GGUFArch) -> bool:
    return arch.norm_offset != 0 and hf_name.endswith("norm.weight")


def _hf_tensor(hf_name: str, tensor, arch: GGUFArch, config: dict, keep_stored: bool) -> np.ndarray:
    """One tensor in HF layout: float32 (or stored Q8_0 rows), q/k rows un-permuted, norm offsets removed."""
    if keep_stored:
        data = np.array(tensor.data)  # a copy: the reader's arrays view a read-only memmap
    else:
        data = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if _is_norm(hf_name, arch):
        data -= np.float32(arch.norm_offset)
    if arch.permuted_qk and ".self_attn.q_proj." in hf_name:
        return _unpermute_qk_rows(data, config["num_attention_heads"])
    if arch.permuted_qk and ".self_attn.k_proj." in hf_name:
        return _unpermute_qk_rows(data, config["num_key_value_heads"])
    return data


def _unpermute_qk_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of q/k rows (transformers' `_reverse_permute_weights`).

    llama.cpp interleaves each head's two rotary halves; HF keeps them as halves.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
