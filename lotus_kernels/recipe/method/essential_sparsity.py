"""Essential Sparsity (Jaiswal et al., NeurIPS 2023): one-shot global magnitude pruning and its knee.

One-shot: a single global |w| threshold over the prunable weights (the
transformer blocks' qkv / proj / fc1 / fc2 matrices; embeddings, norms,
biases and the head are never pruned) removes exactly
``floor(s * n + 0.5)`` of their ``n`` entries (``masks.global_magnitude_masks``).

Sweep: prune the trained model one-shot at each sparsity, evaluate, no
fine-tuning, and put the weights back. The *essential sparsity* (the knee)
is the largest swept sparsity whose accuracy is at most ``max_drop`` below
the dense model's; LOTUS prunes there, then continues with Instant Soup
Pruning.

Accuracies are fractions in [0, 1] (``engine.evaluate``'s
"acc"), so ``max_drop=0.01`` is one percentage point.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..data import ImageSet
from ..engine.evaluation import evaluate
from lotus_kernels.masks import check_sparsity, global_magnitude_masks
from .masking import FilterFn, weight_parameter, apply_masks_, prunable_layers, prunable_weights

__all__ = [
    "DEFAULT_MAX_DROP",
    "DEFAULT_SPARSITIES",
    "check_max_drop",
    "EssentialSparsityResult",
    "one_shot_masks",
    "prune_one_shot_",
    "find_knee",
    "make_eval_fn",
    "essential_sparsity_sweep",
    "plot_essential_sparsity",
]

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# The knee criterion: one point of accuracy (the paper's "essential" threshold).
DEFAULT_MAX_DROP = 0.01
# Accuracies are ratios of counts: 0.80 - 0.79 is 0.010000000000000009 in
# floating point, and a drop of exactly max_drop must still qualify.
_DROP_EPS = 1e-9

EvalFn = Callable[[nn.Module], float]


# ---------------------------------------------------------------------------
# one-shot pruning
# ---------------------------------------------------------------------------


def one_shot_masks(model: nn.Module, sparsity: float, filter_fn: FilterFn | None = None) -> dict[str, torch.Tensor]:
    """Global magnitude keep-masks {layer name: bool [out, in]} of the prunable weights at ``sparsity``.

    Exactly ``floor(sparsity * n + 0.5)`` of the n prunable weights are
    pruned in all (ties: lowest position first, see ``lotus_kernels.masks``).
    """
    sparsity = check_sparsity(sparsity, "sparsity")
    return global_magnitude_masks(prunable_weights(model, filter_fn), sparsity)


def prune_one_shot_(model: nn.Module, sparsity: float, filter_fn: FilterFn | None = None) -> dict[str, torch.Tensor]:
    """``one_shot_masks`` applied to ``model`` in place (pruned weights zeroed); returns the masks."""
    masks = one_shot_masks(model, sparsity, filter_fn)
    apply_masks_(model, masks)
    return masks


# ---------------------------------------------------------------------------
# the knee
# ---------------------------------------------------------------------------


def check_max_drop(max_drop, name: str = "max_drop") -> float:
    """``max_drop`` as a float in [0, 1] (an accuracy fraction, 0.01 = 1 point); else TypeError / ValueError naming ``name``."""
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)):
        raise TypeError(f"{name} must be a float (accuracy fraction, 0.01 = 1 point), got {type(max_drop).__name__}")
    if not (math.isfinite(max_drop) and 0.0 <= max_drop <= 1.0):
        raise ValueError(f"{name} must be in [0, 1] (accuracy fraction, 0.01 = 1 point), got {max_drop!r}")
    return float(max_drop)


def find_knee(
    sparsities: Sequence[float], accuracies: Sequence[float], dense_accuracy: float, max_drop: float = DEFAULT_MAX_DROP
) -> float:
    """The largest sparsity whose accuracy is >= dense_accuracy - max_drop; 0.0 if none is.

    sparsities, accuracies: equal-length sequences (any order). NaN
    accuracies never qualify. Dense (sparsity 0) always qualifies, hence the
    0.0 floor.
    """
    max_drop = check_max_drop(max_drop)
    if len(sparsities) != len(accuracies):
        raise ValueError(f"sparsities and accuracies must have the same length, got {len(sparsities)} and {len(accuracies)}")
    knee = 0.0
    for s, acc in zip(sparsities, accuracies):
        if dense_accuracy - acc <= max_drop + _DROP_EPS:  # False for NaN
            knee = max(knee, float(s))
    return knee


# ---------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class EssentialSparsityResult:
    """One-shot sweep: ``accuracies[i]`` is the accuracy at ``sparsities[i]``, no fine-tuning.

    All fields are JSON scalars or lists of them (``to_dict`` / ``from_dict``).
    pruned_counts[i]: prunable weights removed at sparsities[i], out of num_prunable.
    """

    sparsities: list[float]
    accuracies: list[float]
    dense_accuracy: float
    knee: float
    max_drop: float
    num_prunable: int
    pruned_counts: list[int]

    @property
    def drops(self) -> list[float]:
        """Accuracy lost vs dense at each sparsity (positive = worse)."""
        return [self.dense_accuracy - a for a in self.accuracies]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "EssentialSparsityResult":
        return cls(**d)

    def save_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def make_eval_fn(eval_data, batch_size: int = 512) -> EvalFn:
    """eval_data -> callable(model) -> accuracy in [0, 1].

    eval_data: an ImageSet (scored with ``engine.evaluation.evaluate``,
    top-1, all patches), or already a callable(model) -> float (e.g. one that
    passes a token_hook, or a cheap stand-in in tests).
    """
    if isinstance(eval_data, ImageSet):
        if len(eval_data) == 0:
            raise ValueError("eval_data is an empty ImageSet")
        return lambda model: float(evaluate(model, eval_data, batch_size=batch_size)["acc"])
    if callable(eval_data):
        return eval_data
    raise TypeError(f"eval_data must be an ImageSet or a callable(model) -> accuracy, got {type(eval_data).__name__}")


def essential_sparsity_sweep(
    model: nn.Module,
    eval_data,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    max_drop: float = DEFAULT_MAX_DROP,
    filter_fn: FilterFn | None = None,
    batch_size: int = 512,
) -> EssentialSparsityResult:
    """Evaluate ``model`` one-shot pruned at each sparsity (no fine-tuning) and find the knee.

    model: a trained model, e.g. a timm ViT; left exactly as it was (the
        prunable weights are pruned in place for each evaluation and copied
        back bit for bit, also on error; no second copy of the model is made).
    eval_data: ImageSet or callable(model) -> accuracy (see ``make_eval_fn``).
    sparsities: each in [0, 1); evaluated in the given order. Every mask is
        computed from the *original* weights (one-shot, not iterative).
    max_drop: the knee criterion, as an accuracy fraction (0.01 = 1 point).
    """
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence) or not sparsities:
        raise ValueError(f"sparsities must be a non-empty sequence of floats in [0, 1), got {sparsities!r}")
    sparsities = [check_sparsity(s, f"sparsities[{i}]") for i, s in enumerate(sparsities)]
    max_drop = check_max_drop(max_drop)
    eval_fn = make_eval_fn(eval_data, batch_size)
    layers = prunable_layers(model, filter_fn)

    params = {name: weight_parameter(m) for name, m in layers.items()}
    saved = {name: p.detach().clone() for name, p in params.items()}
    # Magnitudes of the weights the forward uses: under held masks (a parametrization) that is the
    # masked view, not the stored parameter; otherwise the saved copy serves as both.
    weights = {
        name: saved[name] if m.weight is params[name] else m.weight.detach().clone() for name, m in layers.items()
    }
    num_prunable = sum(w.numel() for w in weights.values())
    accuracies, pruned_counts = [], []
    try:
        dense_accuracy = float(eval_fn(model))
        for s in sparsities:
            masks = global_magnitude_masks(weights, s)
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name]).masked_fill_(~masks[name], 0)
            accuracies.append(float(eval_fn(model)))
            pruned_counts.append(num_prunable - sum(int(m.sum()) for m in masks.values()))
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
    return EssentialSparsityResult(
        sparsities=sparsities,
        accuracies=accuracies,
        dense_accuracy=dense_accuracy,
        knee=find_knee(sparsities, accuracies, dense_accuracy, max_drop),
        max_drop=max_drop,
        num_prunable=num_prunable,
        pruned_counts=pruned_counts,
    )


# ---------------------------------------------------------------------------
# the plot
# ---------------------------------------------------------------------------


def plot_essential_sparsity(result: EssentialSparsityResult, path, title: str = "", split: str | None = None) -> Path:
    """Accuracy (%) vs sparsity (%) with the dense level, the max_drop band and the knee; a PNG at ``path``.

    split: the data the accuracies were measured on ("val", "test"), named on the axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    points = sorted(zip(result.sparsities, result.accuracies))
    xs = [0.0] + [100 * s for s, _ in points]
    ys = [100 * result.dense_accuracy] + [100 * a for _, a in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker="o", markersize=3, label="one-shot, no fine-tuning")
    ax.axhline(100 * result.dense_accuracy, color="gray", linewidth=1, label="dense")
    ax.axhline(
        100 * (result.dense_accuracy - result.max_drop),
        color="gray",
        linestyle="--",
        linewidth=1,
        label=f"dense - {100 * result.max_drop:g} pt",
    )
    ax.axvline(100 * result.knee, color="tab:red", linestyle=":", label=f"knee {100 * result.knee:g}%")
    ax.set_xlabel("sparsity of the prunable weights (%)")
    ax.set_ylabel(f"{split} accuracy (%)" if split else "accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Essential sparsity (one-shot global magnitude)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
