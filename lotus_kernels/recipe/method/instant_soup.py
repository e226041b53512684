"""Instant Soup Pruning (Jaiswal et al., ICML 2023): cheap ingredient runs vote on the mask.

One round (``config`` is an ``InstantSoupConfig``):
1. optionally, the main model trains on a random ``main_fraction`` of the
   training set (the reference trains it each round; default off);
2. each of ``ingredients`` ingredients copies the main weights and mask,
   trains with the mask held on its own random ``subset_fraction`` of the
   training set (subsets are disjoint when K * fraction <= 1, seeded by
   (seed, round)), then prunes a further ``prune_step`` of its still-kept
   weights by global magnitude (never past the target) and proposes that mask;
3. the masks are merged by vote: a weight is kept if at least
   ``vote_threshold`` ingredients keep it (1 = union, the reference's "sum
   clipped to 1"; K = intersection). Only the mask goes back to the main
   model (zeroed there); ingredient weights are discarded.
Rounds repeat until the merged sparsity is within ``tolerance`` of the
target (the reference stops 5 points short) or ``max_rounds`` ran; then one
global-magnitude prune among the kept weights reaches exactly
``num_pruned(n, target)`` pruned weights, and the main model is fine-tuned on
the whole training set with the mask held (pruned weights stay exactly zero).

Training is injected: ``train_fn(model, subset, masks) -> None`` trains
``model`` in place on the ImageSet ``subset``; the masks are already held on
the model (``masking.hold_masks_``) when it is called, so a plain
forward/backward/step loop keeps them. ``make_train_fn`` builds the default
one: the training engine itself (``engine.train`` in memory on the subset,
its one train step), so ingredients train exactly as every other run does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn as nn

from ..checks import check_fraction, check_int
from ..data import ImageSet
from ..engine.config import Config
from ..engine.devices import AMP_MODES
from ..engine.loop import train
from ..engine.train_config import TrainConfig
from ..engine.train_step import check_compile, module_device
from ..seeding import derive_seed
from lotus_kernels.masks import check_sparsity, global_score_masks, num_pruned
from .essential_sparsity import make_eval_fn
from .masking import (
    FilterFn,
    apply_masks_,
    check_masks,
    count_pruned,
    held_masks,
    layer_sparsity,
    masks_held,
    prunable_layers,
    prunable_weights,
    release_masks_,
)

__all__ = [
    "InstantSoupConfig",
    "RoundRecord",
    "InstantSoupResult",
    "TrainFn",
    "merge_masks",
    "vote_counts",
    "prune_among_kept",
    "ingredient_subsets",
    "make_train_fn",
    "instant_soup_prune",
    "plot_instant_soup",
]

TrainFn = Callable[[nn.Module, ImageSet, "dict[str, torch.Tensor]"], None]


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class InstantSoupConfig(Config):
    """What decides an Instant Soup Pruning run; validated on construction (nothing trains before that).

    target_sparsity: final pruned fraction of the prunable weights, in [0, 1).
    ingredients: K >= 1 ingredient runs per round (reference: 5).
    subset_fraction: each ingredient's share of the training set, in (0, 1] (reference: ~0.1).
    prune_step: fraction of its still-kept weights an ingredient prunes per round, in (0, 1) (reference: 0.1).
    vote_threshold: keep a weight if >= this many ingredients keep it, in [1, K] (1 = union, K = intersection).
    tolerance: stop the rounds once the merged sparsity >= target - tolerance, in [0, 1)
        (reference: 0.05); the final one-shot prune closes the gap exactly.
    max_rounds: at most this many rounds (>= 1); the final one-shot prune runs anyway.
    main_fraction: share of the training set the main model trains on at the start of each
        round, in [0, 1] (0 = the main model does not train during the rounds).
    finetune: fine-tune the main model on the whole training set after the final prune.
    seed: int >= 0 for the data subsets and each training call's torch seed.

    ``from_dict`` (``engine.config.Config``) also takes the old key ``num_ingredients``.
    """

    CONFIG_NAME: ClassVar[str] = "InstantSoupConfig"
    ALIASES: ClassVar[dict[str, str]] = {"num_ingredients": "ingredients"}

    target_sparsity: float = 0.3
    ingredients: int = 5
    subset_fraction: float = 0.1
    prune_step: float = 0.1
    vote_threshold: int = 1
    tolerance: float = 0.05
    max_rounds: int = 50
    main_fraction: float = 0.0
    finetune: bool = True
    seed: int = 0

    def __post_init__(self):
        self.target_sparsity = check_sparsity(self.target_sparsity, "target_sparsity")
        check_int(self.ingredients, "ingredients", 1)
        self.subset_fraction = check_fraction(self.subset_fraction, "subset_fraction", 0, 1, True, False)
        self.prune_step = check_fraction(self.prune_step, "prune_step", 0, 1, True, True)
        if isinstance(self.vote_threshold, bool) or not isinstance(self.vote_threshold, int):
            raise TypeError(
                f"vote_threshold must be an int in [1, ingredients={self.ingredients}], "
                f"got {type(self.vote_threshold).__name__} {self.vote_threshold!r}"
            )
        if not 1 <= self.vote_threshold <= self.ingredients:
            raise ValueError(
                f"vote_threshold must be in [1, ingredients={self.ingredients}] "
                f"(1 = union, {self.ingredients} = intersection), got {self.vote_threshold!r}"
            )
        self.tolerance = check_fraction(self.tolerance, "tolerance", 0, 1, False, True)
        check_int(self.max_rounds, "max_rounds", 1)
        self.main_fraction = check_fraction(self.main_fraction, "main_fraction", 0, 1, False, False)
        if not isinstance(self.finetune, bool):
            raise TypeError(f"finetune must be a bool, got {type(self.finetune).__name__} {self.finetune!r}")
        check_int(self.seed, "seed", 0)


# ---------------------------------------------------------------------------
# mask arithmetic
# ---------------------------------------------------------------------------


def _check_same_layout(masks_list: Sequence[Mapping[str, torch.Tensor]], name: str) -> list[dict[str, torch.Tensor]]:
    if isinstance(masks_list, Mapping) or not isinstance(masks_list, Sequence) or not masks_list:
        raise ValueError(f"{name} must be a non-empty sequence of mask dicts, got {type(masks_list).__name__}")
    checked = [check_masks(m, name=f"{name}[{i}]") for i, m in enumerate(masks_list)]
    first = checked[0]
    for i, m in enumerate(checked[1:], start=1):
        if list(m) != list(first):
            raise ValueError(f"{name}[{i}] names layers {sorted(m)}, but {name}[0] names {sorted(first)}")
        for key, mask in m.items():
            if mask.shape != first[key].shape:
                raise ValueError(f"{name}[{i}][{key!r}] has shape {tuple(mask.shape)}, {name}[0]'s {tuple(first[key].shape)}")
    return checked


def vote_counts(masks_list: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{layer name: int64 tensor [out, in]}: how many of the masks keep each weight."""
    checked = _check_same_layout(masks_list, "masks_list")
    device = next(iter(checked[0].values())).device
    return {
        key: torch.stack([m[key].to(device) for m in checked]).sum(0, dtype=torch.int64) for key in checked[0]
    }


