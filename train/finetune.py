"""Fine-tuning: SFT chats on a base model, all of it (full), LoRA adapters or a soft prompt.

`finetune(recipe, run_dir)` runs a recipe with a [finetune] table through the same
loop as pretraining (`flaxlm.train.loop.execute`: progress bar, metrics.jsonl,
TensorBoard, loss plot, checkpoints, SIGTERM save, resume). What trains is a filter
over the parameter tree, not a separate model class:

    full    every nnx.Param but those whose path matches a `finetune.freeze` regex
    lora    LoraParam: the adapters `flaxlm.model.lora.apply_lora` adds
    prompt  PromptParam: the soft prompt `flaxlm.model.prompt_tuning` adds

The model splits three ways, `graphdef, trainable, frozen = nnx.split(model, filter,
...)`: only `trainable` is differentiated, carried in the optimizer state and
checkpointed; `frozen` (the base weights, float or int8) is an argument of the
compiled steps. A resumed or exported run re-makes the frozen part from
`finetune.base` (adapters are created with the recipe's seed, then overwritten by
the checkpoint).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.model.config import ModelConfig
from flaxlm.model.errors import CheckpointError, ConfigError
from flaxlm.model.loading import load
from flaxlm.model.params import build_model, flat_params, path_name
from flaxlm.model.quant import is_quantized
from flaxlm.model.sharding import make_mesh
from flaxlm.model.sources import find_files
from flaxlm.model.tokenizer import Tokenizer
from flaxlm.train import sft
from flaxlm.train.checkpoint import RUN_FILE, Checkpoints, read_run_file, write_run_file
from flaxlm.train.metrics import flops_per_token, matmul_params, total_peak_flops
from flaxlm.train.optim import optimizer as make_optimizer
from flaxlm.train.prepare import Run, _writable_dir, check_shapes
from flaxlm.train.recipe import CheckpointConfig, FinetuneConfig, Recipe
from flaxlm.train.step import TrainState, compile_steps

# Settings a resumed run must share with the run that wrote its checkpoints.
FIXED_FOR_RESUME = ("data.files", "data.seq_len", "data.eval_fraction", "data.seed",
                    "data.train_on", "train.batch_size", "train.seed")
# Files and folders of a run directory (what --overwrite removes, and nothing else).
RUN_CONTENTS = ("checkpoints", "tensorboard", "tokenizer", "export", RUN_FILE, "metrics.jsonl",
                "loss.png", "report.json")


# ---------------------------------------------------------------- the model

def load_base(recipe: Recipe) -> tuple[nnx.Module, Tokenizer]:
    """The base model of `finetune.base` (int8 with finetune.quantize) with the [model]
    table's dtype, param_dtype, remat and scan_layers, and its tokenizer; with no base
    (method full), a new model of the [model] table initialised from train.seed, with the
    tokenizer of [tokenizer] source (a student trained from scratch, e.g. by distillation)."""
    ft, table = recipe.finetune, dict(recipe.model)
    if not ft.base:
        return _new_model(recipe)
    model, tokenizer = load(ft.base, dtype=table.get("dtype", "float32"),
                            param_dtype=table.get("param_dtype"),
                            quantize=ft.quantize or None)
    if tokenizer is None:
        raise ConfigError(f"finetune.base {ft.base}: the model has no tokenizer")
    config = recipe.model_config(model.config)
    if config != model.config:
        if is_quantized(model):
            raise ConfigError("[model] settings other than dtype cannot change an int8 base")
        model = build_model(config, flat_params(model), source=ft.base)
    return model, tokenizer


def _new_model(recipe: Recipe) -> tuple[nnx.Module, Tokenizer]:
    from flaxlm.model.decoder import Decoder
    from flaxlm.train.prepare import _load_tokenizer

    if recipe.tokenizer.source == "train":
        raise ConfigError("finetune.base = \"\" makes a new model: set [tokenizer] source to the "
                          "model whose tokenizer it uses (e.g. the teacher)")
    config = recipe.model_config()
    tokenizer = _load_tokenizer(recipe.tokenizer.source)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"[tokenizer] source {recipe.tokenizer.source} has "
                          f"{tokenizer.vocab_size} tokens, model.vocab_size is {config.vocab_size}")
    return Decoder(config, rngs=nnx.Rngs(recipe.train.seed)), tokenizer


def _freeze_filter(model: nnx.Module, patterns: tuple[str, ...]):
    """nnx filter: a Param whose path matches none of `patterns` (each must match one)."""
    names = [path_name(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    for pattern in patterns:
        if not any(re.search(pattern, n) for n in names):
            raise ConfigError(f"finetune.freeze {pattern!r} matches no parameter; parameters "
                              f"are named like {', '.join(names[:4])}, ..., {names[-1]}")

    def trainable(path, value) -> bool:
        name = path_name(path)
        return isinstance(value, nnx.Param) and not any(re.search(p, name) for p in patterns)

    return trainable


def adapt(model: nnx.Module, tokenizer: Tokenizer, ft: FinetuneConfig, seed: int):
    """Add the method's adapter (and for a reward model the score head, which always
    trains) to `model` in place; returns the trainable filter."""
    trainable = _adapter(model, tokenizer, ft, seed)
    if ft.objective == "ppo":
        from flaxlm.train.ppo import ValueParam, add_value_head

        add_value_head(model, nnx.Rngs(params=seed + 2))
        return nnx.Any(trainable, ValueParam)
    if ft.objective != "reward":
        return trainable
    from flaxlm.model.reward import ScoreParam, add_score_head

    add_score_head(model, nnx.Rngs(params=seed + 2))
    return nnx.Any(trainable, ScoreParam)


def _adapter(model: nnx.Module, tokenizer: Tokenizer, ft: FinetuneConfig, seed: int):
    if ft.method == "lora":
        from flaxlm.model.lora import DEFAULT_TARGETS, LoraConfig, apply_lora, lora_filter

        cfg = LoraConfig(rank=ft.lora_rank, alpha=ft.lora_alpha, dropout=ft.lora_dropout,
                         rslora=ft.lora_rslora, targets=ft.lora_targets or DEFAULT_TARGETS)
        apply_lora(model, cfg, nnx.Rngs(params=seed, dropout=seed + 1))
        return lora_filter
    if ft.method == "prompt":
        from flaxlm.model.prompt_tuning import PromptTuning, apply_prompt_tuning, prompt_filter

        cfg = PromptTuning(ft.prompt_tokens, ft.prompt_init,
                           ft.prompt_init_text if ft.prompt_init == "text" else None)
        apply_prompt_tuning(model, cfg, nnx.Rngs(seed), tokenizer)
        return prompt_filter
    if is_quantized(model):
        raise ConfigError(f"finetune.base {ft.base} is int8: its weights cannot train; "
                          "use method lora or prompt")
    return _freeze_filter(model, ft.freeze)


def split(model: nnx.Module, trainable) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable state, frozen state: everything else)."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(params):
        raise ConfigError("nothing to train: every parameter is frozen")
    return graphdef, params, frozen


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------- data

def _chats(recipe: Recipe) -> tuple[list[sft.Chat], list[sft.Chat]]:
    """(training chats, held-out chats): the docstrings task's train and test splits, or
    the data files split by data.eval_fraction."""
    cfg = recipe.data
    if not cfg.files:
        return sft.docstring_chats("train"), sft.docstring_chats("test")
    from flaxlm.train.data import split_documents

    chats = sft.read_chats(find_files(cfg.files))
    split = split_documents(len(chats), cfg.eval_fraction, cfg.seed)
    return [chats[i] for i in split.train], [chats[i] for i in split.eval]


def _encode(recipe: Recipe, tokenizer: Tokenizer) -> tuple[sft.Encoded, sft.Encoded]:
    train_chats, eval_chats = _chats(recipe)
    cfg = recipe.data
    encoded = (sft.encode_chats(train_chats, tokenizer, cfg.seq_len, cfg.train_on),
               sft.encode_chats(eval_chats, tokenizer, cfg.seq_len, cfg.train_on))
    if jax.process_index() == 0:
        print(encoded[0].summary("training data"), flush=True)
        print(encoded[1].summary("held-out data"), flush=True)
    return encoded


# ---------------------------------------------------------------- the run

def _check_resumable(recipe: Recipe, previous) -> None:
    old_recipe = previous[0]
    if old_recipe.finetune is None:
        raise ConfigError("this run directory holds a `flaxlm train` run; use another --out "
                          "(or --overwrite)")
    old, new = old_recipe.to_dict(), recipe.to_dict()
    keys = list(FIXED_FOR_RESUME) + [f"finetune.{f.name}" for f in
                                     dataclasses.fields(FinetuneConfig)
                                     if not f.name.startswith("report_")]
    for key in keys:
        section, name = key.split(".")
        if old[section][name] != new[section][name]:
            raise ConfigError(f"cannot resume: {key} was {old[section][name]!r} in this run "
                              f"directory, the recipe now says {new[section][name]!r}; use "
                              "another --out, or --overwrite to start again here")


def clear_run(run_dir: Path) -> None:
    """Remove a run's files from `run_dir` (RUN_CONTENTS only: nothing else there)."""
    for name in RUN_CONTENTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@dataclasses.dataclass(frozen=True)
