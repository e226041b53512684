"""Run reports: ``report.md`` and ``curves.png`` (loss and accuracy per epoch) in a run's folder.

A run folder holds ``config.json`` and ``metrics.jsonl`` (one JSON object per
epoch, written by ``lotus_kernels.train``); ``write_report`` reads them and
writes the report next to them, so a report can be rebuilt at any time, for
a finished, a killed or a resumed run alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

REPORT_NAME = "report.md"
PLOT_NAME = "curves.png"
TIMING_KEYS = ("epoch_time_s", "images_per_s")


def read_metrics(run_dir) -> list[dict]:
    """The epochs of ``run_dir/metrics.jsonl``, in order; a resumed run's repeated epochs keep their last line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{path} does not exist: not a run folder, or no epoch has finished")
    by_epoch: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number} is not JSON ({e.msg})") from None
        by_epoch[int(row.get("epoch", number))] = row
    return [by_epoch[k] for k in sorted(by_epoch)]


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


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _is_accuracy(key: str) -> bool:
    return key.endswith("_acc")


def metrics_table(history: Sequence[dict], keys: Sequence[str] | None = None) -> str:
    """A markdown table of the per-epoch metrics (all keys by default, in first-seen order); accuracies
    (``*_acc``, stored as fractions) are shown as percentages, like every accuracy in a report."""
    if keys is None:
        keys = list(dict.fromkeys(k for row in history for k in row))

    def cell(key, value):
        return f"{100 * value:.2f}" if _is_accuracy(key) and isinstance(value, (int, float)) else _cell(value)

    lines = ["| " + " | ".join(f"{k} (%)" if _is_accuracy(k) else k for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(k, row.get(k)) for k in keys) + " |" for row in history]
    return "\n".join(lines)


def write_report(run_dir, title: str | None = None, sections: Sequence[tuple[str, str]] = ()) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/curves.png`` from its config.json and metrics.jsonl.

    sections: extra (heading, markdown body) pairs appended after the metrics
    (later commands add e.g. sparsity tables). Returns the report's path.
    """
    run_dir = Path(run_dir)
    history = read_metrics(run_dir)
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    title = title or f"{config.get('model', 'model')} on {config.get('dataset', 'data')}"
    if config.get("dataset") == "synthetic":
        title += " (synthetic data)"  # never let a synthetic result pass for CIFAR-10
    plot_curves(history, run_dir / PLOT_NAME, title)
    last = history[-1]
    summary = ", ".join(
        f"{k} {100 * last[k]:.2f}%" if _is_accuracy(k) else f"{k} {_cell(last[k])}"
        for k in ("test_acc", "val_acc", "test_loss", "train_loss") if last.get(k) is not None
    )
    parts = [
        f"# {title}",
        f"{len(history)} epochs; last epoch: {summary}.",
        f"![loss and accuracy per epoch]({PLOT_NAME})",
        "## Metrics per epoch",
        metrics_table(history),
        "## Configuration",
        "```json\n" + json.dumps(config, indent=2) + "\n```",
    ]
    for heading, body in sections:
        parts += [f"## {heading}", body]
    path = run_dir / REPORT_NAME
    path.write_text("\n\n".join(parts) + "\n")
    return path