def merge_masks(masks_list: Sequence[Mapping[str, torch.Tensor]], vote_threshold: int = 1) -> dict[str, torch.Tensor]:
    """Keep a weight if at least ``vote_threshold`` of the K masks keep it.

    vote_threshold 1 is the union of the kept weights (a weight is pruned
    only if every mask prunes it), K the intersection. Returns {layer name: bool}.
    """
    k = len(masks_list) if isinstance(masks_list, Sequence) else 0
    if isinstance(vote_threshold, bool) or not isinstance(vote_threshold, int):
        raise TypeError(f"vote_threshold must be an int in [1, {k}], got {type(vote_threshold).__name__} {vote_threshold!r}")
    votes = vote_counts(masks_list)
    if not 1 <= vote_threshold <= k:
        raise ValueError(
            f"vote_threshold must be in [1, {k}] for {k} masks (1 = union, {k} = intersection), got {vote_threshold}"
        )
    return {key: v >= vote_threshold for key, v in votes.items()}


def _prune_to_count(scores: Mapping[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Prune exactly ``count`` lowest scores globally (``global_score_masks`` rounding made exact)."""
    total = sum(s.numel() for s in scores.values())
    if count >= total:
        return {name: torch.zeros_like(s, dtype=torch.bool) for name, s in scores.items()}
    # floor((count / total) * total + 0.5) == count: the float error is far below 0.5.
    return global_score_masks(scores, count / total)


def _kept_scores(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Already-pruned weights score -1, below every |w|: they are the first to go, so the new mask
    # prunes a superset of the old one.
    return {
        name: torch.where(masks[name].to(w.device), w.detach().abs().float(), -1.0) for name, w in weights.items()
    }


def prune_among_kept(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], sparsity: float
) -> dict[str, torch.Tensor]:
    """Prune more, by global |w| among the weights ``masks`` keeps, to exactly ``num_pruned(n, sparsity)`` overall.

    weights, masks: {layer name: [out, in]} with the same names. The result
    prunes every weight ``masks`` prunes, plus the smallest kept |w| until the
    count is reached. sparsity below the masks' own sparsity -> ValueError
    (pruned weights cannot come back).
    """
    masks = check_masks(masks)
    if not isinstance(weights, Mapping) or list(weights) != list(masks):
        raise ValueError(f"weights must map the same layer names as masks, in the same order ({list(masks)})")
    sparsity = check_sparsity(sparsity, "sparsity")
    pruned, total = count_pruned(masks)
    target = num_pruned(total, sparsity)
    if target < pruned:
        raise ValueError(
            f"sparsity={sparsity!r} prunes {target} of {total} weights but the masks already prune {pruned} "
            f"(sparsity {pruned / total:.6f}); pruned weights cannot come back"
        )
    return _prune_to_count(_kept_scores(weights, masks), target)


def _cap_pruned(
    votes: Mapping[str, torch.Tensor],
    threshold: int,
    weights: Mapping[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor],
    max_pruned: int,
) -> dict[str, torch.Tensor]:
    """The vote merge, but pruning at most ``max_pruned`` weights.

    Only a vote_threshold > 1 can prune more than every ingredient did (and
    so overshoot the target). Then weights are kept by decreasing vote count,
    and within the vote level that crosses the budget by decreasing |w| of
    the main model: all with votes >= threshold stay, then the best of the
    rest, until exactly ``max_pruned`` are pruned.
    """
    merged = {k: v >= threshold for k, v in votes.items()}
    pruned, total = count_pruned(merged)
    if pruned <= max_pruned:
        return merged
    budget = pruned - max_pruned  # weights to give back
    for level in range(threshold - 1, -1, -1):
        candidates = {k: (v == level) & previous[k].to(v.device) for k, v in votes.items()}
        n = sum(int(c.sum()) for c in candidates.values())
        if n == 0:
            continue
        if n <= budget:
            merged = {k: merged[k] | candidates[k] for k in merged}
            budget -= n
        else:
            # Keep the `budget` largest |w| among the candidates: prune all but them.
            scores = {k: torch.where(c, weights[k].detach().abs().float().to(c.device), -1.0) for k, c in candidates.items()}
            keep = _prune_to_count(scores, total - budget)
            merged = {k: merged[k] | keep[k] for k in merged}
            budget = 0
        if budget == 0:
            break
    return merged


# ---------------------------------------------------------------------------
# data subsets and seeds
# ---------------------------------------------------------------------------


def ingredient_subsets(n: int, ingredients: int, fraction: float, seed: int = 0, round_index: int = 0) -> list[torch.Tensor]:
    """ingredients sorted int64 index tensors, each of max(1, round(fraction * n)) positions in [0, n).

    One random permutation per (seed, round_index); ingredient k takes a
    window starting at k * n // K. The windows are disjoint whenever
    K * size <= n, and otherwise overlap as little as the sizes allow.
    """
    check_int(n, "n", 1)
    check_int(ingredients, "ingredients", 1)
    fraction = check_fraction(fraction, "fraction", 0, 1, True, False)
    size = min(n, max(1, round(fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("isp-subsets", seed, round_index)))
    subsets = []
    for k in range(ingredients):
        start = k * n // ingredients
        subsets.append(torch.sort(perm[(start + torch.arange(size)) % n]).values)
    return subsets


def _main_subset(n: int, fraction: float, seed: int, round_index: int) -> torch.Tensor:
    size = min(n, max(1, round(fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("isp-main", seed, round_index)))
    return torch.sort(perm[:size]).values


# ---------------------------------------------------------------------------
# the default training function
# ---------------------------------------------------------------------------


def make_train_fn(
    *,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-5,
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.0,
    min_lr: float | None = None,
    label_smoothing: float = 0.0,
    grad_clip: float = 1.0,
    augment: bool = True,
    amp: str = "auto",
    seed: int = 0,
    token_hook: Callable | None = None,
    compile: bool | str = "auto",
    compile_mode: str = "default",
) -> TrainFn:
    """A ``train_fn(model, subset, masks)`` that trains with the training engine: ``engine.train`` in memory.

    Each call is ``train(config, None, model=model, train_data=subset)``: the
    engine's one train step (``engine.train_step.TrainStep``), a fresh AdamW per call
    (as the reference re-creates it per ingredient; weight decay on matrices
    only via ``engine.optim.param_groups``), ``engine.optim.lr_at_step`` warmup + cosine
    down to ``min_lr`` (default lr, i.e. constant), label smoothing, gradient
    clipping, AMP as ``TrainConfig.amp``, crop + flip if ``augment``, on the
    model's device; nothing is evaluated or written. Batches are
    min(batch_size, len(subset)) images, the last partial batch of an epoch
    dropped (the engine's rule: one batch shape). Defaults are the
    reference's ISP settings (AdamW lr 1e-5, wd 0.1, batch 128). compile,
    compile_mode: as ``TrainConfig`` (default "auto": compiled on CUDA, where
    the K ingredients' deep copies reuse one compiled step). Returns the model
    in eval mode.

    The run's seed is ``seed`` mixed with a draw from torch's global
    generator, which ``instant_soup_prune`` seeds per (round, ingredient):
    each ingredient sees its own order, augmentation and drop-path draws,
    reproducibly.

    token_hook(model, x) -> logits, if given, runs each forward instead of
    ``model(x)``: e.g. a ticket student on its tickets
    (``tickets.ticket_hooks``), so the ingredients learn, and then prune, on
    the patches the model will see.
    """
    check_int(epochs, "epochs", 1)
    check_int(batch_size, "batch_size", 1)
    check_int(seed, "seed", 0)
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("grad_clip", grad_clip)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if lr == 0:
        raise ValueError("lr must be > 0, got 0")
    min_lr = float(lr) if min_lr is None else min_lr
    if not (isinstance(min_lr, (int, float)) and 0 <= min_lr <= lr):
        raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr!r}")
    check_fraction(warmup_fraction, "warmup_fraction", 0, 1, False, False)
    check_fraction(label_smoothing, "label_smoothing", 0, 1, False, True)
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if not isinstance(augment, bool):
        raise TypeError(f"augment must be a bool, got {type(augment).__name__} {augment!r}")
    if token_hook is not None and not callable(token_hook):
        raise TypeError(f"token_hook must be callable(model, x) -> logits, got {type(token_hook).__name__}")
    check_compile(compile, compile_mode)
    recipe = {
        "epochs": epochs, "lr": float(lr), "min_lr": float(min_lr), "weight_decay": float(weight_decay),
        "warmup_epochs": warmup_fraction * epochs, "label_smoothing": float(label_smoothing), "grad_clip": float(grad_clip),
        "augment": augment, "amp": amp, "compile": compile, "compile_mode": compile_mode,
        "mixup": 0.0, "cutmix": 0.0, "drop_path": 0.0, "progress": False,
    }

    def train_fn(model: nn.Module, subset: ImageSet, masks: Mapping[str, torch.Tensor]) -> None:
        device = module_device(model)
        run_seed = derive_seed("isp-run", seed, int(torch.randint(0, 2**62, (1,)))) % 2**31
        config = TrainConfig(
            **recipe, model="vit_micro_cifar", batch_size=min(batch_size, len(subset)), seed=run_seed,
            device="cpu" if device.type == "cpu" else f"cuda:{device.index or 0}",
        )
        # model="vit_micro_cifar" only satisfies the config's check: the model passed in is what trains.
        train(config, None, model=model, train_data=subset, token_hook=token_hook)

    return train_fn


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class RoundRecord:
    """One row of the ISP history. round 0 is the starting point (no ingredients).

    sparsity: the main model's pruned fraction after the merge; pruned: that
    count, of num_prunable. ingredient_sparsities: each ingredient's proposal.
    accuracy: the main model's eval accuracy after the merge (None without eval_data).
    """

    round: int
    sparsity: float
    pruned: int
    ingredient_sparsities: list[float]
    accuracy: float | None = None


@dataclasses.dataclass
class InstantSoupResult:
    """What ``instant_soup_prune`` returns.

    masks: {layer name: bool [out, in]}, the final keep-masks (exactly
    num_pruned(num_prunable, target) pruned); the model already holds them
    as zeros. stopped: "target" (within tolerance) or "max_rounds".
    final_sparsity: after the one-shot prune (== the target up to rounding).
    initial_accuracy / oneshot_accuracy / finetuned_accuracy: before round 1
    (with the starting mask) / after the final prune / after fine-tuning
    (None without eval_data, or without fine-tuning).
    ``to_dict`` gives everything but the masks as JSON values.
    """

    config: InstantSoupConfig
    history: list[RoundRecord]
    masks: dict[str, torch.Tensor]
    num_prunable: int
    final_pruned: int
    final_sparsity: float
    stopped: str
    initial_accuracy: float | None = None
    oneshot_accuracy: float | None = None
    finetuned_accuracy: float | None = None

    @property
    def rounds(self) -> int:
        return len(self.history) - 1

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "history": [dataclasses.asdict(r) for r in self.history],
            "rounds": self.rounds,
            "num_prunable": self.num_prunable,
            "final_pruned": self.final_pruned,
            "final_sparsity": self.final_sparsity,
            "stopped": self.stopped,
            "initial_accuracy": self.initial_accuracy,
            "oneshot_accuracy": self.oneshot_accuracy,
            "finetuned_accuracy": self.finetuned_accuracy,
            "layer_sparsity": layer_sparsity(self.masks),
        }

    def save_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _check_callable(fn, name: str, required: bool = False):
    if fn is None and not required:
        return None
    if not callable(fn):
        raise TypeError(f"{name} must be callable(model, subset, masks) -> None, got {type(fn).__name__}")
    return fn


def _sparsity(masks) -> tuple[int, float]:
    pruned, total = count_pruned(masks)
    return pruned, pruned / total


def instant_soup_prune(
    model: nn.Module,
    train_data: ImageSet,
    config: InstantSoupConfig | Mapping | None = None,
    *,
    train_fn: TrainFn | None = None,
    finetune_fn: TrainFn | None = None,
    eval_data=None,
    initial_masks: Mapping[str, torch.Tensor] | None = None,
    filter_fn: FilterFn | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    batch_size: int = 512,
) -> InstantSoupResult:
    """Prune ``model`` in place to exactly ``config.target_sparsity`` by Instant Soup Pruning.

    model: a trained dense model (e.g. a timm ViT); the prunable layers are
        picked by filter_fn (default ``nn.default_filter``). Masks it holds
        (``hold_masks_``) are released first and, without initial_masks,
        are the starting mask.
    train_data: ImageSet the subsets are drawn from (and fine-tuning uses).
    config: InstantSoupConfig, a mapping of its fields, or None (defaults).
    train_fn(model, subset, masks): trains ingredients (and the main model
        when main_fraction > 0), masks already held; default ``make_train_fn()``.
    finetune_fn: the same for the final fine-tuning on train_data; default train_fn.
    eval_data: ImageSet or callable(model) -> accuracy; evaluated at the
        start, after each round, after the final prune and after fine-tuning.
    initial_masks: where to start (e.g. Essential Sparsity's knee masks);
        default: nothing pruned. Its sparsity must not exceed the target.
    on_round(record): called after each round (and for round 0), e.g. to log.

    Everything is validated before the first training call. Afterwards the
    model holds no parametrizations; its pruned weights are exact zeros and
    ``result.masks`` names them. torch's global seed is set before every
    training call (from config.seed, the round and the ingredient).
    """
    # ------------------------------------------------------------- checks
    if config is None:
        config = InstantSoupConfig()
    elif isinstance(config, Mapping):
        config = InstantSoupConfig.from_dict(config)
    elif not isinstance(config, InstantSoupConfig):
        raise TypeError(f"config must be an InstantSoupConfig, a mapping or None, got {type(config).__name__}")
    if not isinstance(train_data, ImageSet):
        raise TypeError(f"train_data must be an ImageSet, got {type(train_data).__name__}")
    if len(train_data) == 0:
        raise ValueError("train_data is empty")
    if train_fn is None:
        train_fn = make_train_fn()
    _check_callable(train_fn, "train_fn", required=True)
    finetune_fn = _check_callable(finetune_fn, "finetune_fn") or train_fn
    _check_callable(on_round, "on_round")
    eval_fn = make_eval_fn(eval_data, batch_size) if eval_data is not None else None
    layers = prunable_layers(model, filter_fn)

    held = held_masks(model)
    if initial_masks is None:
        masks = {
            name: held[name] if name in held else torch.ones_like(m.weight, dtype=torch.bool)
            for name, m in layers.items()
        }
    else:
        initial_masks = check_masks(initial_masks, model, name="initial_masks")
        if set(initial_masks) != set(layers):
            raise ValueError(
                f"initial_masks must cover exactly the prunable layers; missing {sorted(set(layers) - set(initial_masks))}, "
                f"extra {sorted(set(initial_masks) - set(layers))}"
            )
        masks = {name: initial_masks[name].to(m.weight.device).clone() for name, m in layers.items()}
    pruned, total = count_pruned(masks)
    target_pruned = num_pruned(total, config.target_sparsity)
    if pruned > target_pruned:
        raise ValueError(
            f"the starting masks already prune {pruned} of {total} weights (sparsity {pruned / total:.6f}), more than "
            f"target_sparsity={config.target_sparsity!r} allows ({target_pruned}); pruned weights cannot come back"
        )
    stop_pruned = num_pruned(total, max(0.0, config.target_sparsity - config.tolerance))
    # Valid: from here on the model changes. Held masks go (their zeros stay); the start mask is applied.
    release_masks_(model)
    apply_masks_(model, masks)

    def weights() -> dict[str, torch.Tensor]:
        return prunable_weights(model, lambda m, name: name in masks)

    def run_training(fn: TrainFn, net: nn.Module, data: ImageSet, m: dict, *seed_parts) -> None:
        torch.manual_seed(derive_seed("isp-train", config.seed, *seed_parts))
        with masks_held(net, m):
            fn(net, data, m)

    def record(round_index: int, ingredient_sparsities: list[float]) -> RoundRecord:
        n_pruned, sparsity = _sparsity(masks)
        acc = float(eval_fn(model)) if eval_fn is not None else None
        row = RoundRecord(round_index, sparsity, n_pruned, ingredient_sparsities, acc)
        history.append(row)
        if on_round is not None:
            on_round(row)
        return row

    # ------------------------------------------------------------- rounds
    history: list[RoundRecord] = []
    initial_accuracy = record(0, []).accuracy
    n = len(train_data)
    stopped = "target" if pruned >= stop_pruned else "max_rounds"
    round_index = 0
    while pruned < stop_pruned and round_index < config.max_rounds:
        round_index += 1
        if config.main_fraction > 0:
            subset = train_data.subset(_main_subset(n, config.main_fraction, config.seed, round_index).to(train_data.device))
            run_training(train_fn, model, subset, masks, "main", round_index)
        kept = total - pruned
        # At least one more weight per round, never past the target.
        ingredient_pruned = min(target_pruned, pruned + max(1, num_pruned(kept, config.prune_step)))
        proposals = []
        subsets = ingredient_subsets(n, config.ingredients, config.subset_fraction, config.seed, round_index)
        for k, index in enumerate(subsets):
            ingredient = copy.deepcopy(model)
            subset = train_data.subset(index.to(train_data.device))
            run_training(train_fn, ingredient, subset, masks, "ingredient", round_index, k)
            w = prunable_weights(ingredient, lambda m, name: name in masks)
            proposals.append(_prune_to_count(_kept_scores(w, masks), ingredient_pruned))
            del ingredient
        votes = vote_counts(proposals)
        masks = _cap_pruned(votes, config.vote_threshold, weights(), masks, target_pruned)
        apply_masks_(model, masks)
        pruned, _ = count_pruned(masks)
        record(round_index, [_sparsity(p)[1] for p in proposals])
        if pruned >= stop_pruned:
            stopped = "target"

    # ------------------------------------------- exact target, fine-tuning
    masks = _prune_to_count(_kept_scores(weights(), masks), target_pruned)
    apply_masks_(model, masks)
    final_pruned, final_sparsity = _sparsity(masks)
    oneshot_accuracy = float(eval_fn(model)) if eval_fn is not None else None
    finetuned_accuracy = None
    if config.finetune:
        run_training(finetune_fn, model, train_data, masks, "finetune")
        finetuned_accuracy = float(eval_fn(model)) if eval_fn is not None else None
    return InstantSoupResult(
        config=config,
        history=history,
        masks=masks,
        num_prunable=total,
        final_pruned=final_pruned,
        final_sparsity=final_sparsity,
        stopped=stopped,
        initial_accuracy=initial_accuracy,
        oneshot_accuracy=oneshot_accuracy,
        finetuned_accuracy=finetuned_accuracy,
    )


# ---------------------------------------------------------------------------
# the plot
# ---------------------------------------------------------------------------


def plot_instant_soup(
    result: InstantSoupResult, path, title: str = "", split: str | None = None, projected: tuple[str, float] | None = None
) -> Path:
    """Sparsity (left) and accuracy (right, if evaluated) per round, with the final prune and fine-tuning; a PNG.

    split: the data the accuracies were measured on, named on the axis. projected: (label, accuracy) of the
    model after its mask was projected to a pattern (e.g. "after 2:4 projection"): the result, drawn last."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in result.history]
    final_x = (rounds[-1] if rounds else 0) + 1
    fig, (sp_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    sp_ax.plot(rounds, [100 * r.sparsity for r in result.history], marker="o", markersize=3, label="merged mask")
    xs = [r.round for r in result.history for _ in r.ingredient_sparsities]
    ys = [100 * s for r in result.history for s in r.ingredient_sparsities]
    if xs:
        sp_ax.scatter(xs, ys, s=10, alpha=0.5, color="tab:orange", label="ingredients")
    sp_ax.scatter([final_x], [100 * result.final_sparsity], marker="*", s=80, color="tab:red", label="final one-shot")
    sp_ax.axhline(100 * result.config.target_sparsity, color="gray", linestyle="--", linewidth=1, label="target")
    sp_ax.set_ylabel("sparsity of the prunable weights (%)")

    acc_rows = [(r.round, r.accuracy) for r in result.history if r.accuracy is not None]
    if acc_rows:
        acc_ax.plot(*zip(*[(x, 100 * a) for x, a in acc_rows]), marker="o", markersize=3, label="after merge")
    for value, label, marker in (
        (result.oneshot_accuracy, "final one-shot" + (" (before projection)" if projected else ""), "*"),
        (result.finetuned_accuracy, "fine-tuned", "D"),
        (projected[1] if projected else None, projected[0] if projected else "", "P"),
    ):
        if value is not None:
            acc_ax.scatter([final_x], [100 * value], marker=marker, s=50, label=label)
    acc_ax.set_ylabel(f"{split} accuracy (%)" if split else "accuracy (%)")
    for ax in (sp_ax, acc_ax):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    config = result.config
    fig.suptitle(title or f"Instant Soup Pruning ({config.ingredients} ingredients, vote >= {config.vote_threshold})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