class Trainable:
    """What a fine-tuning run trains, for the report at its start."""

    method: str
    params: int               # trainable parameters
    total: int                # all parameters (trainable + frozen)
    optimizer_bytes: int      # the optimizer state (AdamW moments, counters)

    def summary(self) -> str:
        return (f"{self.method}: {self.params:,} trainable parameters of {self.total:,} "
                f"({100 * self.params / self.total:.3f}%); optimizer state "
                f"{self.optimizer_bytes / 2**20:.2f} MiB")


def prepare_finetune(recipe: Recipe, run_dir: str | Path, overwrite: bool = False
                     ) -> tuple[Run, Trainable]:
    """Everything a fine-tuning run needs before its first step, checked before compiling."""
    if recipe.finetune is None:
        raise ConfigError("the recipe has no [finetune] table (base, method, ...)")
    run_dir = _writable_dir(Path(run_dir))
    if overwrite:
        clear_run(run_dir)
    previous = read_run_file(run_dir) if (run_dir / RUN_FILE).is_file() else None
    if previous is not None:
        _check_resumable(recipe, previous)
    model, tokenizer = load_base(recipe)
    config = model.config
    mesh = make_mesh(recipe.train.mesh)
    check_shapes(recipe, config, mesh)
    train_dataset, eval_batches, prompts = _data(recipe, tokenizer)
    trainable = adapt(model, tokenizer, recipe.finetune, recipe.train.seed)
    graphdef, params, frozen = split(model, trainable)
    checkpoints = Checkpoints(run_dir, recipe.checkpoint)
    if jax.process_index() == 0:
        write_run_file(run_dir, recipe, config, recipe.finetune.base)
        tokenizer.save(run_dir / "tokenizer")
    opt = make_optimizer(recipe.optimizer, recipe.train.steps)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                       rng=jax.random.PRNGKey(recipe.train.seed))
    target = jax.eval_shape(lambda s: s, state)
    steps = _compile(recipe, graphdef, opt, target, mesh, frozen, params, tokenizer, prompts,
                     config.vocab_size)
    train_iterator = iter(train_dataset)
    resume_step = checkpoints.latest_step()
    if resume_step is not None:
        state = checkpoints.restore(resume_step, target, train_iterator,
                                    shardings=steps.state_sharding)
    else:
        state = jax.device_put(state, steps.state_sharding)
    info = Trainable(recipe.finetune.method, _count(params),
                     _count(nnx.state(model, nnx.Param)), _bytes(state.opt_state))
    run = Run(recipe=recipe, run_dir=run_dir, config=config, tokenizer=tokenizer, steps=steps,
              state=state, train_iterator=train_iterator,
              eval_batches=eval_batches, checkpoints=checkpoints,
              resumed_from=resume_step,
              flops_per_token=_flops_per_token(recipe, config, model),
              peak_flops=total_peak_flops(recipe.log.peak_tflops))
    return run, info


