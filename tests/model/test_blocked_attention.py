"""Blocked causal attention (the no-cache path with segment-id masks) computes what the
full product computes: outputs and gradients, per attention call and per model, for
plain, padded and packed rows, GQA/MQA, soft-capping, sliding windows and lengths that
are no multiple of the block; and a key after the query in its row is never attended."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxlm.model.attention as attention
from flaxlm.model import Decoder, ModelConfig
from flaxlm.model.attention import attention_mask, dot_product_attention, query_blocks
from flaxlm.model.hf_config import config_from_hf
from flaxlm.model.hf_weights import params_from_hf
from flaxlm.model.params import build_model
from tests.hf_models import make_hf_model

# Both paths sum the same float32 terms in other orders (other shapes): measured max
# |diff| / max |value| below 5e-7 here; 1e-5 relative to the largest value leaves room.
RTOL = 1e-5
T = 300  # blocks of 64 rows, the last of 44


def _close(actual, expected):
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale)


def _rows(kind: str, t: int = T):
    """(positions, segments) [2, t] of one batch of `kind`."""
    index = np.arange(t)
    segments, positions = np.ones((2, t), np.int32), np.tile(index, (2, 1))
    if kind == "padded":  # row 0 left-padded by 40, row 1 right-padded by 23
        segments[0, :40], segments[1, t - 23:] = 0, 0
        positions[0] = np.maximum(index - 40, 0)
    elif kind == "packed":  # documents of 50, 170, 80 and 90, 210 tokens, own positions
        for row, lengths in enumerate([(50, 170, 80), (90, 210)]):
            starts = np.cumsum((0,) + lengths[:-1])
            for doc, (a, n) in enumerate(zip(starts, lengths)):
                segments[row, a:a + n], positions[row, a:a + n] = doc + 1, np.arange(n)
    return jnp.asarray(positions), jnp.asarray(segments)


def _mask(positions, segments, window=None):
    t = positions.shape[1]
    return attention_mask(positions, segments, positions, segments, window) & jnp.tril(
        jnp.ones((t, t), bool))


def test_blocks_cover_the_sequence_in_powers_of_two():
    assert query_blocks(255) == ((0, 255),)
    assert query_blocks(T) == ((0, 64), (64, 128), (128, 192), (192, 256), (256, 300))
    assert [b - a for a, b in query_blocks(2048)] == [256] * 8
    for t in (256, 300, 1000, 4097):
        blocks = query_blocks(t)
        assert blocks[0][0] == 0 and blocks[-1][1] == t and len(blocks) <= 9
        assert all(a == z for (_, a), (z, _) in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("kind, heads, kv_heads, softcap, window", [
    ("plain", 4, 4, None, None),
    ("padded", 4, 2, None, None),    # GQA
    ("packed", 4, 1, None, None),    # MQA
    ("plain", 4, 2, 2.0, None),      # soft-capping (Gemma 2)
    ("packed", 4, 2, 2.0, 24),       # a sliding window, shorter than a block
    ("padded", 2, 2, None, 100),     # a window longer than a block
])
def test_blocked_equals_full_attention_and_gradients(kind, heads, kv_heads, softcap, window):
    positions, segments = _rows(kind)
    mask = _mask(positions, segments, window)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, T, heads, 16))
    k, v = (jax.random.normal(key, (2, kv_heads, T, 16)) for key in keys[1:3])
    # Padding queries attend to nothing: their outputs differ by design (a mean of other
    # values) and nothing reads them, so the loss weighs only real queries.
    weight = jax.random.normal(keys[3], (2, T, heads, 16)) * (segments != 0)[:, :, None, None]

    def loss(q, k, v, causal):
        out = dot_product_attention(q, k, v, mask, 0.3, softcap, causal=causal)
        return jnp.sum(out * weight), out

    (_, full), full_grads = jax.jit(jax.value_and_grad(
        lambda *a: loss(*a, False), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, blocked), blocked_grads = jax.jit(jax.value_and_grad(
        lambda *a: loss(*a, True), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    real = np.asarray(segments != 0)
    _close(np.asarray(blocked)[real], np.asarray(full)[real])
    for got, want in zip(blocked_grads, full_grads):
        _close(got, want)


def _full_only(monkeypatch):
    monkeypatch.setattr(attention, "query_blocks", lambda t: ((0, t),))


def _hf_built(name):
    hf = make_hf_model(name)
    config = config_from_hf(hf.config.to_dict(), name)
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    return build_model(config, params_from_hf(config, tensors, name), name)


@pytest.mark.parametrize("name, kind", [
    ("tiny-llama", "padded"),
    ("llama-mqa", "packed"),
    ("gemma2-softcap", "packed"),       # soft-capping, a window of 24 on one layer
])
def test_model_logits_and_gradients_equal_the_full_path(monkeypatch, name, kind):
    model = (Decoder(ModelConfig.preset(name), rngs=nnx.Rngs(0)) if name == "tiny-llama"
             else _hf_built(name))
    positions, segments = _rows(kind)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 320, (2, T)))
    weight = np.random.default_rng(2).normal(size=(2, T, model.config.vocab_size))
    weight = jnp.asarray(weight * np.asarray(segments != 0)[:, :, None], jnp.float32)
    graphdef, params = nnx.split(model)

    def run():
        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens, positions, segments)
            return jnp.sum(logits * weight), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, blocked), blocked_grads = run()
    _full_only(monkeypatch)
    (_, full), full_grads = run()
    real = np.asarray(segments != 0)
    _close(np.asarray(blocked)[real], np.asarray(full)[real])
    for got, want in zip(jax.tree.leaves(blocked_grads), jax.tree.leaves(full_grads)):
        _close(got, want)


def test_a_later_key_is_never_attended_whatever_the_positions():
    """Positions that do not increase along the row (here all equal) leave the mask causal
    by index, as in HF: a token's logits do not change with the tokens after it."""
    model = Decoder(ModelConfig.preset("tiny-llama"), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(3).integers(0, 512, (1, T))
    changed = tokens.copy()
    changed[0, 100:] = (changed[0, 100:] + 1) % 512  # blocks 1-4 see them
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda x: nnx.merge(graphdef, params)(x, jnp.zeros((1, T), jnp.int32)))
    a, b = (np.asarray(forward(jnp.asarray(x))) for x in (tokens, changed))
    np.testing.assert_array_equal(a[0, :100], b[0, :100])
    assert np.abs(a[0, 100:] - b[0, 100:]).max() > 1e-3
