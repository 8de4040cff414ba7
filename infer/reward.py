"""Scoring texts with a reward model (flaxlm.model.reward): one scalar per text or chat.

    rm = RewardModel.load("runs/rm/export")        # an HF *ForSequenceClassification dir
    rm.score(["some text", [{"role": "user", ...}, {"role": "assistant", ...}]])

A chat (a list of {"role", "content"} messages) is rendered with the tokenizer's chat
template, as reward-model training renders its pairs; a string is tokenized as it is.
Neither gets special tokens added (the template writes them). The reward is read at
each text's last token (flaxlm.model.reward.score_texts: padded batches, one compiled
program per padded shape).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np
from flax import nnx

from flaxlm.model.errors import ConfigError
from flaxlm.model.reward import load_reward_model, score_texts
from flaxlm.model.tokenizer import Tokenizer

Text = str | Sequence[Mapping[str, Any]]


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
        """The token ids a text is scored on."""
        if not isinstance(text, str):
            text = self.tokenizer.apply_chat_template(list(text), add_generation_prompt=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def score(self, texts: Sequence[Text], batch_size: int = 8, pad_to: int = 64) -> np.ndarray:
        """Rewards [len(texts)] (float32)."""
        return score_texts(self.model, self.tokenizer, texts, batch_size, pad_to)
