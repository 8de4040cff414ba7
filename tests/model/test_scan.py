"""`ModelConfig.scan_layers`: the layers as one lax.scan compute what the unrolled layers do."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from flaxlm.model import ConfigError, Decoder, ModelConfig
from flaxlm.model.lora import LoraConfig, adapters, apply_lora
from flaxlm.model.prompt_tuning import PromptTuning, apply_prompt_tuning

TINY = ModelConfig.tiny()
CONFIGS = {
    # period 1: five repeats of one layer
    "llama": TINY.replace(num_layers=5),
    # period 2 (sliding, full) with Gemma 3's local RoPE base: two repeats and one
    # layer after them, unrolled
    "sliding-full": TINY.replace(num_layers=5, layer_attention=("sliding", "full"),
                                 sliding_window=4, local_rope_theta=1000.0),
    # period 2 (dense, MoE): router logits come out of the scan in layer order
    "dense-moe": TINY.replace(num_layers=4, layer_mlp=("dense", "moe"), num_experts=4,
                              experts_per_token=2, expert_mlp_dim=32),
}


def _tokens(batch=2, seq=12, seed=0):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, (batch, seq)).astype(np.int32)


def _twins(config: ModelConfig):
    """The same weights (seed 0) as an unrolled and a scanned model."""
    return (Decoder(config, rngs=nnx.Rngs(0)),
            Decoder(config.replace(scan_layers=True), rngs=nnx.Rngs(0)))


@nnx.jit
def _run(model, tokens, segments):
    """(logits, router logits) of the forward without a cache; nnx.jit carries the
    models' random state (LoRA dropout counts) in and out."""
    return model.with_router_logits(tokens, attention_mask=segments)


def _lowered(model, tokens) -> str:
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, tokens).as_text()


@pytest.mark.parametrize("name", CONFIGS)
def test_scanned_forward_equals_unrolled(name):
    plain, scanned = _twins(CONFIGS[name])
    tokens = _tokens()
    segments = np.ones_like(tokens)
    segments[1, 7:] = 2  # a packed row: two documents
    segments[0, 10:] = 0  # and padding
    logits, routers = _run(plain, tokens, segments)
    scan_logits, scan_routers = _run(scanned, tokens, segments)
    np.testing.assert_allclose(scan_logits, logits, rtol=1e-6, atol=1e-6)
    assert len(scan_routers) == len(routers) == plain.config.layer_kinds("mlp").count("moe")
    for ours, theirs in zip(scan_routers, routers, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    # the scanned program traces one body per place in the pattern, not every layer
    dots = [_lowered(m, tokens).count("stablehlo.dot_general") for m in (plain, scanned)]
    assert dots[1] < dots[0], dots


def test_scanned_soft_prompt_equals_unrolled():
    models = _twins(CONFIGS["llama"])
    for model in models:
        apply_prompt_tuning(model, PromptTuning(num_virtual_tokens=3, init="random"),
                            nnx.Rngs(5))
    tokens, segments = _tokens(), np.ones((2, 12), np.int32)
    (logits, _), (scanned, _) = (_run(m, tokens, segments) for m in models)
    np.testing.assert_allclose(scanned, logits, rtol=1e-6, atol=1e-6)


def test_scanned_lora_dropout_draws_each_layers_own_masks():
    """In training mode each layer's LoRA dropout draws from its own stream, scanned or
    not, and the scan writes the streams' advanced counts back to the layers."""
    models = _twins(CONFIGS["llama"])
    for model in models:
        apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.5),
                   nnx.Rngs(params=0, dropout=1))
        for lora in adapters(model).values():  # B nonzero, so dropout shows in the logits
            lora.b[...] = jax.random.normal(jax.random.key(2), lora.b.shape) * 0.1
        model.train()
    tokens, segments = _tokens(), np.ones((2, 12), np.int32)
    for _ in range(2):  # the second call draws new masks from the advanced counts
        (logits, _), (scanned, _) = (_run(m, tokens, segments) for m in models)
        np.testing.assert_allclose(scanned, logits, rtol=1e-6, atol=1e-6)
    counts = [jax.tree.map(np.asarray, nnx.state(m, nnx.RngCount)) for m in models]
    assert jax.tree.all(jax.tree.map(np.array_equal, *counts))
    assert {int(c) for c in jax.tree.leaves(counts[0])} == {2}


def test_layers_built_unlike_are_refused():
    _, scanned = _twins(CONFIGS["llama"])
    apply_lora(scanned, LoraConfig(rank=4, alpha=8, targets=("layers.0.attn.q_proj",)),
               nnx.Rngs(0))
    with pytest.raises(ConfigError, match="layer 1 is built unlike layer 0"):
        _run(scanned, _tokens(), np.ones((2, 12), np.int32))


@pytest.mark.parametrize("changes, period, repeats", [
    (dict(num_layers=3, layer_attention=("sliding", "full", "full"), sliding_window=4), 3, 1),
    (dict(num_layers=5, layer_attention=("sliding", "full"), sliding_window=4,
          layer_mlp=("dense", "moe", "dense"), num_experts=4, experts_per_token=2,
          expert_mlp_dim=32), 6, 0),
    (dict(num_layers=1), 1, 1),
])
def test_too_few_repeats_of_the_layer_pattern_are_refused(changes, period, repeats):
    with pytest.raises(ConfigError, match=f"period of {period} .* hold {repeats} repeat"):
        TINY.replace(scan_layers=True, **changes)
    assert not TINY.replace(**changes).scan_layers  # fine unscanned


def test_scan_layers_must_be_a_bool():
    with pytest.raises(ConfigError, match="scan_layers must be true or false, got 1"):
        TINY.replace(scan_layers=1)
