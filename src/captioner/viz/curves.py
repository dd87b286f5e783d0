"""Training curves: loss (or SCST reward) and dev BLEU-4 / CIDEr-D per epoch, in one PNG."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from captioner.io import atomic_path


def plot_training_curves(history: list[dict], out_path: str | Path) -> Path:
    epochs = [int(r["epoch"]) for r in history]
    fig = Figure(figsize=(11, 3.4), dpi=100)
    first = (
        ("train_reward", "mean sampled CIDEr-D (SCST)")
        if "train_reward" in history[0]
        else ("train_loss", "training cross-entropy")
    )
    panels = [
        first,
        ("val_BLEU-4", "dev BLEU-4 (greedy)"),
        ("val_CIDEr-D", "dev CIDEr-D (greedy)"),
    ]
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.plot(epochs, [float(r[key]) for r in history], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_path)
