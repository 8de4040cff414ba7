"""Decoder invariants: cached step-by-step decode equals a full forward; padding and
bfloat16 behave; every parameter carries logical axis names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.model import Decoder, KVCache, ModelConfig, abstract_model

PRESETS = ["tiny-llama", "tiny-gpt2"]
LOGICAL_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "expert", None}


def _model(name, **changes):
    return Decoder(ModelConfig.preset(name).replace(**changes), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", PRESETS + ["window"])
def test_cached_decode_equals_full_forward(name):
    model = _model("tiny-llama", sliding_window=5, layer_attention=("sliding",)) if name == "window" else _model(name)
    vocab = model.config.vocab_size
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (2, 20)))
    full = model(tokens)
    # Row 0 has a 9-token prompt, row 1 a 6-token prompt (right-padded), then
    # both decode one token per step: each row's own next tokens.
    prompt_lengths = np.array([9, 6])
    mask = (np.arange(9)[None] < prompt_lengths[:, None]).astype(np.int32)
    cache = KVCache.init(model.config, batch_size=2, max_len=32)
    logits, cache = model(tokens[:, :9], attention_mask=jnp.asarray(mask), cache=cache)
    np.testing.assert_array_equal(cache.lengths, prompt_lengths)
    for row, n in enumerate(prompt_lengths):
        np.testing.assert_allclose(logits[row, :n], full[row, :n], atol=1e-4)
    for step in range(8):
        idx = prompt_lengths + step
        step_tokens = tokens[jnp.arange(2), idx][:, None]
        logits, cache = model(step_tokens, cache=cache)
        expected = full[jnp.arange(2), idx]
        np.testing.assert_allclose(logits[:, 0], expected, atol=1e-4)
    np.testing.assert_array_equal(cache.lengths, prompt_lengths + 8)


def test_sliding_window_limits_attention():
    windowed = _model("tiny-llama", sliding_window=4, layer_attention=("sliding",))
    full = _model("tiny-llama")  # same seed, same weights
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 512, (1, 12)))
    a, b = windowed(tokens), full(tokens)
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)  # window not yet full
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3
    # Changing a token outside the window leaves the last logits unchanged.
    changed = tokens.at[0, 2].set((tokens[0, 2] + 1) % 512)
    np.testing.assert_allclose(windowed(changed)[:, -1], a[:, -1], atol=1e-5)


def test_segments_do_not_attend_across_documents():
    model = _model("tiny-llama")
    rng = np.random.default_rng(2)
    doc_a, doc_b = rng.integers(0, 512, 7), rng.integers(0, 512, 5)
    packed = jnp.asarray(np.concatenate([doc_a, doc_b])[None])
    segments = jnp.asarray([[1] * 7 + [2] * 5])
    positions = jnp.asarray([list(range(7)) + list(range(5))])
    out = model(packed, positions=positions, attention_mask=segments)
    np.testing.assert_allclose(out[0, :7], model(jnp.asarray(doc_a[None]))[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 7:], model(jnp.asarray(doc_b[None]))[0], atol=1e-5)


def test_bfloat16_close_to_float32():
    f32 = _model("tiny-llama")
    bf16 = _model("tiny-llama", dtype="bfloat16")  # float32 params, bfloat16 compute
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 512, (2, 16)))
    a, b = f32(tokens), bf16(tokens)
    assert b.dtype == jnp.float32  # logits always come back in float32
    # bfloat16 has 8 mantissa bits: relative error ~4e-3 per op; logits here are O(1).
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.1
    assert (np.argmax(a, -1) == np.argmax(b, -1)).mean() > 0.9


# One preset of each kind of parameter set (test_config loads every preset).
@pytest.mark.parametrize("name", PRESETS + ["gemma-3-1b", "smollm3-3b", "mixtral-8x7b"])
def test_every_param_has_logical_axes(name):
    model = abstract_model(ModelConfig.preset(name))  # shapes only: Mixtral is 187 GB
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var.get_value().ndim, path
        assert set(axes) <= LOGICAL_NAMES, (path, axes)


def test_forward_under_jit_with_split_state():
    model = _model("tiny-llama")
    graphdef, state = nnx.split(model)
    tokens = jnp.ones((1, 5), jnp.int32)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    np.testing.assert_allclose(forward(state, tokens), model(tokens), atol=1e-5)
