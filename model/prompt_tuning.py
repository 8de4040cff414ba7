"""Prompt tuning: N trainable virtual-token embeddings prepended to every input (PEFT's
PROMPT_TUNING for causal LMs).

`apply_prompt_tuning(model, cfg, rngs, tokenizer)` sets `model.soft_prompt`, a `SoftPrompt`
whose `embedding` [N, embed] is a `PromptParam` (what prompt tuning differentiates:
`prompt_filter`); the decoder then runs [virtual tokens, input] and returns outputs for the
input tokens only (see `Decoder`). Initialised as PEFT does: "text" takes the token
embeddings of `init_text` (encoded with the tokenizer's special tokens, repeated or cut to
N tokens), "random" draws N(0, 1) like torch.nn.Embedding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.model.errors import ConfigError

PROMPT_INITS = ("text", "random")


class PromptParam(nnx.Param):
    """Soft-prompt embeddings: what prompt tuning differentiates."""


prompt_filter = PromptParam  # an nnx filter: the virtual-token embeddings, nothing else


@dataclasses.dataclass(frozen=True)
class PromptTuning:
    """num_virtual_tokens N > 0; init "text" (the embeddings of init_text's tokens) or
    "random"."""

    num_virtual_tokens: int
    init: str = "random"
    init_text: str | None = None

    def __post_init__(self):
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"prompt tuning needs num_virtual_tokens > 0, got {n!r}")
        if self.init not in PROMPT_INITS:
            raise ConfigError(f"prompt tuning init {self.init!r} is not one of {PROMPT_INITS}")
        if self.init == "text" and not (self.init_text or "").strip():
            raise ConfigError('prompt tuning init "text" needs a non-empty init_text')


class SoftPrompt(nnx.Module):
    """The virtual-token embeddings [N, embed] (PromptParam)."""

    def __init__(self, embeddings: jax.Array, init: str = "random", init_text: str | None = None):
        self.embedding = PromptParam(jnp.asarray(embeddings, jnp.float32),
                                     logical_axes=(None, "embed"))
        self.init, self.init_text = init, init_text  # how it began (written to adapter configs)

    @property
    def num_tokens(self) -> int:
        return self.embedding.shape[0]

    def __call__(self, batch: int, dtype) -> jax.Array:
        """[batch, N, embed] in `dtype`."""
        table = self.embedding[...].astype(dtype)
        return jnp.broadcast_to(table[None], (batch, *table.shape))


def init_token_ids(text_ids: list[int], n: int) -> list[int]:
    """PEFT's text init: the text's token ids cut to n, or repeated until there are n."""
    if not text_ids:
        raise ConfigError("prompt tuning init_text encodes to no tokens")
    return (text_ids * math.ceil(n / len(text_ids)))[:n]


def apply_prompt_tuning(model: nnx.Module, cfg: PromptTuning, rngs: nnx.Rngs,
                        tokenizer=None) -> SoftPrompt:
    """Give `model` a soft prompt of cfg.num_virtual_tokens embeddings, in place (the
    tokenizer encodes init_text for the "text" init)."""
    if model.soft_prompt is not None:
        raise ConfigError(f"the model already has a soft prompt of "
                          f"{model.soft_prompt.num_tokens} virtual tokens")
    n, dim = cfg.num_virtual_tokens, model.config.embed_dim
    if cfg.init == "text":
        if tokenizer is None:
            raise ConfigError('prompt tuning init "text" needs the model\'s tokenizer')
        ids = init_token_ids(tokenizer.encode(cfg.init_text), n)
        vocab = model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ConfigError(f"prompt tuning init_text has token ids outside the model's "
                              f"vocabulary of {vocab}")
        table = model.embed(jnp.asarray(np.asarray(ids, np.int32))).astype(jnp.float32)
    else:
        table = jax.random.normal(rngs.params(), (n, dim), jnp.float32)
    return set_prompt(model, SoftPrompt(table, cfg.init, cfg.init_text))


def set_prompt(model: nnx.Module, prompt: SoftPrompt) -> SoftPrompt:
    """Give `model` this soft prompt, in place."""
    if prompt.embedding.shape[1] != model.config.embed_dim:
        raise ConfigError(f"soft prompt of width {prompt.embedding.shape[1]} does not fit the "
                          f"model's embed_dim {model.config.embed_dim}")
    model.soft_prompt = nnx.data(prompt)
    return prompt


def remove_prompt(model: nnx.Module) -> None:
    """Drop the model's soft prompt (the model is the base again)."""
    model.soft_prompt = None
