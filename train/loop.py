"""The training loop: steps, metrics, evaluation, checkpoints, signals, divergence.

`train(recipe, run_dir, init=None)` prepares the run (resuming from the run's
latest checkpoint when there is one) and trains to `recipe.train.steps`:

- one step is in flight while the previous step's loss is checked, so the host
  never waits on the device except at log, eval and checkpoint steps;
- a NaN/Inf loss, gradient norm or updated-parameter norm stops the run
  (`TrainingDiverged`, naming the step) without saving that state: the last
  checkpoint stays the last good one;
- SIGTERM/SIGINT finish the current step, save a checkpoint and return
  (`RunResult.stopped_by`); a second SIGINT interrupts at once.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax

from flaxlm.model.errors import FlaxlmError
from flaxlm.train.metrics import MetricsLog, Progress
from flaxlm.train.optim import schedule
from flaxlm.train.prepare import Run, prepare
from flaxlm.train.recipe import Recipe
from flaxlm.train.step import StepMetrics, put_batch


class TrainingDiverged(FlaxlmError, ArithmeticError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    run_dir: Path
    step: int                        # optimizer steps done
    resumed_from: int | None         # the checkpoint step this invocation started from
    last_checkpoint: int | None
    loss: float | None               # mean training loss of the last log interval
    eval_loss: float | None          # the last held-out evaluation
    stopped_by: str | None           # "SIGTERM" or "SIGINT" when a signal ended the run
    data_state: dict[str, Any]       # the training data iterator's position at the end


@dataclasses.dataclass
class _Window:
    """Training metrics of the steps since the last log step."""

    losses: list[float] = dataclasses.field(default_factory=list)
    grad_norms: list[float] = dataclasses.field(default_factory=list)
    router_losses: list[float] = dataclasses.field(default_factory=list)
    extras: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    timed_steps: int = 0          # steps run since `start`
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, loss: float, grad_norm: float, router_loss: float,
            extra: dict[str, float]) -> None:
        for name, value in extra.items():
            self.extras.setdefault(name, []).append(value)
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.router_losses.append(router_loss)
        self.timed_steps += 1

    def restart_clock(self) -> None:
        self.timed_steps, self.start = 0, time.perf_counter()


class _StopSignals:
    """Records SIGTERM/SIGINT while installed (main thread only); a second SIGINT raises."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(recipe: Recipe, run_dir: str | Path, init: str | None = None) -> RunResult:
    return execute(prepare(recipe, run_dir, init))


def execute(run: Run) -> RunResult:
    """Train a prepared run (`prepare`, or flaxlm.train.finetune's) to its recipe's steps."""
    recipe = run.recipe
    log = MetricsLog(run.run_dir, recipe.log.tensorboard)
    start = int(run.state.step)
    progress = Progress(recipe.train.steps, start, recipe.log.progress)
    if run.resumed_from is not None:
        progress.write(f"resuming {run.run_dir} from step {run.resumed_from}")
    try:
        with _StopSignals() as signals:
            result = _Loop(run, log, progress, signals).execute()
    finally:
        run.checkpoints.wait()
        run.checkpoints.close()
        run.train_iterator.close()  # stops its reader threads
        progress.close()
        log.close()
    if recipe.log.plot and jax.process_index() == 0 and result.step > start:
        from flaxlm.train.plot import plot_run

        plot_run(run.run_dir)
    return result


