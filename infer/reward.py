"""Scoring texts with a reward model (flaxlm.model.reward): one scalar per text or chat.

    rm = RewardModel.load("runs/rm/export")        # an HF *ForSequenceClassification dir
    rm.score(["some text", [{"role": "user", ...}, {"role": "assistant", ...}]])

A chat (a list of {"role", "content"} messages) is rendered with the tokenizer's chat
template, as reward-model training renders its pairs; a string is tokenized as it is.
Neither gets special tokens added (the template writes them). Rows are right-padded to
a multiple of `pad_to` tokens and scored `batch_size` at a time by one compiled
program per padded shape; the reward is read at each text's last token.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.model.errors import ConfigError
from flaxlm.model.reward import last_token_rewards, load_reward_model
from flaxlm.model.tokenizer import Tokenizer

Text = str | Sequence[Mapping[str, Any]]


@jax.jit
def _rewards(graphdef, state, tokens, positions, segments):
    return last_token_rewards(nnx.merge(graphdef, state), tokens, positions, segments)


@dataclasses.dataclass
class RewardModel:
    model: nnx.Module           # a Decoder with its score head
    tokenizer: Tokenizer

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: str = "float32") -> RewardModel:
        model, tokenizer = load_reward_model(path, dtype)
        if tokenizer is None:
            raise ConfigError(f"{path}: the reward model has no tokenizer (tokenizer.json)")
        return cls(model, tokenizer)

    def encode(self, text: Text) -> list[int]:
        if not isinstance(text, str):
            text = self.tokenizer.apply_chat_template(list(text), add_generation_prompt=False)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ConfigError("an empty text has no last token to score")
        return ids

    def score(self, texts: Sequence[Text], batch_size: int = 8, pad_to: int = 64
              ) -> np.ndarray:
        """Rewards [len(texts)] (float32)."""
        encoded = [self.encode(t) for t in texts]
        limit = self.model.config.max_seq_len
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                raise ConfigError(f"text {i} has {len(ids)} tokens, above the model's "
                                  f"context ({limit})")
        graphdef, state = nnx.split(self.model)
        out = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = min(-(-max(map(len, chunk)) // pad_to) * pad_to, limit)
            tokens = np.zeros((batch_size, width), np.int32)
            segments = np.zeros((batch_size, width), np.int32)
            for row, ids in enumerate(chunk):
                tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
            positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
            rewards = _rewards(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions),
                               jnp.asarray(segments))
            out.append(np.asarray(rewards)[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)
