"""Tiny random Hugging Face models for parity tests, built offline."""

from __future__ import annotations

import numpy as np
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
    "llama-bias": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                                 attention_bias=True, mlp_bias=True)),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=320, n_embd=64, n_layer=2, n_head=4,
                                           n_positions=256)),
    # q/k norms; layers from max_window_layers on slide.
    "qwen3-window": (transformers.Qwen3Config, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
        sliding_window=24, max_window_layers=1)),
    # 1 + w norms, post-norms, scaled embeddings, query_pre_attn_scalar != head_dim, caps
    # small enough to bend these logits, a local layer with a window shorter than SEQ.
    "gemma2-softcap": (transformers.Gemma2Config, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=24,
        query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=1.5)),
    # q/k norms; local layer RoPE base 1e4, global 1e6 with linear scaling.
    "gemma3-local-global": (transformers.Gemma3TextConfig, dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=24,
        layer_types=["sliding_attention", "full_attention"], rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, rope_scaling=dict(rope_type="linear", factor=2.0))),
    # Phi-3-mini-4k's shape of options: fused projections, a window on every layer.
    "phi3-window": (transformers.Phi3Config, dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=24, pad_token_id=0,
        eos_token_id=1, bos_token_id=2)),
    # LongRoPE with SEQ past original_max_position_embeddings, half the head rotated.
    "phi3-longrope": (transformers.Phi3Config, dict(
        num_attention_heads=4, num_key_value_heads=2, original_max_position_embeddings=32,
        partial_rotary_factor=0.5, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        rope_scaling=dict(type="longrope", short_factor=[1.0, 1.1, 1.3, 1.6],
                          long_factor=[1.0, 2.5, 4.0, 9.0]))),
    # Layer 1 without RoPE.
    "smollm3-nope": (transformers.SmolLM3Config, dict(
        num_attention_heads=4, num_key_value_heads=2, no_rope_layers=[1, 0],
        pad_token_id=0, eos_token_id=1, bos_token_id=2)),
    # Top-2 of 4 experts, renormalized.
    "mixtral-moe": (transformers.MixtralConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2)),
    # A dense layer 0, then top-2 of 4 experts without renormalization.
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[0],
        norm_topk_prob=False)),
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


def jitted(model):
    """`model(ids, attention_mask=mask)` as one jit program per shape: on these tiny
    models compiling the whole forward is 5-7x faster than running it op by op."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask))

    def forward(ids, attention_mask=None):
        ids = np.asarray(ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        return np.asarray(run(state, ids, mask))

    return forward


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