def _data(recipe: Recipe, tokenizer: Tokenizer):
    """(the endless training dataset, the held-out batches, GRPO's prompts or None) of the
    recipe's objective."""
    if recipe.finetune.objective in ("grpo", "ppo"):
        from flaxlm.train.grpo import grpo_data, grpo_prompts

        prompts = grpo_prompts(recipe, tokenizer)
        return (*grpo_data(recipe, prompts), prompts)
    if recipe.finetune.objective in ("dpo", "reward"):
        from flaxlm.train.align import preference_data

        return (*preference_data(recipe, tokenizer), None)
    train_set, eval_set = _encode(recipe, tokenizer)
    return _train_dataset(recipe, train_set), _eval_batches(recipe, eval_set), None


def _compile(recipe: Recipe, graphdef, opt, target, mesh, frozen, params, tokenizer, prompts,
             vocab_size: int):
    """The objective's compiled steps (`params`: the starting trainable weights)."""
    if recipe.finetune.objective in ("grpo", "ppo"):
        from flaxlm.train.grpo import GrpoSteps
        from flaxlm.train.ppo import PpoSteps

        kind = PpoSteps if recipe.finetune.objective == "ppo" else GrpoSteps
        return kind(recipe, graphdef, params, frozen, opt, target, mesh, tokenizer,
                         prompts).steps
    if recipe.finetune.objective == "dpo":
        from flaxlm.train.align import dpo_steps

        return dpo_steps(recipe, graphdef, opt, target, mesh, frozen, params)
    if recipe.finetune.objective == "distill":
        from flaxlm.train.distill import distill_steps

        return distill_steps(recipe, graphdef, opt, target, mesh, frozen, tokenizer,
                             vocab_size)
    if recipe.finetune.objective == "reward":
        from flaxlm.train.align import reward_steps

        return reward_steps(recipe, graphdef, opt, target, mesh, frozen)
    return compile_steps(graphdef, opt, target, mesh, recipe.train.sharding_rules,
                         recipe.train.router_aux_loss_coef, frozen=frozen)


