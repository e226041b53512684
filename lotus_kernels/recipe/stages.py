"""One pipeline stage as a standalone step on checkpoints: prune a trained model, fine-tune a pruned one.

    prune_checkpoint("runs/dense/checkpoints/last.pt", "runs/pruned", method="instant-soup", sparsity=0.5)
    finetune_checkpoint("runs/pruned/pruned.pt", "runs/finetuned", epochs=5, keep_ratio=0.5,
                        selector_checkpoint="runs/dense/checkpoints/last.pt")

``lotus prune`` and ``lotus finetune`` call these; ``run_pipeline`` runs the
same stages back to back. Both read and write the engine's own checkpoint
format (``lotus_kernels.train``), so their outputs go straight into
``lotus eval``, ``lotus export``, ``lotus tickets`` and each other.

Pruning (``prune_checkpoint``), on the dense model of a checkpoint:
- "one-shot": global magnitude pruning of the prunable weights (the blocks'
  qkv / proj / fc1 / fc2) to exactly ``num_pruned(n, sparsity)`` of their n
  entries;
- "essential": the Essential Sparsity sweep (one-shot at each point, no
  fine-tuning) and a one-shot prune at its knee. ``sparsity`` is the sweep's
  upper bound: the points are the ``es_sparsities`` below it plus
  ``sparsity`` itself, so the knee never exceeds it;
- "instant-soup": Instant Soup Pruning to exactly ``sparsity``, as the
  pipeline runs it: starting from the knee of the same capped sweep when
  0 < knee < sparsity (``isp_start="knee"``), else from the dense model
  (``isp_start="dense"`` always does), without ISP's own fine-tuning (that is
  ``finetune_checkpoint``'s job).
Then the pruned weights are zeroed, the mask is projected to ``pattern`` and
the layers become compact SparseLinear layers. Zeroing first means a 2:4
group with fewer than two survivors is filled with zeros, never with the old
values of pruned weights. Accuracies (dense and pruned) are measured on the
validation split when the run has one (``holdout`` > 0), else on test, and
always on test too.

Fine-tuning (``finetune_checkpoint``) trains the SparseLinear model with the
engine: pruned weights are not parameters (a SparseLinear stores only the
kept values; its mask lives in buffers), so the mask stays fixed by
construction. With ``keep_ratio`` it trains on data lottery tickets exactly
as the pipeline does (``pipeline._train_on_tickets``): mode "online" or
"fixed" (tickets of ``selector_checkpoint``'s dense model) or "random".
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from . import train as engine
from .info import environment
from .masks import PATTERNS, block_shape, check_sparsity
from .nn import SparseLinear, check_layout, sparsity_summary
from .pruning import (
    DEFAULT_SPARSITIES,
    InstantSoupConfig,
    apply_masks_,
    essential_sparsity_sweep,
    instant_soup_prune,
    make_train_fn,
    one_shot_masks,
    plot_essential_sparsity,
    plot_instant_soup,
    prunable_weights,
    sparsify_masked_,
)
from .tickets import MODES

__all__ = ["METHODS", "ISP_STARTS", "prune_checkpoint", "finetune_checkpoint", "sparse_masks"]

METHODS = ("instant-soup", "one-shot", "essential")
ISP_STARTS = ("knee", "dense")
PRUNED_NAME = "pruned.pt"


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def _check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_overrides(overrides) -> dict:
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict of TrainConfig fields, got {type(overrides).__name__}")
    return dict(overrides)


def _check_out_dir(out_dir) -> Path:
    if not isinstance(out_dir, (str, Path)):
        raise TypeError(f"out_dir must be a str or Path, got {type(out_dir).__name__}")
    return Path(out_dir)


def sparse_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: bool keep-mask [out, in]} of every SparseLinear in ``model`` (what it really stores)."""
    return {name: m.mask() for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def _counts(model: nn.Module) -> dict:
    """Exact pruned / total counts over the SparseLinear layers (zeros when the model has none)."""
    masks = sparse_masks(model)
    total = sum(m.numel() for m in masks.values())
    pruned = total - sum(int(m.sum()) for m in masks.values())
    return {"pruned": pruned, "prunable": total, "sparsity": pruned / total if total else 0.0, "sparse_layers": len(masks)}


def _eval_split(eval_sets: dict) -> str:
    """The split decisions are measured on: the holdout when the run has one, else test."""
    return "val" if "val" in eval_sets else "test"


def _accuracies(model: nn.Module, eval_sets: dict, amp: str, token_hook=None) -> dict:
    """{split: top-1 accuracy} on the validation split (if any) and test."""
    return {
        name: engine.evaluate(model, eval_sets[name], amp=amp, token_hook=token_hook)["acc"]
        for name in ("val", "test") if name in eval_sets
    }


def _write_checkpoint(path: Path, model: nn.Module, config: engine.TrainConfig, num_classes: int, extra: dict, best: dict) -> Path:
    """``model`` (moved to the CPU) as a checkpoint in ``train``'s format, so that
    ``load_checkpoint`` / ``model_from_checkpoint`` / ``lotus eval`` / ``lotus export`` read it.

    No optimizer, scheduler, scaler or RNG state: a pruned model starts a new
    run (``finetune_checkpoint``), it does not resume one. extra holds JSON
    values only (the file loads with weights_only=True).
    """
    import timm

    model = model.to("cpu").eval()
    state = {
        "format": engine.CHECKPOINT_FORMAT,
        "format_version": engine.CHECKPOINT_VERSION,
        "model": model.state_dict(),  # SparseLinear layers in compact form, with their layouts
        "model_source": "argument",
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "num_classes": num_classes,
        "optimizer": None,
        "scheduler": None,
        "scaler": None,
        "epoch": 0,
        "step": 0,
        "rng": None,
        "config": config.to_dict(),
        "extra": extra,
        "history": [],
        "best": best,
        "world_size": 1,
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
    }
    engine._save_checkpoint(path, state)
    return path


def _sweep_points(es_sparsities, upper: float) -> list[float]:
    """The es_sparsities below ``upper``, and ``upper`` itself, ascending."""
    return sorted({s for s in es_sparsities if s < upper} | {upper})


# ---------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------


def prune_checkpoint(
    checkpoint,
    out_dir,
    *,
    method: str = "instant-soup",
    sparsity: float = 0.5,
    pattern: str = "unstructured",
    block_size: int = 32,
    es_sparsities=DEFAULT_SPARSITIES,
    max_drop: float = 0.01,
    ingredients: int = 5,
    subset_fraction: float = 0.1,
    prune_step: float = 0.1,
    vote_threshold: int = 1,
    ingredient_epochs: int = 1,
    isp_lr: float = 1e-4,
    isp_start: str = "knee",
    overrides: dict | None = None,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Prune the dense model of ``checkpoint`` and write it into ``out_dir`` as SparseLinear layers.

    checkpoint: a ``train`` checkpoint of a dense model (a model that already
        holds SparseLinear layers is refused). Its data come from its config
        with ``overrides`` (TrainConfig fields, e.g. {"data_path": ...}) on top.
    method: "one-shot" | "essential" | "instant-soup" (see the module docstring;
        for "essential" ``sparsity`` is the sweep's upper bound).
    sparsity: in [0, 1); pattern "2:4" needs exactly 0.5.
    pattern: "unstructured" | "2:4" | "block" (square blocks of ``block_size``).
    es_sparsities, max_drop: the Essential Sparsity sweep's grid and knee
        criterion (accuracy fraction, 0.01 = 1 point); used by "essential",
        and by "instant-soup" with isp_start="knee".
    ingredients, subset_fraction, prune_step, vote_threshold, ingredient_epochs,
        isp_lr: Instant Soup Pruning (``InstantSoupConfig`` / ``make_train_fn``).
    overwrite: replace an existing ``out_dir/pruned.pt``.

    Writes ``out_dir/pruned.pt`` (engine checkpoint format; epoch 0, empty
    history, extra {"pruning": ...}), ``out_dir/prune.json`` (the returned
    dict) and ``essential_sparsity.png`` / ``instant_soup.png`` where a sweep /
    ISP ran. Every argument is checked before anything is loaded or trained.
    """
    arguments = {
        "checkpoint": str(checkpoint), "out_dir": str(out_dir), "method": method, "sparsity": sparsity, "pattern": pattern,
        "block_size": block_size, "es_sparsities": list(es_sparsities) if isinstance(es_sparsities, (list, tuple)) else es_sparsities,
        "max_drop": max_drop, "ingredients": ingredients, "subset_fraction": subset_fraction, "prune_step": prune_step,
        "vote_threshold": vote_threshold, "ingredient_epochs": ingredient_epochs, "isp_lr": isp_lr, "isp_start": isp_start,
        "overrides": overrides,
    }
    # ------------------------------------------------------------ checks
    _check_choice(method, "method", METHODS)
    sparsity = check_sparsity(sparsity, "sparsity")
    _check_choice(pattern, "pattern", PATTERNS)
    blocks = block_shape(block_size) if pattern == "block" else (1, 1)  # (1, 1): unused by the other patterns
    if pattern == "2:4" and sparsity != 0.5:
        raise ValueError(f"pattern '2:4' prunes exactly half the weights: use sparsity=0.5, got {sparsity}")
    if isinstance(es_sparsities, (str, bytes)) or not isinstance(es_sparsities, (list, tuple)) or not es_sparsities:
        raise ValueError(f"es_sparsities must be a non-empty list of sparsities in [0, 1), got {es_sparsities!r}")
    es_sparsities = [check_sparsity(s, "es_sparsities") for s in es_sparsities]
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop <= 1:
        raise ValueError(f"max_drop must be an accuracy fraction in [0, 1] (0.01 = 1 point), got {max_drop!r}")
    _check_choice(isp_start, "isp_start", ISP_STARTS)
    isp_config = InstantSoupConfig(
        target_sparsity=sparsity, num_ingredients=ingredients, subset_fraction=subset_fraction, prune_step=prune_step,
        vote_threshold=vote_threshold, finetune=False,
    )
    overrides = _check_overrides(overrides)
    out = _check_out_dir(out_dir)
    if (out / PRUNED_NAME).exists() and not overwrite:
        raise ValueError(f"{out / PRUNED_NAME} already exists; pass overwrite=True (--overwrite) or another out_dir")
    ckpt = engine.load_checkpoint(checkpoint)
    config = engine.TrainConfig.from_dict({**ckpt["config"], **overrides})
    isp_config = dataclasses.replace(isp_config, seed=config.seed)
    isp_train = make_train_fn(
        epochs=ingredient_epochs, batch_size=min(config.batch_size, 128), lr=isp_lr, amp=config.amp, seed=config.seed,
        compile=config.compile, compile_mode=config.compile_mode,
    )
    model = engine.model_from_checkpoint(checkpoint)
    already = [name for name, m in model.named_modules() if isinstance(m, SparseLinear)]
    if already:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} already holds {len(already)} SparseLinear layers ({already[0]}, ...); "
            "prune the dense checkpoint it came from"
        )
    for name, w in prunable_weights(model).items():
        try:
            check_layout(pattern, w.shape[1], w.shape[0], blocks)
        except ValueError as e:
            raise ValueError(f"layer {name!r} cannot take pattern {pattern!r}: {e}") from None

    # ------------------------------------------------------------- work
    start = time.perf_counter()
    device = engine._resolve_device(config.device, None)
    train_set, eval_sets = engine.build_data(config)
    eval_sets = {k: v.to(device) for k, v in eval_sets.items()}
    split = _eval_split(eval_sets)
    num_classes = len(train_set.classes)
    model.to(device)

    def eval_fn(m):
        return engine.evaluate(m, eval_sets[split], amp=config.amp)["acc"]

    log(f"pruning {checkpoint} ({config.model}, {config.dataset}): {method} to {sparsity:.0%}, pattern {pattern}; measured on {split}")
    if split == "test":
        log("  WARNING: the checkpoint's run has no validation split (holdout=0): the knee and Instant Soup's rounds are chosen "
            "on the TEST split, so its test accuracy is optimistic; train with --set holdout=N for an honest one")
    result: dict = {"method": method, "pattern": pattern, "eval_split": split, "accuracy": {"dense": _accuracies(model, eval_sets, config.amp)}}
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    es = None
    if method == "essential" or (method == "instant-soup" and isp_start == "knee"):
        es = essential_sparsity_sweep(model, eval_fn, _sweep_points(es_sparsities, sparsity), max_drop=max_drop)
        plot = plot_essential_sparsity(es, out / "essential_sparsity.png", f"Essential Sparsity ({config.model}, {config.dataset})", split=split)
        plots.append(plot.name)
        result["essential_sparsity"] = {
            "knee": es.knee, "dense_accuracy": es.dense_accuracy, "max_drop": es.max_drop, "upper_bound": sparsity,
            "curve": [[s, a] for s, a in zip(es.sparsities, es.accuracies)], "pruned_counts": es.pruned_counts,
            "num_prunable": es.num_prunable,
        }
        log(f"  Essential Sparsity: knee {es.knee:.2f} (dense {es.dense_accuracy:.4f}, max drop {max_drop})")
    if method == "one-shot":
        masks = one_shot_masks(model, sparsity)
        mask_sparsity = sparsity
    elif method == "essential":
        masks = one_shot_masks(model, es.knee)
        mask_sparsity = es.knee
    else:
        initial = one_shot_masks(model, es.knee) if es is not None and 0 < es.knee < sparsity else None
        isp = instant_soup_prune(
            model, train_set, isp_config, train_fn=isp_train, eval_data=eval_fn, initial_masks=initial,
            on_round=lambda r: log(f"  ISP round {r.round}: sparsity {r.sparsity:.3f}, {split} acc {r.accuracy:.4f}"),
        )
        result["instant_soup"] = {"start": "knee" if initial is not None else "dense", **isp.to_dict()}
        masks = isp.masks
        mask_sparsity = sparsity
    apply_masks_(model, masks)  # zero first: a pattern projection never revives a pruned weight's old value
    if pattern != "unstructured":
        result["accuracy"]["before_projection"] = {split: eval_fn(model)}
    sparsify_masked_(model, masks, pattern=pattern, block_size=block_size)
    counts = _counts(model)
    result["accuracy"]["pruned"] = _accuracies(model, eval_sets, config.amp)
    if method == "instant-soup":
        # Drawn after the projection: the plot's last point is the pruned model's accuracy, not the mask's before it.
        projected = (f"after {pattern} projection", result["accuracy"]["pruned"][split]) if pattern != "unstructured" else None
        plot = plot_instant_soup(
            isp, out / "instant_soup.png", f"Instant Soup Pruning to {sparsity:.0%} ({config.model}, {config.dataset})", split=split, projected=projected,
        )
        plots.append(plot.name)
    summary = sparsity_summary(model)
    result.update(
        mask_sparsity=mask_sparsity, **counts, dense_bytes=summary.dense_bytes, compact_bytes=summary.compact_bytes,
        checkpoint=PRUNED_NAME, plots=plots, arguments=arguments, environment=environment(device),
        elapsed_s=time.perf_counter() - start,
    )
    extra = {"pruning": {k: result[k] for k in ("method", "pattern", "mask_sparsity", "sparsity", "pruned", "prunable", "eval_split", "accuracy")}}
    extra["pruning"]["source"] = str(checkpoint)
    if es is not None:
        extra["pruning"]["knee"] = es.knee
    _write_checkpoint(
        out / PRUNED_NAME, model, config, num_classes, extra,
        {"metric": f"{split}_acc", "value": result["accuracy"]["pruned"][split], "epoch": 0},
    )
    (out / "prune.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    acc = result["accuracy"]
    log(
        f"  pruned {counts['pruned']} of {counts['prunable']} weights ({counts['sparsity']:.2%}, {pattern}): "
        f"{split} acc {acc['dense'][split]:.4f} -> {acc['pruned'][split]:.4f}; {out / PRUNED_NAME}"
    )
    return result


# ---------------------------------------------------------------------------
# fine-tune
# ---------------------------------------------------------------------------


def finetune_checkpoint(
    checkpoint,
    out_dir,
    *,
    epochs: int = 5,
    lr: float | None = None,
    keep_ratio: float | None = None,
    selector_checkpoint=None,
    mode: str = "online",
    layer: int | str = -1,
    overrides: dict | None = None,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Fine-tune the (pruned) model of ``checkpoint`` with its mask fixed; a ``train`` run folder in ``out_dir``.

    checkpoint: a ``train`` checkpoint, typically ``prune_checkpoint``'s
        pruned.pt (SparseLinear layers: pruned weights are not parameters, so
        they stay exactly zero); a dense one is simply fine-tuned.
    epochs, lr: the run's length and peak learning rate (default: the
        checkpoint's lr * 0.5, as the pipeline's fine-tuning stages); no
        warmup, cosine to min(min_lr, lr). The rest of the recipe and the data
        come from the checkpoint's config; ``overrides`` (TrainConfig fields)
        win over all of it.
    keep_ratio: None trains on all patches. In (0, 1]: on data lottery
        tickets, as the pipeline does: mode "online" (the frozen dense model
        of ``selector_checkpoint`` picks each batch's top-CLS-attention
        patches, from block ``layer`` or "rollout") or "random" (the control;
        no selector). Each epoch is evaluated with all patches (test_acc) and
        on tickets (test_tickets_acc).
    overwrite: start afresh in an out_dir that already holds a run.

    Writes the run folder (config.json, metrics.jsonl, checkpoints/last.pt,
    best.pt, report.md, curves.png) and finetune.json (the returned dict).
    Every argument is checked, and the selector built, before training.
    """
    from .pipeline import _train_on_tickets
    from .report import write_report
    from .tickets import TicketSelector, prepare_student_, ticket_hooks

    arguments = {
        "checkpoint": str(checkpoint), "out_dir": str(out_dir), "epochs": epochs, "lr": lr, "keep_ratio": keep_ratio,
        "selector_checkpoint": None if selector_checkpoint is None else str(selector_checkpoint), "mode": mode,
        "layer": layer, "overrides": overrides,
    }
    # ------------------------------------------------------------ checks
    if lr is not None:
        _check_positive(lr, "lr")
    _check_choice(mode, "mode", MODES)
    if keep_ratio is None and mode != "online":
        # Without keep_ratio the run is on all patches: a ticket mode would be silently ignored.
        raise ValueError(f"mode={mode!r} chooses tickets: give keep_ratio (--keep-ratio) too, or leave mode out to train on all patches")
    if keep_ratio is not None:
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be a number in (0, 1] (or None for all patches), got {keep_ratio!r}")
        if mode in ("online", "fixed") and selector_checkpoint is None:
            raise ValueError(
                f"mode={mode!r} needs selector_checkpoint (--selector): the dense checkpoint whose CLS attention picks the tickets; "
                "or use mode='random'"
            )
        if mode == "random" and selector_checkpoint is not None:
            raise ValueError("selector_checkpoint (--selector) is only used with mode='online' or 'fixed', got mode='random'")
    elif selector_checkpoint is not None:
        raise ValueError("selector_checkpoint (--selector) is only used with keep_ratio (tickets); give keep_ratio or drop it")
    overrides = _check_overrides(overrides)
    out = _check_out_dir(out_dir)
    if (out / "checkpoints" / "last.pt").exists() and not overwrite:
        raise ValueError(f"{out} already holds a run ({out / 'checkpoints' / 'last.pt'}); pass overwrite=True (--overwrite) or another out_dir")
    ckpt = engine.load_checkpoint(checkpoint)
    base = engine.TrainConfig.from_dict(ckpt["config"])
    fields = {
        **base.to_dict(), "epochs": epochs, "lr": base.lr * 0.5 if lr is None else lr, "warmup_epochs": 0.0, "init_from": None,
        **overrides,
    }
    if "min_lr" not in overrides and isinstance(fields["lr"], (int, float)):
        fields["min_lr"] = min(base.min_lr, fields["lr"])  # the cosine ends below the (lower) fine-tuning peak
    config = engine.TrainConfig.from_dict(fields)
    lr, epochs = config.lr, config.epochs
    model = engine.model_from_checkpoint(checkpoint)
    selector = None
    if keep_ratio is not None and mode in ("online", "fixed"):
        selector = TicketSelector(engine.model_from_checkpoint(selector_checkpoint), keep_ratio, layer)
    train_set, eval_sets = engine.build_data(config)
    if selector is not None and selector.num_patches != model.patch_embed.num_patches:
        raise ValueError(
            f"the selector has {selector.num_patches} patches per image but the model {model.patch_embed.num_patches}; "
            "use a selector trained at the same image and patch size"
        )
    before = sparse_masks(model)

    # ------------------------------------------------------------- work
    start = time.perf_counter()
    log(f"fine-tuning {checkpoint} for {epochs} epochs at lr {lr:g} on " + ("all patches" if keep_ratio is None else f"{mode} tickets ({keep_ratio})"))
    if keep_ratio is None:
        run = engine.train(config, out, model=model, overwrite=overwrite)
        log(f"  {out.name}: test_acc {run.history[-1]['test_acc']:.4f}")
    else:
        student = prepare_student_(model, keep_ratio, mode)
        hooks = ticket_hooks(selector, mode, train_set=train_set)
        run = _train_on_tickets(config, out, student, hooks, eval_sets["test"], log)
    final = run.model
    after = sparse_masks(final)
    masks_fixed = list(after) == list(before) and all(torch.equal(before[k], after[k].cpu()) for k in before)
    # Only a run that re-prunes its 2:4 layers on purpose (a dynamic_2to4_every config field, where the engine has it) may move them.
    if not masks_fixed and not getattr(config, "dynamic_2to4_every", 0):
        raise RuntimeError("the sparsity masks changed during fine-tuning; this is a bug in lotus_kernels")
    last = run.history[-1]
    counts = _counts(final)
    device = engine._resolve_device(config.device, None)
    result = {
        "checkpoint": str(run.final_checkpoint),
        "metrics": {k: last[k] for k in ("epoch", "val_acc", "test_acc", "test_tickets_acc", "test_loss") if k in last},
        "tickets": None if keep_ratio is None else {"keep_ratio": keep_ratio, "mode": mode, "layer": layer},
        "lr": lr,
        "epochs": epochs,
        "masks_fixed": masks_fixed,
        **counts,
        "source": str(checkpoint),
        "arguments": arguments,
        "environment": environment(device),
        "elapsed_s": time.perf_counter() - start,
    }
    (out / "finetune.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    sections = [(
        "Fine-tuning",
        f"From `{checkpoint}`, {epochs} epochs at peak lr {lr:g}, "
        + ("all patches." if keep_ratio is None else f"on {mode} tickets (keep ratio {keep_ratio}); test_tickets_acc is on tickets, test_acc on all patches.")
        + (
            f" {counts['pruned']} of {counts['prunable']} prunable weights pruned ({counts['sparsity']:.2%}); "
            + ("mask held fixed." if masks_fixed else "2:4 masks re-pruned during training (dynamic_2to4_every).")
            if counts["prunable"] else ""
        ),
    )]
    if counts["sparse_layers"]:
        sections.append(("Sparse layers", "```\n" + str(sparsity_summary(final)) + "\n```"))
    result["report"] = str(write_report(out, sections=sections))
    return result
