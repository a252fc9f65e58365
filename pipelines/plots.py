"""Plots a person would rather look at than read: training curves and accuracy bars."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_history(csv_log: str | Path) -> dict[str, list[float]]:
    """Columns of a Keras CSVLogger file as float lists (the real history, nothing typed in)."""
    with open(csv_log, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {key: [float(r[key]) for r in rows] for key in rows[0]}


HISTORY_PANELS = (("loss", "loss (all terms)"), ("caption_loss", "caption loss (token cross-entropy)"),
                  ("token_accuracy", "token accuracy"))


def plot_history(csv_log: str | Path, out_png: str | Path, title: str) -> Path:
    """Loss, caption loss (if logged) and masked token accuracy per epoch, train and validation, side by side."""
    history = read_history(csv_log)
    panels = [(metric, label) for metric, label in HISTORY_PANELS if metric in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    epochs = [int(e) + 1 for e in history.get("epoch", [])]
    for ax, (metric, label) in zip(axes[0], panels):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            if prefix + metric in history:
                ax.plot(epochs, history[prefix + metric], style, label=("validation " if prefix else "train ") + label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def plot_field_accuracy(results: dict[str, dict], out_png: str | Path, title: str) -> Path:
    """Grouped bars: per-field accuracy (modality, region, ...) for each model."""
    models = list(results)
    fields = [f for f in next(iter(results.values())) if results[models[0]][f]["accuracy"] is not None]
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(fields) * len(models)), 3.8))
    for i, model in enumerate(models):
        values = [100 * (results[model][f]["accuracy"] or 0.0) for f in fields]
        bars = ax.bar([x + i * width for x in range(len(fields))], values, width, label=model)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(fields))], fields)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 108)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
