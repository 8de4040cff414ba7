"""flaxlm logits equal HF transformers' on tiny random models of every supported family."""

import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.model import load
from tests.hf_models import VARIANTS, hf_logits, make_hf_model

ATOL = 1e-4  # float32; HF's own float32-vs-float64 noise is far below this on tiny models
SEQ = 72


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    hf_model = make_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory, safe_serialization=True)
    model, tokenizer = load(directory)
    assert tokenizer is None  # no tokenizer.json written
    return request.param, hf_model, model


def _ids(batch, seq, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))


def test_logits_match(pair):
    name, hf_model, model = pair
    ids = _ids(2, SEQ, model.config.vocab_size)
    ours = np.asarray(model(jnp.asarray(ids)))
    ref = hf_logits(hf_model, ids)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= ATOL, f"{name}: max abs diff {np.abs(ours - ref).max()}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches(pair, side):
    name, hf_model, model = pair
    lengths = [SEQ, SEQ - 17, SEQ - 40]
    ids = _ids(len(lengths), SEQ, model.config.vocab_size, seed=1)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, SEQ - n:] = 1
        else:
            mask[row, :n] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = hf_logits(hf_model, ids, attention_mask=mask, position_ids=positions)
    valid = mask.astype(bool)
    diff = np.abs(ours[valid] - ref[valid]).max()
    assert diff <= ATOL, f"{name} {side}-padded: max abs diff {diff}"
    # Padding changes nothing: each row alone gives the same logits.
    for row, n in enumerate(lengths):
        alone = np.asarray(model(jnp.asarray(ids[row][valid[row]][None])))[0]
        assert np.abs(alone - ours[row][valid[row]]).max() <= ATOL
