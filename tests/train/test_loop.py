"""The training loop end to end (8 CPU devices, data parallel): loss, held-out
evaluation, metrics files, resume equals straight, divergence, HF export, --init."""

from __future__ import annotations

import json
import math
import shutil

import jax
import numpy as np
import pytest

from flaxlm.model.tokenizer import Tokenizer
from flaxlm.train import data as data_lib
from flaxlm.train.checkpoint import Checkpoints, read_run_file, restore_model
from flaxlm.train.loop import TrainingDiverged, train
from flaxlm.train.metrics import cpu_peak, read_metrics
from flaxlm.train.optim import optimizer
from flaxlm.train.recipe import CheckpointConfig
from flaxlm.model.sources import DocumentSource, find_files
from flaxlm.train.step import abstract_state, loss_sum

from tests.train.conftest import tiny_recipe


def _saved_state(run_dir, step):
    recipe, config, _ = read_run_file(run_dir)
    _, target = abstract_state(config, optimizer(recipe.optimizer, recipe.train.steps))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=device), target)
    checkpoints = Checkpoints(run_dir, CheckpointConfig(async_save=False))
    try:
        return checkpoints.restore(step, target)
    finally:
        checkpoints.close()


def test_loss_falls_and_files_are_written(straight):
    result, run_dir = straight
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert set(records[0]) == {"step", "loss", "eval_loss", "eval_ppl", "lr", "grad_norm",
                               "router_loss", "tokens_per_s", "mfu"}
    assert records[0]["router_loss"] is None  # no MoE layers
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert records[2]["eval_loss"] is not None and records[1]["eval_loss"] is None
    assert records[-1]["eval_loss"] < records[2]["eval_loss"]
    # MFU = (6 N + 12 L H Q T) x tokens/s / peak, by hand for the test model (vocab 320,
    # embed 32, 2 heads and 1 kv head of 16, mlp 64, 2 layers, untied): parameters 39,072
    # (embedding 10,240; per layer q 1,024 + k 512 + v 512 + o 1,024 + mlp 3 * 2,048 + norms
    # 64 = 9,280, twice; final norm 32; head 10,240), N = all but the input embedding =
    # 28,832; 6 N = 172,992; attention 12 * 2 * 2 * 16 * 32 (seq_len) = 24,576; 197,568
    # FLOPs per token. Peak: this CPU's (cpu_peak, tested by hand in test_metrics.py), once
    # (the eight XLA devices share the cores).
    peak = cpu_peak().flops
    for r in records[1:]:
        assert r["tokens_per_s"] > 0
        assert r["mfu"] == pytest.approx(197_568 * r["tokens_per_s"] / peak, rel=1e-9)
    assert result.step == 6 and result.last_checkpoint == 6 and result.stopped_by is None
    events = _tensorboard_scalars(run_dir)  # what TensorBoard shows is metrics.jsonl
    assert events["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6))
                                    for r in records]
    assert [s for s, _ in events["train/eval_loss"]] == [3, 6]
    assert set(events) == {f"train/{k}" for k in records[0]
                           if k not in ("step", "router_loss")}
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [3, 6]


