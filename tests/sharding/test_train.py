"""Sharded training (8 CPU devices) follows single-device training: data parallel, FSDP,
tensor parallel and their mix give the same losses; parameters and AdamW moments are
laid out as the rules say; a checkpoint saved on one mesh resumes on another."""

from __future__ import annotations

import math
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from flaxlm.model import ModelConfig
from flaxlm.train.checkpoint import Checkpoints
from flaxlm.train.optim import optimizer
from flaxlm.train.recipe import CheckpointConfig, OptimizerConfig
from flaxlm.train.step import TrainState, put_batch

from tests.sharding.test_rules import expected_spec
from tests.train.conftest import (TINY_MODEL, accum_batch, compiled_steps, fresh_state,
                                  initial_state, random_rows)

# Four heads over two kv heads, so that heads split over tensor=2 (and embed 32 over fsdp=8).
CONFIG = ModelConfig.from_dict({**TINY_MODEL, "num_heads": 4, "num_kv_heads": 2})
OPT = optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0), total_steps=10)
MESHES = ["data=8", "fsdp=8", "data=4,tensor=2", "data=2,fsdp=2,tensor=2"]
STEPS = 5
# Batch 8 of 32 predicted tokens (33 columns: inputs and their next tokens), one per step.
BATCHES = [accum_batch(random_rows(8, seq_len=33, seed=s)) for s in range(STEPS)]


def _train(mesh: str, state: TrainState | None = None, batches=BATCHES):
    """(final state, losses) of train steps over `batches` on `mesh`, from the shared initial
    state (or `state`)."""
    steps = compiled_steps(CONFIG, mesh, OPT)
    state = fresh_state(CONFIG, mesh, OPT) if state is None else state
    losses = []
    for batch in batches:
        state, metrics = steps.train(state, put_batch(batch, steps.train_batch_sharding))
        losses.append(float(metrics.loss))
    return state, losses


@pytest.fixture(scope="module")
def single_device():
    return _train("data=1")


def _named(tree) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _moments(opt_state) -> list:
    """The AdamW first and second moments (each a tree shaped like the parameters)."""
    found = []
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(s, optax.ScaleByAdamState):
            found += [s.mu, s.nu]
    return found


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_training_follows_one_device(mesh, single_device):
    one_state, one_losses = single_device
    state, losses = _train(mesh)
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
    assert losses[-1] < losses[0]  # it trains
    # AdamW's ~lr * sign(g) updates amplify float rounding in near-zero gradients, so the
    # parameters are compared loosely (the losses above are the tight check).
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(one_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4)

    # Every parameter, and both AdamW moments of it, sharded as the hand-written table of
    # tests/sharding/test_rules.py says (RULES applied to each parameter's logical axes).
    params = _named(state.params)
    assert len(params) == 2 * 9 + 3  # 9 per layer, embedding, final norm, LM head
    moments = _moments(state.opt_state)
    assert len(moments) == 2
    for tree in [state.params, *moments]:
        for name, leaf in _named(tree).items():
            want = expected_spec(re.findall(r"\['?(\w+)'?\]", name))
            assert isinstance(leaf.sharding, NamedSharding), name
            assert leaf.sharding.spec == want, (mesh, name, leaf.sharding.spec, want)
            assert len(leaf.sharding.device_set) == 8, name
    assert state.step.sharding.spec == P() and state.rng.sharding.spec == P()


# Plain SGD with lr 1: the update is the gradient itself, so comparing updated parameters
# compares gradients (as tests/train/test_step.py does for data parallel and FSDP).
SGD = optax.sgd(1.0)


def _sgd_step(mesh: str):
    """(state, metrics) of one plain-SGD step on BATCHES[0] from the shared initial state."""
    steps = compiled_steps(CONFIG, mesh, SGD)
    return steps.train(fresh_state(CONFIG, mesh, SGD),
                       put_batch(BATCHES[0], steps.train_batch_sharding))


@pytest.mark.parametrize("mesh", ["data=4,tensor=2", "data=2,fsdp=2,tensor=2"])
def test_tensor_parallel_gradients_equal_one_device(mesh):
    one_state, one = _sgd_step("data=1")
    state, metrics = _sgd_step(mesh)
    assert state.params["layers"][0]["attn"]["q_proj"]["kernel"].get_value().sharding.spec \
        == P("fsdp", "tensor", None)
    np.testing.assert_allclose(metrics.loss, one.loss, rtol=1e-6)
    np.testing.assert_allclose(metrics.grad_norm, one.grad_norm, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(one_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _device_bytes(tree, device) -> int:
    return sum(s.data.nbytes for x in jax.tree.leaves(tree)
               for s in x.addressable_shards if s.device == device)


def test_fsdp_keeps_an_eighth_of_the_parameters_per_device():
    state = fresh_state(CONFIG, "fsdp=8", OPT)
    params, moments = state.params, _moments(state.opt_state)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    for device in jax.devices():
        assert _device_bytes(params, device) * 8 == total
        assert _device_bytes(moments, device) * 8 == 2 * total  # AdamW mu and nu
    # Data parallel keeps a full copy per device (for contrast).
    replicated = fresh_state(CONFIG, "data=8", OPT).params
    assert _device_bytes(replicated, jax.devices()[0]) == total


def test_checkpoint_saved_under_fsdp_resumes_under_tensor_parallel(tmp_path):
    """Save after 3 steps on fsdp=8; restore onto data=4,tensor=2 shardings (orbax reshards)
    and take steps 4 and 5: the same losses as going on under fsdp=8."""
    state, losses = _train("fsdp=8", batches=BATCHES[:3])
    checkpoints = Checkpoints(tmp_path, CheckpointConfig(async_save=False))
    try:
        assert checkpoints.save(state) == 3
        checkpoints.wait()
        _, straight = _train("fsdp=8", state=state, batches=BATCHES[3:])

        tp = compiled_steps(CONFIG, "data=4,tensor=2", OPT)
        restored = checkpoints.restore(3, initial_state(CONFIG, OPT)[1],
                                       shardings=tp.state_sharding)
    finally:
        checkpoints.close()
    kernel = restored.params["layers"][0]["attn"]["q_proj"]["kernel"].get_value()
    assert kernel.sharding.spec == P("fsdp", "tensor", None)
    assert dict(kernel.sharding.mesh.shape) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}
    assert int(restored.step) == 3
    _, resumed = _train("data=4,tensor=2", state=restored, batches=BATCHES[3:])
    np.testing.assert_allclose(resumed, straight, rtol=1e-5)
    assert all(math.isfinite(x) for x in resumed + losses)
