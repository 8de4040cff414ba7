"""`flaxlm attention`: an attention heat map with the tokens as axis labels (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flaxlm.infer.trace import TraceResult
from flaxlm.model.errors import ConfigError


def pick(result: TraceResult, layer: int, head: int | None) -> tuple[np.ndarray, str]:
    """Attention [queries, keys] of one layer (negative counts from the last) and one head,
    or the mean over heads with head=None; and a title naming them."""
    layers, heads = result.attention.shape[:2]
    if not -layers <= layer < layers:
        raise ConfigError(f"--layer {layer}: the model has {layers} layers (0 to {layers - 1}, "
                          "or negative from the last)")
    layer %= layers
    if head is None:
        return result.attention[layer].mean(axis=0), f"layer {layer}, mean of {heads} heads"
    if not 0 <= head < heads:
        raise ConfigError(f"--head {head}: the model has {heads} attention heads "
                          f"(0 to {heads - 1})")
    return result.attention[layer, head], f"layer {layer}, head {head}"


def token_label(text: str) -> str:
    """A token as an axis label: spaces, newlines and tabs made visible."""
    return text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"


def plot_attention(result: TraceResult, layer: int, head: int | None, out: str | Path) -> Path:
    """Heat map of `pick(result, layer, head)` with the tokens on both axes; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs, title = pick(result, layer, head)
    labels = [token_label(t) for t in result.tokens]
    n = len(labels)
    size = min(4 + 0.22 * n, 40)  # inches: labels stay legible up to ~150 tokens
    fig, ax = plt.subplots(figsize=(size + 1.2, size), dpi=100)
    image = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=max(float(probs.max()), 1e-9))
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention probability")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
