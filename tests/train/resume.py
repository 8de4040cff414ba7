"""SIGTERM-and-resume checks shared by the fine-tuning objectives' tests."""

import os
import signal

import jax
import numpy as np

from flaxlm.train import finetune as ft_lib
from flaxlm.train.metrics import MetricsLog


def final_state(run_dir):
    """The TrainState of a run's latest checkpoint (trainable params, optimizer, RNG), as
    a prepared run restores it."""
    run, _ = ft_lib.prepare_finetune(ft_lib.read_run_file(run_dir)[0], run_dir)
    run.train_iterator.close()
    run.checkpoints.close()
    return run.state


def stop_then_resume(recipe, run_dir, monkeypatch, at_step: int):
    """(stopped, resumed): the run sent SIGTERM while logging step `at_step`, then the same
    command run again."""
    write = MetricsLog.write

    def write_then_signal(self, record):
        write(self, record)
        if record["step"] == at_step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    stopped = ft_lib.finetune(recipe, run_dir)
    monkeypatch.setattr(MetricsLog, "write", write)
    return stopped, ft_lib.finetune(recipe, run_dir)


def assert_same_state(run_a, run_b):
    """The two runs' latest checkpoints are equal bit for bit; returns both states."""
    a, b = final_state(run_a), final_state(run_b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    return a, b
