"""AdamW with linear warmup, cosine decay, a weight-decay mask and global-norm clipping."""

from __future__ import annotations

import jax
import optax

from flaxlm.train.recipe import OptimizerConfig

# Parameters named like this are norm scales/biases and projection biases: no weight decay.
NO_DECAY_NAMES = ("scale", "bias")


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then cosine to lr * min_lr_ratio at
    cfg.decay_steps (or total_steps when that is 0)."""
    total_steps = cfg.decay_steps or total_steps
    warmup = min(cfg.warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decay_mask(params):
    """True for parameters that get weight decay: every parameter except those whose
    path ends in a NO_DECAY_NAMES entry or passes through a norm module."""
    def decays(path, _) -> bool:
        names = [n for n in _path_names(path) if n != "value"]
        return names[-1] not in NO_DECAY_NAMES and not any("norm" in n for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule, masked decay). Its state mirrors the params
    (float32 when the params are float32, whatever the compute dtype)."""
    adamw = optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.clip_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
