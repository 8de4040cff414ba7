"""Two processes on localhost (CPU, one device each, gloo collectives) train like one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from tests.sharding.test_train import BATCHES, _train
from tests.train.conftest import corpus  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[2]

WORKER = """
import json, sys
import jax
import numpy as np
from flaxlm.train.distributed import initialize
initialize(sys.argv[1], 2, int(sys.argv[2]))
assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
from tests.sharding.test_train import BATCHES, _train
from tests.train.conftest import corpus  # noqa: F401  (a fixture)
rank = jax.process_index()
# Each process feeds its own half of every batch's rows; put_batch assembles global arrays.
local = [jax.tree.map(lambda x: x[:, rank * 4:(rank + 1) * 4], b) for b in BATCHES[:2]]
state, losses = _train("data=-1", batches=local)
# This process's copy of every parameter (data parallel: each device holds all of it).
np.savez(sys.argv[3], *[np.asarray(leaf.addressable_shards[0].data)
                        for leaf in jax.tree.leaves(state.params)])
print("LOSSES " + json.dumps(losses), flush=True)
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_take_the_single_process_steps(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    outputs = _launch([[sys.executable, "-c", WORKER, address, str(rank),
                        str(tmp_path / f"rank{rank}.npz")] for rank in range(2)],
                      env, timeout=240)
    losses = [json.loads(next(line for line in out.splitlines()
                              if line.startswith("LOSSES "))[7:]) for out in outputs]
    single_state, single = _train("data=1", batches=BATCHES[:2])
    np.testing.assert_allclose(losses[0], single, rtol=1e-5)
    np.testing.assert_allclose(losses[1], losses[0], rtol=0)
    # Each rank's own copy of the trained parameters: the ranks agree bit for bit, and
    # both follow single-process training (within the AdamW tolerance of test_train.py).
    ranks = [np.load(tmp_path / f"rank{rank}.npz") for rank in range(2)]
    expected = [np.asarray(leaf) for leaf in jax.tree.leaves(single_state.params)]
    assert all(len(r.files) == len(expected) for r in ranks)
    for i, reference in enumerate(expected):
        np.testing.assert_array_equal(ranks[1][f"arr_{i}"], ranks[0][f"arr_{i}"])
        np.testing.assert_allclose(ranks[0][f"arr_{i}"], reference, rtol=1e-3, atol=2e-4)


def _launch(argv_per_rank, env, timeout=400):
    """Run one process per argv (env: one for all, or one per rank); all must succeed."""
    envs = env if isinstance(env, list) else [env] * len(argv_per_rank)
    procs = [subprocess.Popen(argv, cwd=ROOT, env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for argv, e in zip(argv_per_rank, envs)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def test_flaxlm_train_on_two_processes(corpus, tmp_path):
    """`flaxlm train --coordinator ... --num-processes 2 --process-id 0` and, for the other
    process, `--distributed` with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID: each process reads its own documents, the global batch spans both,
    only process 0 writes the metrics, TensorBoard events and the plot."""
    from flaxlm.train.metrics import read_metrics
    from tests.train.conftest import tiny_recipe, to_toml

    recipe = tiny_recipe(corpus, train={"steps": 2}, checkpoint={"every": 2},
                         log={"eval_every": 2, "tensorboard": True, "plot": True})
    (tmp_path / "recipe.toml").write_text(to_toml(recipe))
    run_dir = tmp_path / "run"
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    main = "import sys; from flaxlm.model.cli import main; sys.exit(main(sys.argv[1:]))"
    train = [sys.executable, "-c", main, "train", "--config", str(tmp_path / "recipe.toml"),
             "--out", str(run_dir)]
    outputs = _launch(
        [train + ["--coordinator", address, "--num-processes", "2", "--process-id", "0"],
         train + ["--distributed"]],
        [env, {**env, "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": "1"}])
    assert all("done: step 2" in out for out in outputs), outputs
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]  # one writer: no duplicated lines
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["eval_loss"] is not None
    assert (run_dir / "checkpoints" / "2").is_dir()
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
