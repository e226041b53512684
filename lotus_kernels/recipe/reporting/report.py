"""Run reports: ``report.md`` and ``curves.png`` (loss and accuracy per epoch) in a run's folder.

A run folder holds ``config.json`` and ``metrics.jsonl`` (one JSON object per
epoch, written by ``engine.loop.train``); ``write_report`` reads them and
writes the report next to them, so a report can be rebuilt at any time, for
a finished, a killed or a resumed run alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .plots import plot_curves

REPORT_NAME = "report.md"
PLOT_NAME = "curves.png"


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
