"""Training every family, and the MoE router's load-balancing loss.

The loss equals transformers' `aux_loss` (its `load_balancing_loss_func`) on the
same weights and padded batch; the train step adds it to the objective with the
recipe's coefficient; a train step runs for a tiny model of each family; and the
loop logs it for an MoE recipe.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from flaxlm.model import Decoder, ModelConfig
from flaxlm.model.hf_config import config_from_hf
from flaxlm.model.hf_weights import params_from_hf
from flaxlm.model.moe import load_balancing_loss
from flaxlm.model.params import build_model
from flaxlm.model.sharding import make_mesh
from flaxlm.train.loop import train
from flaxlm.train.metrics import read_metrics
from flaxlm.train.step import compile_steps, put_batch

from tests.hf_models import make_hf_model
from tests.train.conftest import accum_batch, compiled_steps, fresh_state, random_rows, tiny_recipe

FAMILIES = ["qwen3-window", "gemma2-softcap", "gemma3-local-global", "phi3-longrope",
            "smollm3-nope", "mixtral-moe", "qwen3-moe"]
SGD = optax.sgd(0.1)


def _pair(name):
    hf_model = make_hf_model(name)
    config = config_from_hf(hf_model.config.to_dict(), name)
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    return hf_model, build_model(config, params_from_hf(config, tensors, name), name)


@pytest.mark.parametrize("name", ["mixtral-moe", "qwen3-moe"])
def test_router_loss_matches_transformers(name):
    hf_model, model = _pair(name)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 320, (3, 40))
    mask = np.ones_like(ids)
    mask[1, 25:] = 0  # a right-padded row: padding is left out of the loss
    mask[2, :9] = 0   # and a left-padded one
    with torch.no_grad():
        out = hf_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                       output_router_logits=True)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    graphdef, state = nnx.split(model)
    _, router_logits = jax.jit(lambda s, *args: nnx.merge(graphdef, s).with_router_logits(
        *args))(state, ids, positions, mask)
    ref = [r.float().numpy().reshape(3, 40, -1) for r in out.router_logits]
    ref = [r for r in ref if r.shape[-1] == model.config.num_experts]  # MoE layers only
    assert len(router_logits) == len(ref) == model.config.layer_kinds("mlp").count("moe")
    for ours, theirs in zip(router_logits, ref):
        np.testing.assert_allclose(np.asarray(ours)[mask == 1], theirs[mask == 1], atol=1e-5)
    loss = load_balancing_loss(router_logits, model.config.experts_per_token, mask)
    np.testing.assert_allclose(float(loss), float(out.aux_loss), rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_train_step_runs(name):
    """One SGD step on packed rows: finite loss, every parameter moves, and an MoE
    model reports the load-balancing loss of the batch."""
    config = make_config(name)
    rows = random_rows(4, seq_len=33, seed=1)
    steps = compiled_steps(config, "data=1", SGD)
    state = fresh_state(config, "data=1", SGD)
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = steps.train(state, put_batch(accum_batch(rows), steps.train_batch_sharding))
    assert math.isfinite(float(metrics.loss)) and float(metrics.loss) > 0
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, before)
    assert all(jax.tree.leaves(moved))
    if config.num_experts:
        assert float(metrics.router_loss) >= config.experts_per_token * 0.999  # k when uniform
    else:
        assert float(metrics.router_loss) == 0.0


def make_config(name) -> ModelConfig:
    return config_from_hf(make_hf_model(name).config.to_dict(), name)


def test_router_aux_loss_coef_enters_the_objective():
    """The coefficient scales the router loss into the gradient: the same step with
    coefficient 0 and 1 gives the same cross-entropy but different router updates."""
    config = make_config("mixtral-moe")
    rows = accum_batch(random_rows(4, seq_len=33, seed=2))  # as test_train_step_runs
    results = []
    for coef in (0.0, 1.0):
        state = fresh_state(config, "data=1", SGD)
        steps = (compiled_steps(config, "data=1", SGD) if coef == 0.0 else  # the cached one
                 compile_steps(nnx.graphdef(Decoder(config, rngs=nnx.Rngs(0))), SGD, state,
                               make_mesh("data=1", jax.devices()[:1]), router_aux_loss_coef=coef))
        new, metrics = steps.train(state, put_batch(rows, steps.train_batch_sharding))
        results.append((metrics, np.asarray(new.params["layers"][0]["mlp"]["router"].get_value())))
    (m0, router0), (m1, router1) = results
    np.testing.assert_allclose(float(m0.loss), float(m1.loss), rtol=1e-6)
    np.testing.assert_allclose(float(m0.router_loss), float(m1.router_loss), rtol=1e-6)
    assert np.abs(router0 - router1).max() > 1e-4


def test_moe_recipe_logs_the_router_loss(corpus, tmp_path):
    recipe = tiny_recipe(corpus, model=dict(layer_mlp=["moe"], num_experts=4,
                                            experts_per_token=2, expert_mlp_dim=32),
                         train={"steps": 2, "router_aux_loss_coef": 0.01},
                         log={"eval_every": 2, "tensorboard": False, "plot": False},
                         checkpoint={"every": 2})
    train(recipe, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["router_loss"] is not None and r["router_loss"] >= 2 * 0.999 for r in records)
