"""flaxlm logits equal HF transformers' on tiny random models of every supported family."""

import numpy as np
import pytest
import torch
import transformers

from flaxlm.model import load, save_hf
from tests.hf_models import VARIANTS, hf_logits, jitted, make_hf_model

ATOL = 1e-4  # float32; HF's own float32-vs-float64 noise is far below this on tiny models
SEQ = 72


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    hf_model = make_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory, safe_serialization=True)
    model, tokenizer = load(directory)
    assert tokenizer is None  # no tokenizer.json written
    return request.param, hf_model, model, jitted(model)


def _ids(batch, seq, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))


def test_logits_match(pair):
    name, hf_model, model, forward = pair
    ids = _ids(2, SEQ, model.config.vocab_size)
    ours = forward(ids)
    ref = hf_logits(hf_model, ids)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= ATOL, f"{name}: max abs diff {np.abs(ours - ref).max()}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches(pair, side):
    name, hf_model, model, forward = pair
    lengths = [SEQ, SEQ - 17, SEQ - 40]
    ids = _ids(len(lengths), SEQ, model.config.vocab_size, seed=1)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, SEQ - n:] = 1
        else:
            mask[row, :n] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = forward(ids, mask)
    ref = hf_logits(hf_model, ids, attention_mask=mask, position_ids=positions)
    valid = mask.astype(bool)
    diff = np.abs(ours[valid] - ref[valid]).max()
    assert diff <= ATOL, f"{name} {side}-padded: max abs diff {diff}"
    # Padding changes nothing: each row alone gives the same logits. (Except where
    # LongRoPE picks its factors differently: HF switches per call, on the batch's
    # longest position, so a short row alone uses the short factors.)
    scaling = model.config.rope_scaling
    for row, n in enumerate(lengths):
        if scaling.kind == "longrope" and n <= scaling.original_max_position < SEQ:
            continue
        alone = forward(ids[row][valid[row]][None])[0]
        assert np.abs(alone - ours[row][valid[row]]).max() <= ATOL


def test_save_hf_round_trip(pair, tmp_path):
    """save_hf writes a directory transformers loads back with the same logits, and
    flaxlm reads back bit for bit."""
    name, hf_model, model, forward = pair
    save_hf(model, None, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _ids(1, SEQ, model.config.vocab_size, seed=2)
    ours = forward(ids)
    diff = np.abs(hf_logits(reloaded, ids) - ours).max()
    assert diff <= ATOL, f"{name} written as {reloaded.config.model_type}: max abs diff {diff}"
    again, _ = load(tmp_path)
    assert again.config == model.config
    np.testing.assert_array_equal(jitted(again)(ids), ours)
