"""Reward models: the decoder and a scalar head read at the last real token.

A reward model is a `Decoder` with a `ScoreHead` attached as `model.score_head`: the
final-norm hidden state of each sequence's last real token (the last one whose
segment id is not 0) times a vector [embed] is the reward, as Hugging Face's
`LlamaForSequenceClassification` (num_labels = 1) reads `score(hidden)` at the last
token that is not padding. `save_reward_model` writes that layout (the decoder's
weights as `save_hf` writes them, `score.weight` [1, embed], the architecture
`*ForSequenceClassification`, a pad token), so
`transformers.AutoModelForSequenceClassification` loads it and returns the same
rewards; `load_reward_model` reads it back and refuses a checkpoint without a head.

HF finds the last token as the last one that is not the pad token: the two agree for
texts that do not end in the pad token (a chat rendered with its template ends after
the end-of-turn marker, e.g. "<|im_end|>\\n").
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from flaxlm.model.errors import CheckpointError, ConfigError
from flaxlm.model.tokenizer import Tokenizer

SCORE_WEIGHT = "score.weight"


class ScoreParam(nnx.Param):
    """The reward head's weight: trains with any fine-tuning method."""


class ScoreHead(nnx.Module):
    def __init__(self, embed_dim: int, rngs: nnx.Rngs):
        self.kernel = ScoreParam(jax.random.normal(rngs.params(), (embed_dim,), jnp.float32)
                                 / math.sqrt(embed_dim), logical_axes=("embed",))


def add_score_head(model: nnx.Module, rngs: nnx.Rngs) -> ScoreHead:
    """Attach a fresh head (normal, std 1/sqrt(embed)) to `model` in place."""
    if getattr(model, "score_head", None) is not None:
        raise ConfigError("the model already has a score head")
    model.score_head = nnx.data(ScoreHead(model.config.embed_dim, rngs))
    return model.score_head


def last_token_rewards(model: nnx.Module, tokens: jax.Array, positions: jax.Array,
                       segment_ids: jax.Array) -> jax.Array:
    """Rewards [batch] (float32) of right-padded rows [batch, seq] (segment id 0: padding)."""
    head = getattr(model, "score_head", None)
    if head is None:
        raise ConfigError("the model has no score head: it is not a reward model")
    hidden, _ = model.hidden(tokens, positions, attention_mask=segment_ids)  # [b, s, embed]
    last = jnp.maximum(jnp.sum(segment_ids != 0, axis=-1) - 1, 0)          # [b]
    picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [b, embed]
    return picked.astype(jnp.float32) @ head.kernel[...].astype(jnp.float32)


# ---------------------------------------------------------------- HF layout

def save_reward_model(model: nnx.Module, tokenizer: Tokenizer | None,
                      directory: str | os.PathLike) -> Path:
    """An HF `*ForSequenceClassification` directory (num_labels 1) of a reward model."""
    from flaxlm.model.loading import save_hf

    head = getattr(model, "score_head", None)
    if head is None:
        raise ConfigError("the model has no score head: it is not a reward model")
    model.score_head = None
    try:
        directory = save_hf(model, tokenizer, directory)
    finally:
        model.score_head = head
    config = json.loads((directory / "config.json").read_text())
    if "quantization_config" in config:
        raise ConfigError("an int8 reward model cannot be written in the HF layout")
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    eos = config.get("eos_token_id")
    config.update(architectures=[a.replace("ForCausalLM", "ForSequenceClassification")
                                 for a in config.get("architectures", [])],
                  num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                  pad_token_id=pad if pad is not None else (eos[0] if isinstance(eos, list)
                                                            else eos))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(str(directory / "model.safetensors"))
    tensors[SCORE_WEIGHT] = np.asarray(head.kernel[...], np.float32)[None, :]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def read_score_weight(directory: str | os.PathLike) -> np.ndarray:
    """The `score.weight` [1, embed] of an HF directory; a CheckpointError without one."""
    directory = Path(directory)
    for path in sorted(directory.glob("*.safetensors")) if directory.is_dir() else []:
        with safe_open(str(path), "numpy") as f:
            if SCORE_WEIGHT in f.keys():
                weight = f.get_tensor(SCORE_WEIGHT)
                if weight.ndim != 2 or weight.shape[0] != 1:
                    raise CheckpointError(f"{path}: {SCORE_WEIGHT} has shape {weight.shape}; "
                                          "a reward model has one label, [1, embed]")
                return weight
    raise CheckpointError(f"{directory}: not a reward model: no score head ({SCORE_WEIGHT} in "
                          "an HF directory's safetensors); train one with finetune.objective "
                          "= \"reward\" and export it")


def load_reward_model(directory: str | os.PathLike, dtype: str = "float32"
                      ) -> tuple[nnx.Module, Tokenizer | None]:
    """(the decoder with its score head, tokenizer) of a reward model's HF directory."""
    from flaxlm.model.loading import load

    weight = read_score_weight(directory)
    model, tokenizer = load(directory, dtype=dtype)
    if weight.shape[1] != model.config.embed_dim:
        raise CheckpointError(f"{directory}: {SCORE_WEIGHT} is [1, {weight.shape[1]}], the "
                              f"model's hidden size is {model.config.embed_dim}")
    head = add_score_head(model, nnx.Rngs(0))
    head.kernel[...] = jnp.asarray(weight[0], jnp.float32)
    return model, tokenizer


def score_texts(model: nnx.Module, tokenizer: Tokenizer, texts, batch_size: int = 8,
                pad_to: int = 64) -> np.ndarray:
    """Rewards [len(texts)] of strings (tokenized as they are) or chats (lists of
    {"role", "content"}, rendered with the chat template as reward training renders its
    pairs); no special tokens are added (the template writes them). Rows are right-padded
    to a multiple of `pad_to` and scored `batch_size` at a time by one compiled program
    per padded shape."""
    encoded = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            text = tokenizer.apply_chat_template(list(text), add_generation_prompt=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not ids or len(ids) > model.config.max_seq_len:
            raise ConfigError(f"text {i} has {len(ids)} tokens; a reward needs 1 to "
                              f"{model.config.max_seq_len} (the model's context)")
        encoded.append(ids)
    graphdef, state = nnx.split(model)
    out = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = min(-(-max(map(len, chunk)) // pad_to) * pad_to, model.config.max_seq_len)
        tokens = np.zeros((batch_size, width), np.int32)
        segments = np.zeros((batch_size, width), np.int32)
        for row, ids in enumerate(chunk):
            tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
        rewards = _compiled_rewards(graphdef, state, jnp.asarray(tokens),
                                    jnp.asarray(positions), jnp.asarray(segments))
        out.append(np.asarray(rewards)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


@jax.jit
def _compiled_rewards(graphdef, state, tokens, positions, segments):
    return last_token_rewards(nnx.merge(graphdef, state), tokens, positions, segments)