def _tensorboard_scalars(run_dir):
    """{tag: [(step, value), ...]} from the run's TensorBoard event files (TFRecord framing:
    length u64, its crc u32, the Event proto, its crc u32)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_eval_perplexity_is_over_the_held_out_split(straight, corpus):
    result, run_dir = straight
    record = read_metrics(run_dir)[-1]
    assert record["eval_ppl"] == pytest.approx(math.exp(record["eval_loss"]))
    # Recompute over the held-out documents with the saved model.
    recipe, _, _ = read_run_file(run_dir)
    model, tokenizer, step = restore_model(run_dir)
    source = DocumentSource(find_files(recipe.data.files))
    split = data_lib.split_documents(len(source), recipe.data.eval_fraction, recipe.data.seed)
    assert len(split.eval) == 4  # 10% of 40 documents
    batches = data_lib.eval_batches(source, split.eval, data_lib.Encoder(tokenizer),
                                    seq_len=recipe.data.seq_len, batch_size=8,
                                    max_batches=recipe.log.eval_batches)
    from flax import nnx

    graphdef, params = nnx.split(model, nnx.Param)
    sums = [loss_sum(graphdef, params, b) for b in batches]
    mean = sum(float(s.total) for s in sums) / sum(float(s.count) for s in sums)
    assert step == 6 and mean == pytest.approx(record["eval_loss"], rel=1e-5)


def test_resume_equals_straight_bitwise(straight, corpus, tmp_path):
    """Checkpoint settings change nothing in training: this run keeps 2 checkpoints (the
    straight run 5), and only the last two stay."""
    result, straight_dir = straight
    first = train(tiny_recipe(corpus, train={"steps": 4}, checkpoint={"keep": 2}), tmp_path)
    assert first.step == 4 and first.last_checkpoint == 4
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 4]
    resumed = train(tiny_recipe(corpus, checkpoint={"keep": 2}), tmp_path)  # to the full 6 steps
    assert resumed.resumed_from == 4 and resumed.step == 6
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 6]
    assert resumed.data_state == result.data_state  # the same batches were read
    a, b = _saved_state(straight_dir, 6), _saved_state(tmp_path, 6)
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state, a.rng, a.step)),
                    jax.tree.leaves((b.params, b.opt_state, b.rng, b.step))):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    again = train(tiny_recipe(corpus, checkpoint={"keep": 2}), tmp_path)  # done: nothing to do
    assert again.step == 6 and again.resumed_from == 6


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(straight, tmp_path):
    _, straight_dir = straight
    shutil.copytree(straight_dir, tmp_path, dirs_exist_ok=True)
    recipe, _, _ = read_run_file(tmp_path)
    diverging = recipe.from_dict({**recipe.to_dict(), "optimizer": {
        **recipe.to_dict()["optimizer"], "lr": math.inf}, "train": {
        **recipe.to_dict()["train"], "steps": 9}})
    with pytest.raises(TrainingDiverged, match=r"at step 7: training stopped; the last good "
                                               r"checkpoint is step 6"):
        train(diverging, tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6]
    model, _, step = restore_model(tmp_path)
    assert step == 6


def test_export_serves_with_llm(straight, tmp_path):
    """The exported directory gives the restored checkpoint's logits, and LLM.load serves
    it: its greedy tokens are the restored model's argmax at every step."""
    from flaxlm.infer import LLM, SamplingParams
    from flaxlm.model import load
    from flaxlm.train.checkpoint import export_hf

    _, run_dir = straight
    out = export_hf(run_dir, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    restored, tokenizer, step = restore_model(run_dir)
    exported, exported_tokenizer = load(out)
    ids = tokenizer.encode("the cat sat on the mat. the dog")
    assert step == 6 and exported_tokenizer.encode("the cat sat") == tokenizer.encode("the cat sat")
    llm = LLM.load(out, max_batch=1)
    result = llm.generate(ids, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))[0]
    assert len(result.token_ids) == 6
    sequence = np.asarray([ids + result.token_ids])
    reference = np.asarray(restored(sequence))[0]
    np.testing.assert_array_equal(np.asarray(exported(sequence))[0], reference)
    assert result.token_ids == reference[len(ids) - 1:-1].argmax(-1).tolist()
    assert Tokenizer.from_hf_dir(out).vocab_size == llm.tokenizer.vocab_size


def test_fine_tune_from_init_model(straight, corpus, tmp_path):
    from flaxlm.train.checkpoint import export_hf

    _, run_dir = straight
    hf_dir = export_hf(run_dir, tmp_path / "hf")
    recipe = tiny_recipe(corpus, train={"steps": 2}, log={"eval_every": 2})
    fine_tune = recipe.from_dict({**recipe.to_dict(), "model": {"remat": "full"}})
    result = train(fine_tune, tmp_path / "run", init=str(hf_dir))
    _, config, init = read_run_file(tmp_path / "run")
    assert init == str(hf_dir) and config.remat == "full" and config.embed_dim == 32
    first = read_metrics(tmp_path / "run")[0]["loss"]
    assert first < read_metrics(run_dir)[0]["loss"] - 0.5  # starts from the trained weights
    assert result.step == 2
