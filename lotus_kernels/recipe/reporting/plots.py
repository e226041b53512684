"""The recipe's matplotlib plots of training histories: ``plot_curves`` (a run's loss and accuracy
per epoch, ``curves.png``) and ``plot_stage_accuracy`` (test accuracy per epoch across the
stages of a pipeline or an ablation). matplotlib is imported inside the functions, with the
Agg backend, so importing this module costs nothing and needs no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_curves(history: Sequence[dict], path, title: str = "") -> Path:
    """Loss (left) and accuracy (right) per epoch, for every *_loss / *_acc series present."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, suffix, label in ((loss_ax, "_loss", "loss"), (acc_ax, "_acc", "accuracy")):
        keys = sorted({k for row in history for k in row if k.endswith(suffix)})
        for key in keys:
            points = [(e, row[key]) for e, row in zip(epochs, history) if row.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key[: -len(suffix)])
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_series(stages: Sequence[tuple[str, Sequence[dict], int]], split: str = "test") -> list[tuple[str, list, bool]]:
    """(label, [(epoch on the shared axis, accuracy %)], on its kept patches) per curve of ``plot_stage_accuracy``."""
    key, tickets_key = f"{split}_acc", f"{split}_tickets_acc"
    series = []
    for name, history, start in stages:
        points = [(start + r["epoch"], 100 * r[key]) for r in history if r.get(key) is not None]
        if not points:
            continue
        series.append((f"{name}, all patches", points, False))
        kept = [(start + r["epoch"], 100 * r[tickets_key]) for r in history if r.get(tickets_key) is not None]
        if kept:
            series.append((f"{name}, on its kept patches", kept, True))
    return series


def plot_stage_accuracy(
    stages: Sequence[tuple[str, Sequence[dict], int]],
    path,
    title: str,
    *,
    split: str = "test",
    xlabel: str = "epochs since the start (a stage continues where the model it starts from ended)",
    markers: Sequence[tuple[float, str]] = (),
) -> Path:
    """Accuracy (%) per epoch of several training stages on one continuous axis, legend outside the axes.

    stages: (name, per-epoch history with ``{split}_acc``, epochs before the
    stage starts): a stage that continues another (tickets fine-tuning the
    dense model) starts where that one ended, so curves overlap only where
    stages are alternatives (tickets vs random patches). A student trained on
    tickets also gets its accuracy on its kept patches (dashed): given all
    patches it would hide what it learnt. markers: (x, label) vertical lines
    for events between stages (pruning).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 4))
    color, marker = None, None
    shapes = iter("osD^vP<>*X" * 4)  # one per stage: alternatives over the same epochs stay tellable apart where they touch
    for label, points, on_tickets in stage_series(stages, split):
        if on_tickets:  # same stage as the line before it: same color and marker, dashed, hollow
            ax.plot(*zip(*points), marker=marker, markersize=5, linestyle="--", color=color, markerfacecolor="none", label=label)
        else:
            marker = next(shapes)
            (line,) = ax.plot(*zip(*points), marker=marker, markersize=4, label=label)
            color = line.get_color()
    for x, label in markers:
        ax.axvline(x, color="gray", linestyle=":", linewidth=1)
        # At the foot of the line, where curves rarely are (accuracy rises from the bottom left).
        ax.annotate(label, (x, 0.02), xycoords=("data", "axes fraction"), rotation=90, va="bottom", ha="right", fontsize=8, color="gray")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
