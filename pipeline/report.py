"""What a run leaves for a person to look at: the training curves.

Kept apart from the spine so that `train.py` only calls it; matplotlib is imported on
the first plot, not with the pipeline.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.atomic import atomic_path


def plot_curves(history_csv: Path, out_png: Path) -> None:
    """Loss and accuracy per epoch, train against validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with history_csv.open() as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [float(r[metric]) for r in rows], "o-", label="train")
        ax.plot(epochs, [float(r[f"val_{metric}"]) for r in rows], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:  # savefig picks the format by extension
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
