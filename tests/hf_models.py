"""Tiny random Hugging Face models for parity tests, built offline."""

from __future__ import annotations

import torch
import transformers

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            max_position_embeddings=256, rms_norm_eps=1e-5)

# name -> (config class, extra config kwargs)
VARIANTS = {
    "llama-mha": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mqa": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama-tied": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                                 tie_word_embeddings=True)),
    "llama3-rope": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32))),
    "llama-linear-rope": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=2,
        rope_scaling=dict(rope_type="linear", factor=4.0))),
    "mistral-window": (transformers.MistralConfig, dict(num_attention_heads=4,
                                                       num_key_value_heads=2, sliding_window=24)),
    "qwen2-bias": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=320, n_embd=64, n_layer=2, n_head=4,
                                           n_positions=256)),
}


def make_hf_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A float32 HF causal LM with random weights (biases random too, so they are tested)."""
    config_cls, extra = VARIANTS[name]
    kwargs = extra if config_cls is transformers.GPT2Config else {**TINY, **extra}
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():  # norms and biases are 1/0 at init: randomize them
            p.add_(0.05 * torch.randn_like(p))
    return model.eval().float()


def hf_logits(model, ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids),
                    attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask),
                    position_ids=None if position_ids is None else torch.as_tensor(position_ids))
    return out.logits.float().numpy()


def save_tokenizer(directory, vocab_size: int) -> None:
    """Train a byte-level BPE of `vocab_size` on a little text and save it with an
    EOS token (id 0), so tiny models can be used through the text API."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ("The quick brown fox jumps over the lazy dog. " * 20
            + "def main():\n    return 42\n" * 20 + "Hello, world! 12345 " * 20)
    tok.train_from_iterator([text], trainer)
    tok.save(str(directory / "tokenizer.json"))
    import json
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
