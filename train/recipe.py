"""Training recipes: frozen dataclasses filled from a TOML file and `--set key=value`.

A recipe has one table per concern:

    [model]       preset = "tiny-llama" and/or any ModelConfig field (dtype, remat, ...)
    [tokenizer]   source = "train" (a byte-level BPE trained into RUN_DIR/tokenizer)
                  or any model `flaxlm.model.load` accepts (its tokenizer is used)
    [data]        files, format, text_field, seq_len, eval_fraction, seed
    [optimizer]   AdamW, warmup + cosine schedule, clipping
    [train]       steps, batch_size, grad_accum, seed
    [checkpoint]  every, keep, async_save
    [log]         every, eval_every, eval_batches, peak_tflops, progress, tensorboard, plot
    [finetune]    base, method (full | lora | prompt), objective (sft | dpo | reward | grpo |
                  ppo | distill), dpo_*, grpo_*, ppo_*, rollout_*, rewards, arithmetic_*,
                  distill_*,
                  freeze, lora_*, prompt_*, report_*
                  (`flaxlm finetune` only; see FinetuneConfig)

Every key is checked: an unknown one is an error naming the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from flaxlm.model.config import ModelConfig
from flaxlm.model.errors import ConfigError
from flaxlm.model.sharding import MeshShape, make_rules, parse_rules


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    files: tuple[str, ...] = ()   # glob patterns; empty: the Python standard library source
    format: str = "auto"          # auto (by suffix) | text | jsonl | parquet
    text_field: str = "text"      # the text column of JSONL records and Parquet tables
    seq_len: int = 256            # tokens per packed training sequence
    eval_fraction: float = 0.01   # documents held out for evaluation
    seed: int = 0                 # the shuffle and the held-out split
    read_threads: int = 2         # threads that read and tokenize documents
    prefetch: int = 64            # documents read ahead
    train_on: str = "all"         # fine-tuning: the loss covers every assistant turn ("all")
                                  # or only the last one ("last")

    def __post_init__(self):
        _check(self.format in ("auto", "text", "jsonl", "parquet"),
               f"data.format {self.format!r} is not one of auto, text, jsonl, parquet")
        _check(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
        _check(0 <= self.eval_fraction < 1,
               f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _check(self.read_threads >= 1, f"data.read_threads must be >= 1, got {self.read_threads}")
        _check(self.prefetch >= 1, f"data.prefetch must be >= 1, got {self.prefetch}")
        _check(self.train_on in ("all", "last"),
               f"data.train_on {self.train_on!r} is not one of all, last")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    source: str = "train"         # "train", or a model name/path whose tokenizer is used
    vocab_size: int = 0           # for source = "train"; 0: the model's vocab_size
    train_bytes: int = 8_000_000  # text read from the training split to train the BPE


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-4              # peak learning rate
    warmup_steps: int = 100       # linear warmup from 0
    min_lr_ratio: float = 0.1     # cosine decay ends at lr * min_lr_ratio at decay_steps
    decay_steps: int = 0          # schedule length; 0: train.steps (set it to extend a run
                                  # with --steps without changing the schedule so far)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1     # on matrices only (no decay on norms and biases)
    clip_norm: float = 1.0        # global-norm clipping; 0 disables it

    def __post_init__(self):
        _check(self.lr > 0, f"optimizer.lr must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1,
               f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.clip_norm >= 0, f"optimizer.clip_norm must be >= 0, got {self.clip_norm}")
        _check(self.decay_steps >= 0, f"optimizer.decay_steps must be >= 0, got {self.decay_steps}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000             # optimizer steps
    batch_size: int = 32          # sequences per optimizer step, over all devices and processes
    grad_accum: int = 1           # micro-batches per step (each batch_size / grad_accum)
    seed: int = 0                 # parameter init and the step RNG
    mesh: str = "data=-1"         # device mesh (data, fsdp, tensor sizes; -1 takes the rest),
                                  # e.g. "fsdp=-1" or "data=2,fsdp=4"; see flaxlm.model.sharding
    rules: tuple[str, ...] = ()   # sharding rule overrides, e.g. ["mlp=fsdp+tensor", "vocab=none"]
                                  # (logical axis name = mesh axes; the rest from sharding.RULES)
    router_aux_loss_coef: float = 0.001  # weight of the MoE router's load-balancing loss
                                  # (HF's router_aux_loss_coef; ignored without MoE layers)

    def __post_init__(self):
        MeshShape.parse(self.mesh)
        parse_rules(self.rules)
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.router_aux_loss_coef >= 0,
               f"train.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        _check(self.batch_size % self.grad_accum == 0,
               f"train.batch_size ({self.batch_size}) is not divisible by "
               f"train.grad_accum ({self.grad_accum})")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def sharding_rules(self):
        """The rules table: flaxlm.model.sharding.RULES with `rules` applied."""
        return make_rules(parse_rules(self.rules))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500              # save every N steps (and at the end, and on SIGTERM/SIGINT)
    keep: int = 3                 # keep the last K checkpoints
    async_save: bool = True       # write in the background while training goes on

    def __post_init__(self):
        _check(self.every >= 1, f"checkpoint.every must be >= 1, got {self.every}")
        _check(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10               # metrics.jsonl / TensorBoard / progress-bar interval
    eval_every: int = 100         # held-out evaluation interval (and at the end)
    eval_batches: int = 8         # batches of the held-out split per evaluation
    peak_tflops: float = 0.0      # per-device peak for MFU; 0: flaxlm.train.metrics.peak_flops
    progress: bool = True         # the progress bar on stderr
    tensorboard: bool = True      # event files in RUN_DIR/tensorboard
    plot: bool = True             # RUN_DIR/loss.png at the end

    def __post_init__(self):
        for name in ("every", "eval_every", "eval_batches"):
            _check(getattr(self, name) >= 1, f"log.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.peak_tflops >= 0, f"log.peak_tflops must be >= 0, got {self.peak_tflops}")


METHODS = ("full", "lora", "prompt")
OBJECTIVES = ("sft", "dpo", "reward", "grpo", "ppo", "distill")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """What `flaxlm finetune` adapts (`method`) and what it trains it for (`objective`: SFT
    chats, flaxlm.train.sft; DPO on preference pairs, flaxlm.train.dpo; a reward model
    on preference pairs, flaxlm.train.reward)."""

    base: str = "smollm2-135m-instruct"  # the model to adapt (any name/path flaxlm.model.load takes);
                                  # "": a new model of the [model] table (method full)
    quantize: str = ""            # "int8": a frozen int8 base (LoRA / prompt only, QLoRA-style)
    method: str = "lora"          # full | lora | prompt: what trains
    objective: str = "sft"        # sft (chats) | dpo (preference pairs, flaxlm.train.dpo) |
                                  # reward (a reward model on pairs, flaxlm.train.reward) |
                                  # grpo (rollouts scored by reward functions, flaxlm.train.grpo) |
                                  # distill (a teacher's distribution on SFT data, flaxlm.train.distill)
    dpo_beta: float = 0.1         # DPO: the strength of the pull towards the reference
    dpo_label_smoothing: float = 0.0  # DPO: the assumed fraction of flipped labels (cDPO)
    grpo_num_generations: int = 4 # GRPO: completions sampled per prompt (a group; >= 2)
    rollout_max_new_tokens: int = 16  # GRPO, PPO: the longest completion
    rollout_temperature: float = 1.0  # GRPO, PPO: sampling temperature of the rollouts
    grpo_beta: float = 0.04       # GRPO: weight of the k3 KL estimate to the reference
    grpo_epsilon: float = 0.2     # GRPO: the ratio's clip range [1 - eps, 1 + eps]
    rewards: tuple[str, ...] = ("flaxlm.model.arithmetic:arithmetic_reward",)
                                  # GRPO, PPO: reward callables "module:function" (prompts,
                                  # completions) -> floats, summed with reward_weights
    reward_weights: tuple[float, ...] = ()  # one per reward; empty: all 1.0
    distill_teacher: str = ""     # distill: the teacher (any name/path load takes; same tokenizer)
    distill_teacher_quantize: str = ""  # distill: "int8" loads the teacher in int8
    distill_temperature: float = 2.0    # distill: T of the softened distributions
    distill_alpha: float = 0.5    # distill: loss = alpha T^2 KL + (1 - alpha) CE
    ppo_reward_model: str = ""    # PPO: a reward model's HF directory (flaxlm.model.reward)
                                  # scoring the chat prompt + completion instead of `rewards`
    ppo_epochs: int = 4           # PPO: passes over each rollout batch
    ppo_minibatches: int = 2      # PPO: optimizer updates per pass
    ppo_kl_coef: float = 0.05     # PPO: per-token KL penalty to the reference in the reward
    ppo_gamma: float = 1.0        # PPO: discount
    ppo_lam: float = 0.95         # PPO: GAE lambda
    ppo_cliprange: float = 0.2    # PPO: the ratio's clip range
    ppo_cliprange_value: float = 0.2  # PPO: the value's clip range around the rollout's
    ppo_vf_coef: float = 0.1      # PPO: weight of the value loss
    arithmetic_max_operand: int = 20    # GRPO without data.files: the arithmetic task's sizes
    arithmetic_operations: str = "+*"
    arithmetic_train: int = 2000  # problems in the training split (held out: log.eval_batches
                                  # * micro-batch prompts of the test split)
    freeze: tuple[str, ...] = ()  # full: regexes; parameters whose path (e.g. "embed.embedding",
                                  # "layers.0.attn.q_proj.kernel") matches one stay frozen
    lora_rank: int = 8
    lora_alpha: float = 16.0      # scaling alpha / rank (alpha / sqrt(rank) with lora_rslora)
    lora_dropout: float = 0.0     # on the adapter's input, in training only
    lora_rslora: bool = False
    lora_targets: tuple[str, ...] = ()  # module-name regexes; empty: flaxlm.model.lora's default
                                        # (q, k, v, o, gate, up, down projections or fused forms)
    prompt_tokens: int = 20       # virtual tokens prepended to every input
    prompt_init: str = "text"     # "text" (embeddings of prompt_init_text, as PEFT) | "random"
    prompt_init_text: str = "Write the docstring of this Python function."
    report_examples: int = 100    # held-out docstrings scored (loss, ROUGE-L) for the base and
                                  # the tuned model at the end; 0: no report
    report_max_new_tokens: int = 48

    def __post_init__(self):
        _check(self.method in METHODS,
               f"finetune.method {self.method!r} is not one of {', '.join(METHODS)}")
        _check(self.objective in OBJECTIVES,
               f"finetune.objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        _check(not (self.objective == "reward" and self.method == "prompt"),
               "finetune.objective = \"reward\" trains the score head with all weights or "
               "LoRA adapters: use method full or lora")
        _check(not (self.objective == "reward" and self.quantize),
               "finetune.objective = \"reward\" is exported merged in the HF layout, which "
               "an int8 base cannot be: drop finetune.quantize")
        _check(self.grpo_num_generations >= 2,
               f"finetune.grpo_num_generations must be >= 2 (advantages are relative to the "
               f"group of a prompt's completions), got {self.grpo_num_generations}")
        _check(self.rollout_max_new_tokens >= 1, "finetune.rollout_max_new_tokens must be >= 1")
        _check(self.rollout_temperature > 0, "finetune.rollout_temperature must be > 0")
        _check(self.grpo_beta >= 0 and self.grpo_epsilon > 0,
               "finetune.grpo_beta must be >= 0 and finetune.grpo_epsilon > 0")
        _check(bool(self.rewards) and all(":" in r for r in self.rewards),
               f"finetune.rewards must name callables as \"module:function\", got "
               f"{list(self.rewards)}")
        _check(not self.reward_weights
               or len(self.reward_weights) == len(self.rewards),
               f"finetune.reward_weights has {len(self.reward_weights)} weights for "
               f"{len(self.rewards)} rewards")
        _check(not (self.objective in ("reward", "ppo") and self.method == "prompt"),
               f"finetune.objective = \"{self.objective}\" trains a head beside the weights: "
               "use method full or lora")
        _check(self.ppo_epochs >= 1 and self.ppo_minibatches >= 1,
               "finetune.ppo_epochs and finetune.ppo_minibatches must be >= 1")
        _check(0 <= self.ppo_gamma <= 1 and 0 <= self.ppo_lam <= 1,
               "finetune.ppo_gamma and finetune.ppo_lam must be in [0, 1]")
        _check(self.objective != "distill" or bool(self.distill_teacher),
               "finetune.objective = \"distill\" needs finetune.distill_teacher (the teacher "
               "model's name or path)")
        _check(self.distill_teacher_quantize in ("", "int8"),
               f"finetune.distill_teacher_quantize {self.distill_teacher_quantize!r} is not "
               "\"\" or \"int8\"")
        _check(self.distill_temperature > 0, "finetune.distill_temperature must be > 0")
        _check(0 <= self.distill_alpha <= 1,
               f"finetune.distill_alpha must be in [0, 1], got {self.distill_alpha}")
        _check(self.dpo_beta > 0, f"finetune.dpo_beta must be > 0, got {self.dpo_beta}")
        _check(0 <= self.dpo_label_smoothing < 0.5,
               f"finetune.dpo_label_smoothing must be in [0, 0.5), got "
               f"{self.dpo_label_smoothing}")
        _check(bool(self.base) or self.method == "full",
               "finetune.base must name the model to fine-tune (or be \"\" with method "
               "full: a new model of the [model] table)")
        _check(self.quantize in ("", "int8"),
               f"finetune.quantize {self.quantize!r} is not \"\" or \"int8\"")
        _check(not (self.quantize and self.method == "full"),
               "finetune.quantize = \"int8\" freezes the base: use method lora or prompt")
        _check(not (self.freeze and self.method != "full"),
               f"finetune.freeze is for method full; method {self.method!r} trains only its "
               "adapter")
        _check(self.lora_rank > 0, f"finetune.lora_rank must be > 0, got {self.lora_rank}")
        _check(self.lora_alpha > 0, f"finetune.lora_alpha must be > 0, got {self.lora_alpha}")
        _check(0 <= self.lora_dropout < 1,
               f"finetune.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _check(self.prompt_tokens > 0,
               f"finetune.prompt_tokens must be > 0, got {self.prompt_tokens}")
        _check(self.prompt_init in ("text", "random"),
               f"finetune.prompt_init {self.prompt_init!r} is not one of text, random")
        _check(self.prompt_init != "text" or bool(self.prompt_init_text),
               "finetune.prompt_init = \"text\" needs a non-empty finetune.prompt_init_text")
        _check(self.report_examples >= 0,
               f"finetune.report_examples must be >= 0, got {self.report_examples}")
        _check(self.report_max_new_tokens >= 1, "finetune.report_max_new_tokens must be >= 1")
        for pattern in self.freeze + self.lora_targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"finetune: {pattern!r} is not a regular expression ({e})")


SECTIONS = {"tokenizer": TokenizerConfig, "data": DataConfig, "optimizer": OptimizerConfig,
            "train": TrainConfig, "checkpoint": CheckpointConfig, "log": LogConfig,
            "finetune": FinetuneConfig}
OPTIONAL_SECTIONS = ("finetune",)  # None when the file has no such table
MODEL_KEYS = ("preset", *(f.name for f in dataclasses.fields(ModelConfig)))
# Model settings that change how a model runs, not its parameters.
RUNTIME_MODEL_KEYS = ("dtype", "param_dtype", "remat", "scan_layers")


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: Mapping[str, Any]      # the raw [model] table: preset and/or ModelConfig fields
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    finetune: FinetuneConfig | None = None   # set by a [finetune] table: `flaxlm finetune`

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "recipe") -> Recipe:
        """The recipe of `data` (a parsed TOML file); every error names `source`."""
        _check_keys(data, source)
        try:
            sections = {name: _build_section(kind, data.get(name, {}), name, source)
                        for name, kind in SECTIONS.items()
                        if name in data or name not in OPTIONAL_SECTIONS}
            recipe = cls(model=types.MappingProxyType(dict(data.get("model", {}))), **sections)
            if set(recipe.model) - set(RUNTIME_MODEL_KEYS):
                recipe.model_config()  # validate the model table now
        except ConfigError as e:
            if str(e).startswith(f"{source}: "):
                raise
            raise ConfigError(f"{source}: {e}") from e
        return recipe

    @classmethod
    def load(cls, path: str | Path, overrides: tuple[str, ...] = ()) -> Recipe:
        """Read a TOML recipe and apply `key=value` overrides (values are TOML literals)."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read recipe {path}: {e}") from e
        for item in overrides:
            data = apply_override(data, item)
        return cls.from_dict(data, source=str(path))

    def model_config(self, init: ModelConfig | None = None) -> ModelConfig:
        """The ModelConfig of the [model] table (a preset with overrides, or inline).

        With `init` (the config of a model to fine-tune) the shape comes from `init`;
        the table may set dtype, param_dtype, remat and scan_layers, and any shape field
        it sets (a preset included) must agree with `init`.
        """
        fields = dict(self.model)
        runtime = {k: fields.pop(k) for k in RUNTIME_MODEL_KEYS if k in fields}
        if init is None and not fields:
            raise ConfigError("[model] needs a preset or the model's fields (or use --init MODEL)")
        own = _model_from_table(fields) if fields else None
        if init is not None and own is not None:
            _check_same_shape(own, init)
        return (init or own).replace(**runtime)

    def to_dict(self) -> dict[str, Any]:
        out = {"model": dict(self.model)}
        out.update({name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS
                    if getattr(self, name) is not None})
        out["data"]["files"] = list(self.data.files)
        out["train"]["rules"] = list(self.train.rules)
        if self.finetune is not None:
            for name in ("rewards", "reward_weights"):
                out["finetune"][name] = list(getattr(self.finetune, name))
            out["finetune"]["freeze"] = list(self.finetune.freeze)
            out["finetune"]["lora_targets"] = list(self.finetune.lora_targets)
        return out


