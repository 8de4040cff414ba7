"""Tiny random HF models with HF PEFT adapters (the reference), and their flaxlm twins."""

from __future__ import annotations

import jax
import numpy as np
import peft
import torch

from flaxlm.model import load
from flaxlm.model.lora import adapters
from tests.hf_models import hf_logits, make_hf_model

SEQ = 40


def randomize_adapters(model, seed: int = 0) -> None:
    """Every adapter matrix random (B is zero after apply_lora)."""
    key = jax.random.key(seed)
    for lora in adapters(model).values():
        key, ka, kb = jax.random.split(key, 3)
        lora.a[...] = 0.2 * jax.random.normal(ka, lora.a.shape)
        lora.b[...] = 0.2 * jax.random.normal(kb, lora.b.shape)


def ids(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))


def save_base(name: str, directory) -> None:
    """The tiny HF model `name` saved as an HF directory (flaxlm loads it from there)."""
    make_hf_model(name).save_pretrained(directory, safe_serialization=True)


def load_base(directory):
    model, _ = load(directory)
    return model


def peft_lora(name: str, seed: int = 1, **config) -> peft.PeftModel:
    """PEFT LoRA on a fresh copy of `name`, every adapter matrix random (B too), so the
    adapter changes the logits."""
    config = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"], **config}
    torch.manual_seed(seed)
    model = peft.get_peft_model(make_hf_model(name), peft.LoraConfig(
        task_type="CAUSAL_LM", init_lora_weights=False, **config))
    return model.eval()


def peft_prompt(name: str, num_virtual_tokens: int = 5, seed: int = 1) -> peft.PeftModel:
    torch.manual_seed(seed)
    model = peft.get_peft_model(make_hf_model(name), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
        prompt_tuning_init="RANDOM"))
    return model.eval()


def peft_logits(model: peft.PeftModel, tokens: np.ndarray) -> np.ndarray:
    """PEFT's logits for the input tokens (a soft prompt's positions dropped)."""
    logits = hf_logits(model, tokens, attention_mask=np.ones_like(tokens))
    return logits[:, logits.shape[1] - tokens.shape[1]:]