def _flops_per_token(recipe: Recipe, config: ModelConfig, model) -> float:
    """6N + attention for full fine-tuning; a frozen base computes no weight gradients,
    so LoRA and prompt tuning count 4N + attention (adapters are left out: < 1%)."""
    n = _count(nnx.state(model, nnx.Param))
    full = flops_per_token(config, n, recipe.data.seq_len)
    return full if recipe.finetune.method == "full" else full - 2 * matmul_params(config, n)


def _train_dataset(recipe: Recipe, encoded: sft.Encoded):
    processes, train = jax.process_count(), recipe.train
    examples = encoded.examples[jax.process_index()::processes]
    return sft.sft_train_dataset(examples, seq_len=recipe.data.seq_len,
                                 grad_accum=train.grad_accum,
                                 micro_batch=train.micro_batch // processes,
                                 seed=recipe.data.seed)


def _eval_batches(recipe: Recipe, encoded: sft.Encoded):
    processes = jax.process_count()
    examples = encoded.examples[jax.process_index()::processes]
    return sft.sft_eval_batches(examples, seq_len=recipe.data.seq_len,
                                batch_size=recipe.train.micro_batch // processes,
                                max_batches=recipe.log.eval_batches)


def finetune(recipe: Recipe, run_dir: str | Path, overwrite: bool = False):
    """Prepare (or resume) and train a fine-tuning run; returns the loop's RunResult."""
    from flaxlm.train.loop import execute

    run, info = prepare_finetune(recipe, run_dir, overwrite)
    if jax.process_index() == 0:
        print(info.summary(), flush=True)
    return execute(run)