def _model_from_table(fields: dict[str, Any]) -> ModelConfig:
    preset = fields.pop("preset", None)
    if preset is None:
        return ModelConfig.from_dict(fields, source="[model]")
    base = ModelConfig.preset(preset).to_dict()
    return ModelConfig.from_dict({**base, **fields}, source=f"[model] (preset {preset!r})")


def _check_same_shape(own: ModelConfig, init: ModelConfig) -> None:
    for key, value in own.to_dict().items():
        if key not in RUNTIME_MODEL_KEYS and init.to_dict().get(key) != value:
            raise ConfigError(f"model.{key} is {value!r} in the recipe but "
                              f"{init.to_dict().get(key)!r} in the --init model")


def apply_override(data: Mapping[str, Any], item: str) -> dict[str, Any]:
    """A copy of `data` with `section.key=value` set; the value is parsed as TOML
    (`3e-4`, `true`, `"x"`, `["a", "b"]`) or taken as a string when it is not TOML."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optimizer.lr=3e-4")
    _check_known(key.strip(), "--set")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    section, name = parts
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    out.setdefault(section, {})[name] = value
    return out


def _valid_keys() -> list[str]:
    keys = [f"model.{k}" for k in MODEL_KEYS]
    for name, kind in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(kind)]
    return keys


def _check_known(key: str, source: str) -> None:
    valid = _valid_keys()
    if key not in valid:
        hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{source}: unknown setting {key!r}{extra}")


def _check_keys(data: Mapping[str, Any], source: str) -> None:
    sections = ("model", *SECTIONS)
    for section, table in data.items():
        if section not in sections:
            hint = difflib.get_close_matches(section, sections, n=1)
            extra = f" (did you mean [{hint[0]}]?)" if hint else ""
            raise ConfigError(f"{source}: unknown section [{section}]{extra}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: {section} must be a table, got {table!r}")
        for key in table:
            _check_known(f"{section}.{key}", source)


def _build_section(kind: type, table: Mapping[str, Any], name: str, source: str):
    hints = typing.get_type_hints(kind)
    values = {key: _coerce(value, hints[key], f"{name}.{key}", source)
              for key, value in table.items()}
    return kind(**values)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """`value` checked against a field type (int, float, bool, str, tuple[str, ...])."""
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint == tuple[float, ...]:
        if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           for v in value):
            return tuple(float(v) for v in value)
        raise ConfigError(f"{source}: {key} must be a list of numbers, got {value!r}")
    if typing.get_origin(hint) is tuple:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return tuple(items)
        raise ConfigError(f"{source}: {key} must be a string or a list of strings, got {value!r}")
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
