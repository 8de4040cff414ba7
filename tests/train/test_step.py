"""The train and eval steps: accumulation, remat, packing, masking, precision, optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxlm.model import Decoder, ModelConfig
from flaxlm.train.data import Batch
from flaxlm.train.optim import decay_mask, optimizer, schedule
from flaxlm.train.recipe import OptimizerConfig
from flaxlm.train.step import loss_sum, put_batch, token_losses

from tests.train.conftest import (TINY_MODEL, accum_batch, compiled_steps, fresh_state,
                                  initial_state, random_rows)

CONFIG = ModelConfig.from_dict(TINY_MODEL)
OPT = optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0), total_steps=10)
# Plain SGD with lr 1: the update is the gradient itself, so comparing updated
# parameters compares gradients (AdamW's first step, ~lr * sign(g), would amplify
# float rounding in near-zero gradients).
SGD = optax.sgd(1.0)


_rows = random_rows
_initial = initial_state
_steps = compiled_steps
_reshape = accum_batch


def _step(config: ModelConfig, batch: Batch, mesh: str = "data=1", opt=SGD):
    """One train step from the same initial state, on the first device (or over all
    devices with mesh="data=-1" etc.); compiled programs are reused across tests."""
    steps = _steps(config, mesh, opt)
    return steps.train(fresh_state(config, mesh, opt), put_batch(batch, steps.train_batch_sharding))


_token_losses = jax.jit(token_losses, static_argnums=0)
_loss_sum = jax.jit(loss_sum, static_argnums=0)


def _reshape(batch: Batch, accum: int) -> Batch:
    return jax.tree.map(lambda x: x.reshape(accum, -1, x.shape[-1]), batch)


def _assert_params_close(state, reference):
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_equals_one_big_batch():
    rows = _rows(8)
    big_state, big = _step(CONFIG, _reshape(rows, 1))
    acc_state, acc = _step(CONFIG, _reshape(rows, 4))
    np.testing.assert_allclose(acc.loss, big.loss, rtol=1e-6)
    np.testing.assert_allclose(acc.grad_norm, big.grad_norm, rtol=1e-5)
    assert float(acc.tokens) == float(big.tokens)
    _assert_params_close(acc_state, big_state)


@pytest.mark.parametrize("mesh", ["data=-1", "data=2,fsdp=4"])
def test_sharded_step_equals_one_device(mesh):
    rows = _reshape(_rows(8), 1)
    one_state, one = _step(CONFIG, rows)
    state, metrics = _step(CONFIG, rows, mesh)
    assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == jax.device_count()
    np.testing.assert_allclose(metrics.loss, one.loss, rtol=1e-6)
    _assert_params_close(state, one_state)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_loss_and_update(policy):
    rows = _reshape(_rows(8), 1)
    plain_state, plain = _step(CONFIG, rows)
    remat_state, remat = _step(CONFIG.replace(remat=policy), rows)
    np.testing.assert_allclose(remat.loss, plain.loss, rtol=1e-6)
    np.testing.assert_allclose(remat.grad_norm, plain.grad_norm, rtol=1e-5)
    _assert_params_close(remat_state, plain_state)


MOE = CONFIG.replace(num_layers=4, layer_mlp=("dense", "moe"), num_experts=4,
                     experts_per_token=2, expert_mlp_dim=32)


@pytest.mark.parametrize("config, policy", [(CONFIG, "none"), (CONFIG, "full"),
                                            (CONFIG, "dots"), (MOE, "full")])
def test_scanned_layers_give_the_same_loss_and_update(config, policy):
    """ModelConfig.scan_layers: the same step, each layer's gradient back in its own
    parameters (the state's layout is the unscanned one)."""
    rows = _reshape(_rows(8), 2)
    plain_state, plain = _step(config.replace(remat=policy), rows)
    scan_state, scanned = _step(config.replace(remat=policy, scan_layers=True), rows)
    np.testing.assert_allclose(scanned.loss, plain.loss, rtol=1e-6)
    np.testing.assert_allclose(scanned.grad_norm, plain.grad_norm, rtol=1e-5)
    np.testing.assert_allclose(scanned.router_loss, plain.router_loss, rtol=1e-6)
    assert jax.tree.structure(scan_state.params) == jax.tree.structure(plain_state.params)
    _assert_params_close(scan_state, plain_state)


def test_packed_rows_give_each_document_its_unpacked_loss():
    graphdef, state = _initial(CONFIG, SGD)
    rng = np.random.default_rng(3)
    doc_a, doc_b = rng.integers(0, CONFIG.vocab_size, 7), rng.integers(0, CONFIG.vocab_size, 10)
    packed = Batch(tokens=np.concatenate([doc_a, doc_b])[None].astype(np.int32),
                   segment_ids=np.array([[1] * 7 + [2] * 10], np.int32),
                   positions=np.array([list(range(7)) + list(range(10))], np.int32))
    losses, mask = _token_losses(graphdef, state.params, packed)
    for doc, columns in ((doc_a, slice(0, 6)), (doc_b, slice(7, 16))):
        pad = 17 - len(doc)  # alone, right-padded to the same shape (one compiled program)
        alone = Batch(tokens=np.pad(doc, (0, pad))[None].astype(np.int32),
                      segment_ids=np.array([[1] * len(doc) + [0] * pad], np.int32),
                      positions=np.pad(np.arange(len(doc)), (0, pad))[None].astype(np.int32))
        alone_losses, alone_mask = _token_losses(graphdef, state.params, alone)
        assert int(alone_mask.sum()) == len(doc) - 1
        np.testing.assert_allclose(losses[0, columns], alone_losses[0, :len(doc) - 1],
                                   rtol=1e-5, atol=1e-6)
    # The last token of document a does not predict document b's first token.
    assert mask[0].tolist() == [True] * 6 + [False] + [True] * 9


def test_padding_is_not_counted():
    graphdef, state = _initial(CONFIG, SGD)
    rows = _rows(2, seq_len=12)
    padded = Batch(tokens=np.pad(rows.tokens, ((0, 0), (0, 5)), constant_values=7),
                   segment_ids=np.pad(rows.segment_ids, ((0, 0), (0, 5))),
                   positions=np.pad(rows.positions, ((0, 0), (0, 5))))
    plain = _loss_sum(graphdef, state.params, _rows(2))  # compiled for [2, 17] rows
    same = Batch(tokens=np.pad(rows.tokens, ((0, 0), (0, 5)), constant_values=9),
                 segment_ids=padded.segment_ids, positions=padded.positions)
    with_pad, other_pad = (_loss_sum(graphdef, state.params, b) for b in (padded, same))
    assert float(with_pad.count) == 2 * (12 - 2)  # two documents per row, padding excluded
    np.testing.assert_allclose(with_pad.total, other_pad.total, rtol=1e-6)  # pad tokens ignored
    assert float(plain.count) == 2 * (17 - 2)


def test_bfloat16_compute_keeps_float32_master_state():
    state, metrics = _step(CONFIG.replace(dtype="bfloat16"), _reshape(_rows(8), 4), opt=OPT)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert moments and {x.dtype for x in moments} == {jnp.dtype("float32")}
    assert np.isfinite(float(metrics.loss)) and int(state.step) == 1


def test_weight_decay_skips_norms_and_biases():
    params = nnx.state(Decoder(CONFIG.replace(qkv_bias=True), rngs=nnx.Rngs(0)), nnx.Param)
    flat = {jax.tree_util.keystr(p): m for p, m in
            jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    assert flat["['layers'][0]['attn']['q_proj']['kernel'].value"]
    assert not flat["['layers'][0]['attn']['q_proj']['bias'].value"]
    assert not flat["['layers'][0]['attn_norm']['scale'].value"]
    assert not flat["['final_norm']['scale'].value"]
    assert flat["['embed']['embedding'].value"] and flat["['lm_head'].value"]


@pytest.mark.parametrize("clip_norm, first_moment", [(0.5, 0.025), (0.0, 0.3)])
def test_gradients_are_clipped_by_global_norm(clip_norm, first_moment):
    """Gradient 3.0 in each of 4 entries: global norm 6, clipped to 0.5 (0.25 each) unless
    clipping is off (0). AdamW's first moment after one step is (1 - b1) g = 0.1 g."""
    opt = optimizer(OptimizerConfig(lr=1.0, warmup_steps=0, clip_norm=clip_norm), total_steps=10)
    params = {"kernel": jnp.zeros(4)}
    _, state = opt.update({"kernel": jnp.full(4, 3.0)}, opt.init(params), params)
    (adam,) = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    np.testing.assert_allclose(adam.mu["kernel"], first_moment, rtol=1e-6)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lr = schedule(cfg, total_steps=100)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(100)) == pytest.approx(0.1)
    assert float(lr(55)) == pytest.approx(0.55, abs=1e-6)  # halfway down the cosine
    fixed = schedule(OptimizerConfig(lr=1.0, warmup_steps=10, decay_steps=200), total_steps=100)
    assert float(fixed(100)) > 0.5  # decay_steps, not train.steps, sets the schedule


def test_train_step_donates_the_state():
    """The README's "donated state": the step reuses the old state's buffers, so a caller
    cannot keep reading them (and memory holds one copy of the parameters and moments)."""
    steps = _steps(CONFIG, "data=1", OPT)
    state = fresh_state(CONFIG, "data=1", OPT)
    old = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    new, _ = steps.train(state, put_batch(_reshape(_rows(8), 1), steps.train_batch_sharding))
    params = jax.tree.leaves(state.params)
    assert params and all(x.is_deleted() for x in params)
    assert sum(x.is_deleted() for x in old) == len(old)
    assert not any(x.is_deleted() for x in jax.tree.leaves(new))