# ---------------------------------------------------------------- restore and export

def restore_finetuned(run_dir: str | Path, step: int | None = None
                      ) -> tuple[nnx.Module, Tokenizer, int, Recipe]:
    """(the adapted model with the checkpoint's trainable weights, tokenizer, step, recipe)."""
    run_dir = Path(run_dir)
    recipe, _, _ = read_run_file(run_dir)
    if recipe.finetune is None:
        raise CheckpointError(f"{run_dir}: not a fine-tuning run (no [finetune] in {RUN_FILE})")
    model, tokenizer = load_base(recipe)
    trainable = adapt(model, tokenizer, recipe.finetune, recipe.train.seed)
    graphdef, params, frozen = split(model, trainable)
    opt = make_optimizer(recipe.optimizer, recipe.train.steps)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.eval_shape(lambda p: TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=opt.init(p),
        rng=jax.random.PRNGKey(0)), params)
    target = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=device),
                          target)
    checkpoints = Checkpoints(run_dir, CheckpointConfig(async_save=False))
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{checkpoints.directory}: no checkpoint")
        state = checkpoints.restore(step, target)
    finally:
        checkpoints.close()
    model = nnx.merge(graphdef, state.params, frozen)
    model.eval()
    return model, Tokenizer.from_hf_dir(run_dir / "tokenizer"), step, recipe


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into an existing non-empty directory (or a file) without --overwrite."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it")


def export_finetuned(run_dir: str | Path, out: str | Path, merge: bool = False,
                     step: int | None = None, overwrite: bool = False) -> Path:
    """Write a fine-tuning run's checkpoint: LoRA and prompt tuning as a PEFT adapter
    directory (the base is finetune.base), or with `merge` (LoRA) / method full a Hugging
    Face model directory; a reward model as an HF *ForSequenceClassification directory
    (flaxlm.model.reward.save_reward_model; LoRA merged)."""
    from flaxlm.model.loading import save_hf

    out = Path(out)
    check_out_dir(out, overwrite)
    model, tokenizer, _, recipe = restore_finetuned(run_dir, step)
    method = recipe.finetune.method
    if recipe.finetune.objective == "reward":
        return _export_reward_model(model, tokenizer, recipe, out)
    if merge and method == "prompt":
        raise ConfigError("a soft prompt cannot be merged into the weights: export the "
                          "adapter (without --merge) and load it with adapter=DIR")
    if merge and recipe.finetune.quantize:
        raise ConfigError("the base is int8: merging would re-quantize the adapter away; "
                          "export the adapter (without --merge)")
    if method == "full":
        return save_hf(model, tokenizer, out)
    if merge:
        from flaxlm.model.lora import merge_lora

        merge_lora(model)
        return save_hf(model, tokenizer, out)
    from flaxlm.model.peft_io import save_adapter

    return save_adapter(model, out, base_model_name_or_path=recipe.finetune.base,
                        overwrite=overwrite)



def _export_reward_model(model, tokenizer: Tokenizer, recipe: Recipe, out: Path) -> Path:
    """A reward model as an HF *ForSequenceClassification directory (LoRA merged)."""
    from flaxlm.model.lora import merge_lora
    from flaxlm.model.reward import save_reward_model

    if recipe.finetune.quantize:
        raise ConfigError("the base is int8: a reward model is written merged in the HF "
                          "layout, which int8 weights cannot be; train on a float base")
    merge_lora(model)
    return save_reward_model(model, tokenizer, out)
