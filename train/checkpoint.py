"""Training checkpoints (orbax `CheckpointManager`) and their export to an HF directory.

A checkpoint at RUN_DIR/checkpoints/STEP holds two items:
  state  the TrainState (step, float32 params, optimizer state, RNG), orbax StandardSave;
  data   the grain iterator position, one JSON file per process (grain's orbax handler).
Saves are asynchronous (the device-to-host copy blocks, the write does not) and
atomic: a save interrupted half-way leaves no step directory behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from flaxlm.model.config import ModelConfig
from flaxlm.model.errors import CheckpointError, ConfigError
from flaxlm.model.loading import save_hf
from flaxlm.model.tokenizer import Tokenizer
from flaxlm.train.optim import optimizer
from flaxlm.train.recipe import CheckpointConfig, Recipe
from flaxlm.train.step import TrainState, abstract_state

RUN_FILE = "run.json"  # the resolved recipe and model config of a run


class Checkpoints:
    """The checkpoints of one run directory."""

    def __init__(self, run_dir: Path, cfg: CheckpointConfig = CheckpointConfig()):
        self.directory = (Path(run_dir) / "checkpoints").absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, data_iterator: grain.DatasetIterator | None = None) -> int:
        """Save at the state's step (and the data position, when given); returns once the
        state is copied off the devices."""
        step = int(state.step)
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        return step

    def restore(self, step: int, target: TrainState,
                data_iterator: grain.DatasetIterator | None = None,
                shardings: TrainState | None = None) -> TrainState:
        """The TrainState saved at `step`, shaped like `target` and placed on the shardings
        of `target`'s leaves (arrays or ShapeDtypeStructs with a sharding), or on
        `shardings` (a NamedSharding per leaf, e.g. `Steps.state_sharding`) when given.
        The mesh may differ from the one the checkpoint was saved on: orbax reads each
        device's slice of the new layout. The data iterator, when given, is moved to the
        saved position."""
        if shardings is not None:
            target = jax.tree.map(
                lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, shardings)
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
            raise CheckpointError(
                f"{self.directory / str(step)}: cannot restore the checkpoint ({_first_line(e)}); "
                f"nothing was deleted: move that directory away to resume from an earlier step"
            ) from e
        return restored.state

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def write_run_file(run_dir: Path, recipe: Recipe, config: ModelConfig, init: str | None) -> None:
    data = {"recipe": recipe.to_dict(), "model": config.to_dict(), "init": init}
    (run_dir / RUN_FILE).write_text(json.dumps(data, indent=2) + "\n")


def read_run_file(run_dir: Path) -> tuple[Recipe, ModelConfig, str | None]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a training run directory (no {RUN_FILE})")
    try:
        data = json.loads(path.read_text())
        recipe = Recipe.from_dict(data["recipe"], source=str(path))
        config = ModelConfig.from_dict(data["model"], source=str(path))
    except (json.JSONDecodeError, KeyError, ConfigError) as e:
        raise CheckpointError(f"{path}: unreadable run file ({e})") from e
    return recipe, config, data.get("init")


def restore_model(run_dir: str | Path, step: int | None = None):
    """(model, tokenizer, step) of a run's checkpoint (the latest when `step` is None)."""
    run_dir = Path(run_dir)
    recipe, config, _ = read_run_file(run_dir)
    checkpoints = Checkpoints(run_dir, CheckpointConfig(async_save=False))
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{checkpoints.directory}: no checkpoint")
        graphdef, target = abstract_state(config, optimizer(recipe.optimizer, recipe.train.steps))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=device),
                              target)
        state = checkpoints.restore(step, target)
    finally:
        checkpoints.close()
    tokenizer = Tokenizer.from_hf_dir(run_dir / "tokenizer")
    return nnx.merge(graphdef, state.params), tokenizer, step


def export_hf(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Write a run's checkpoint as an HF directory that `flaxlm.infer.LLM.load` and
    transformers load (float32 weights, the run's tokenizer)."""
    model, tokenizer, _ = restore_model(run_dir, step)
    return save_hf(model, tokenizer, out_dir)