class _Loop:
    def __init__(self, run: Run, log: MetricsLog, progress: Progress, signals: _StopSignals):
        self.run, self.log, self.progress, self.signals = run, log, progress, signals
        self.recipe = run.recipe
        self.lr = schedule(self.recipe.optimizer, self.recipe.train.steps)
        self.tokens_per_step = self.recipe.train.batch_size * self.recipe.data.seq_len
        self.last_checkpoint = run.resumed_from
        self.start_step = int(run.state.step)
        self.last_loss: float | None = None
        self.last_eval: float | None = None
        self.last_eval_extra: dict[str, float] = {}

    def execute(self) -> RunResult:
        run, total = self.run, self.recipe.train.steps
        state, step = run.state, self.start_step
        pending: tuple[int, StepMetrics] | None = None
        window = _Window()
        while step < total and self.signals.received is None:
            batch = put_batch(next(run.train_iterator), run.steps.train_batch_sharding)
            state, metrics = run.steps.train(state, batch)
            if pending is not None:
                self._settle(*pending, window)
            step, pending = step + 1, (step + 1, metrics)
            if step == self.start_step + 1 or self._is_boundary(step):
                self._settle(*pending, window)
                pending = None
            if step == self.start_step + 1:
                window.restart_clock()  # the first step compiles: it is not timed
            if self._is_boundary(step):
                window = self._boundary(state, step, window)
        if self.signals.received is not None and self.last_checkpoint != step:
            self._save(state)
        return RunResult(run_dir=run.run_dir, step=step, resumed_from=run.resumed_from,
                         last_checkpoint=self.last_checkpoint, loss=self.last_loss,
                         eval_loss=self.last_eval, stopped_by=self.signals.received,
                         data_state=run.train_iterator.get_state())

    def _is_boundary(self, step: int) -> bool:
        r = self.recipe
        return (step % r.log.every == 0 or step % r.checkpoint.every == 0
                or step % r.log.eval_every == 0 or step == r.train.steps
                or self.signals.received is not None)

    def _settle(self, step: int, metrics: StepMetrics, window: _Window) -> None:
        """Wait for a step's metrics; stop the run if they are not finite."""
        loss, grad_norm = float(metrics.loss), float(metrics.grad_norm)
        param_norm = float(metrics.param_norm)
        if not all(map(math.isfinite, (loss, grad_norm, param_norm))):
            self.run.checkpoints.wait()
            kept = (f"the last good checkpoint is step {self.last_checkpoint} in "
                    f"{self.run.checkpoints.directory}" if self.last_checkpoint is not None
                    else "no checkpoint was saved")
            raise TrainingDiverged(
                f"loss {loss}, gradient norm {grad_norm}, parameter norm {param_norm} at step "
                f"{step}: training stopped; {kept}")
        window.add(loss, grad_norm, float(metrics.router_loss),
                   {k: float(v) for k, v in metrics.extra.items()})

    def _boundary(self, state, step: int, window: _Window) -> _Window:
        """Log, evaluate and save as due at `step`; returns a fresh window."""
        r = self.recipe
        tokens_per_s = self._tokens_per_s(window)
        eval_loss = (self._evaluate(state) if step % r.log.eval_every == 0 or step == r.train.steps
                     else None)
        if window.losses:
            self.last_loss = sum(window.losses) / len(window.losses)
        if step % r.log.every == 0 or step == r.train.steps or eval_loss is not None:
            self._log(step, window, tokens_per_s, eval_loss)
        if step % r.checkpoint.every == 0 or step == r.train.steps:
            self._save(state)
        self.progress.update(len(window.losses), self.last_loss, tokens_per_s)
        return _Window()

    def _log(self, step: int, window: _Window, tokens_per_s: float | None,
             eval_loss: float | None) -> None:
        self.log.write({
            "step": step, "loss": self.last_loss, "lr": float(self.lr(step - 1)),
            "grad_norm": sum(window.grad_norms) / max(len(window.grad_norms), 1),
            "router_loss": (sum(window.router_losses) / len(window.router_losses)
                            if self.run.config.num_experts and window.router_losses
                            else None),
            "eval_loss": eval_loss,
            "eval_ppl": (math.exp(eval_loss)  # a token loss's (not a pair loss's)
                         if eval_loss is not None and not self.last_eval_extra else None),
            "tokens_per_s": tokens_per_s,
            "mfu": (self.run.flops_per_token * tokens_per_s / self.run.peak_flops
                    if tokens_per_s else None),
            **{name: sum(v) / len(v) for name, v in window.extras.items()},
            **({f"eval_{k}": v for k, v in self.last_eval_extra.items()}
               if eval_loss is not None else {}),
        })

    def _tokens_per_s(self, window: _Window) -> float | None:
        elapsed = time.perf_counter() - window.start
        return window.timed_steps * self.tokens_per_step / elapsed if window.timed_steps else None

    def _evaluate(self, state) -> float | None:
        """Mean loss over the held-out batches (None when there are none)."""
        if not self.run.eval_batches:
            return None
        total, count, extra = 0.0, 0.0, {}
        for batch in self.run.eval_batches:
            part = self.run.steps.eval(state.params, put_batch(batch, self.run.steps.eval_batch_sharding))
            total, count = total + float(part.total), count + float(part.count)
            for name, value in part.extra.items():
                extra[name] = extra.get(name, 0.0) + float(value)
        self.last_eval = total / max(count, 1.0)
        self.last_eval_extra = {k: v / max(count, 1.0) for k, v in extra.items()}
        return self.last_eval

    def _save(self, state) -> None:
        self.last_checkpoint = self.run.checkpoints.save(state, self.run.train_iterator)
