"""Everything a run needs before its first step, checked before anything is compiled.

`prepare(recipe, run_dir, init)` validates the settings against the model and the
devices, indexes the data, gets the tokenizer (trained, loaded or taken from the
--init model), builds the state (fresh, from --init, or restored from the run's
latest checkpoint with its data position) and the compiled-on-first-call steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from pathlib import Path

import grain
import jax
import numpy as np
from flax import nnx

from flaxlm.model.config import ModelConfig
from flaxlm.model.decoder import Decoder
from flaxlm.model.errors import ConfigError
from flaxlm.model.loading import load, resolve
from flaxlm.model.params import build_model, flat_params
from flaxlm.model.sharding import BATCH_AXES, make_mesh
from flaxlm.model.tokenizer import Tokenizer
from flaxlm.train import data as data_lib
from flaxlm.train.checkpoint import RUN_FILE, Checkpoints, read_run_file, write_run_file
from flaxlm.train.metrics import flops_per_token, total_peak_flops
from flaxlm.train.optim import optimizer as make_optimizer
from flaxlm.train.recipe import RUNTIME_MODEL_KEYS, Recipe
from flaxlm.model.sources import DocumentSource, default_corpus, find_files
from flaxlm.train.step import Steps, TrainState, abstract_state, compile_steps, new_state

log = logging.getLogger("flaxlm.train")

# Settings a resumed run must share with the run that wrote the checkpoints.
FIXED_FOR_RESUME = ("data.files", "data.format", "data.text_field", "data.seq_len",
                    "data.eval_fraction", "data.seed", "tokenizer.source", "tokenizer.vocab_size",
                    "tokenizer.train_bytes", "train.batch_size", "train.seed")


@dataclasses.dataclass(frozen=True)
class Run:
    """A prepared run: settings, data, tokenizer, state and compiled steps."""

    recipe: Recipe
    run_dir: Path
    config: ModelConfig
    tokenizer: Tokenizer
    steps: Steps
    state: TrainState
    train_iterator: grain.DatasetIterator
    eval_batches: list[data_lib.Batch]
    checkpoints: Checkpoints
    resumed_from: int | None
    flops_per_token: float
    peak_flops: float           # all devices together


def prepare(recipe: Recipe, run_dir: str | Path, init: str | None = None) -> Run:
    if recipe.finetune is not None:
        raise ConfigError("the recipe has a [finetune] table: run it with `flaxlm finetune`")
    run_dir = _writable_dir(Path(run_dir))
    previous = read_run_file(run_dir) if (run_dir / RUN_FILE).is_file() else None
    checkpoints = Checkpoints(run_dir, recipe.checkpoint)
    resume_step = checkpoints.latest_step()
    init_model, init_tokenizer = None, None
    if previous is not None:
        _check_resumable(recipe, init, previous)
    if previous is not None and resume_step is not None:
        config = recipe.model_config(previous[1])  # shape from the run, runtime keys from the recipe
    elif init is not None:
        init_model, init_tokenizer = load(init)
        config = recipe.model_config(init_model.config)
    else:
        config = recipe.model_config()
    mesh = make_mesh(recipe.train.mesh)
    check_shapes(recipe, config, mesh)

    source = _documents(recipe)
    split = data_lib.split_documents(len(source), recipe.data.eval_fraction, recipe.data.seed)
    tokenizer = _tokenizer(recipe, run_dir, config, source, split, init_tokenizer)
    if jax.process_index() == 0:
        write_run_file(run_dir, recipe, config, init)

    opt = make_optimizer(recipe.optimizer, recipe.train.steps)
    graphdef, target = abstract_state(config, opt)
    steps = compile_steps(graphdef, opt, target, mesh, recipe.train.sharding_rules,
                          recipe.train.router_aux_loss_coef)
    train_iterator = iter(_train_dataset(recipe, source, split, tokenizer))
    if resume_step is not None:
        state = checkpoints.restore(resume_step, target, train_iterator,
                                    shardings=steps.state_sharding)  # onto this run's mesh
    else:
        model = _initial_model(config, init_model, recipe.train.seed)
        state = jax.device_put(new_state(model, opt, recipe.train.seed)[1], steps.state_sharding)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return Run(recipe=recipe, run_dir=run_dir, config=config, tokenizer=tokenizer, steps=steps,
               state=state, train_iterator=train_iterator,
               eval_batches=_eval_batches(recipe, source, split, tokenizer),
               checkpoints=checkpoints, resumed_from=resume_step,
               flops_per_token=flops_per_token(config, num_params, recipe.data.seq_len),
               peak_flops=total_peak_flops(recipe.log.peak_tflops))


def _writable_dir(run_dir: Path) -> Path:
    # One probe per process: the processes of a multi-host run share the directory, and a
    # shared probe name let one process delete the file the other was checking.
    probe = run_dir / f".flaxlm-write-test-{uuid.uuid4().hex}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the run directory {run_dir}: {e.strerror or e}") from e
    return run_dir


def check_shapes(recipe: Recipe, config: ModelConfig, mesh) -> None:
    """Settings against the model and the mesh (a Mesh or AbstractMesh), before compiling."""
    seq_len, train = recipe.data.seq_len, recipe.train
    if seq_len > config.max_seq_len:
        raise ConfigError(f"data.seq_len {seq_len} is above the model's context "
                          f"(max_seq_len {config.max_seq_len})")
    splits = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    if train.micro_batch % splits:
        raise ConfigError(
            f"train.batch_size / train.grad_accum = {train.micro_batch} sequences per "
            f"micro-batch is not divisible by the {splits} data-parallel devices "
            f"(mesh {dict(mesh.shape)})")
    if train.micro_batch % jax.process_count():
        raise ConfigError(f"the micro-batch of {train.micro_batch} sequences is not divisible "
                          f"by the {jax.process_count()} processes")


def _check_resumable(recipe: Recipe, init: str | None, previous) -> None:
    old_recipe, _, old_init = previous
    if init != old_init:
        raise ConfigError(f"this run directory was started with --init {old_init}, not {init}; "
                          "use another --out to start a new run")
    old, new = old_recipe.to_dict(), recipe.to_dict()
    for key in FIXED_FOR_RESUME:
        section, name = key.split(".")
        if old[section][name] != new[section][name]:
            raise ConfigError(f"cannot resume: {key} was {old[section][name]!r} in this run "
                              f"directory, the recipe now says {new[section][name]!r}; "
                              "use another --out to start a new run")
    old_model = {k: v for k, v in old["model"].items() if k not in RUNTIME_MODEL_KEYS}
    new_model = {k: v for k, v in new["model"].items() if k not in RUNTIME_MODEL_KEYS}
    if old_model != new_model:
        raise ConfigError(f"cannot resume: [model] was {old_model} in this run directory, the "
                          f"recipe now says {new_model}; use another --out to start a new run")


def _documents(recipe: Recipe) -> DocumentSource:
    cfg = recipe.data
    if not cfg.files:
        return DocumentSource(default_corpus(), "text", skip_empty=True)
    return DocumentSource(find_files(cfg.files), cfg.format, cfg.text_field)


def _tokenizer(recipe: Recipe, run_dir: Path, config: ModelConfig, source: DocumentSource,
               split: data_lib.Split, init_tokenizer: Tokenizer | None) -> Tokenizer:
    """The run's tokenizer, kept in RUN_DIR/tokenizer: reused when there, else taken from
    --init, trained on the training split, or loaded from tokenizer.source."""
    directory = run_dir / "tokenizer"
    cfg = recipe.tokenizer
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_hf_dir(directory)
    elif init_tokenizer is not None:
        tokenizer = init_tokenizer
    elif cfg.source == "train":
        from flaxlm.train.tokenizer_train import train_tokenizer

        log.info("training a %d-token BPE on the training split", cfg.vocab_size or config.vocab_size)
        texts = data_lib.first_documents(source, split.train, cfg.train_bytes)
        tokenizer = train_tokenizer(texts, cfg.vocab_size or config.vocab_size,
                                    model_max_length=config.max_seq_len)
    else:
        tokenizer = _load_tokenizer(cfg.source)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the "
                          f"model's vocab_size {config.vocab_size}")
    if jax.process_index() == 0:  # one writer; the others trained or loaded the same one
        tokenizer.save(directory)
    return tokenizer


def _load_tokenizer(name: str) -> Tokenizer:
    path = resolve(name)
    return Tokenizer.from_hf_dir(path) if path.is_dir() else Tokenizer.from_gguf(path)


def _train_dataset(recipe: Recipe, source: DocumentSource, split: data_lib.Split,
                   tokenizer: Tokenizer) -> grain.IterDataset:
    processes, cfg, train = jax.process_count(), recipe.data, recipe.train
    indices = data_lib.process_shard(split.train, jax.process_index(), processes, "training")
    return data_lib.train_dataset(
        source, indices, data_lib.Encoder(tokenizer), seq_len=cfg.seq_len,
        grad_accum=train.grad_accum, micro_batch=train.micro_batch // processes,
        seed=cfg.seed, read_threads=cfg.read_threads, prefetch=cfg.prefetch)


def _eval_batches(recipe: Recipe, source: DocumentSource, split: data_lib.Split,
                  tokenizer: Tokenizer) -> list[data_lib.Batch]:
    if len(split.eval) == 0:
        return []
    processes = jax.process_count()
    indices = data_lib.process_shard(split.eval, jax.process_index(), processes, "held-out")
    return data_lib.eval_batches(source, indices, data_lib.Encoder(tokenizer),
                                 seq_len=recipe.data.seq_len,
                                 batch_size=recipe.train.micro_batch // processes,
                                 max_batches=recipe.log.eval_batches)


def _initial_model(config: ModelConfig, init_model: Decoder | None, seed: int) -> Decoder:
    if init_model is None:
        return Decoder(config, rngs=nnx.Rngs(seed))
    return build_model(config, flat_params(init_model), source="--init model")
