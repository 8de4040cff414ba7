"""The loss curve of a run: RUN_DIR/loss.png from RUN_DIR/metrics.jsonl (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from flaxlm.model.errors import ConfigError
from flaxlm.train.metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Training loss (and held-out loss where evaluated) against step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ConfigError(f"{run_dir}: no metrics.jsonl with records to plot")
    out = Path(out) if out is not None else run_dir / "loss.png"
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    held_out = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out loss", linewidth=1.2, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
