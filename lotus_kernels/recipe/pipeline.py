"""The LOTUS pipeline: dense selector -> tickets -> Essential Sparsity -> Instant Soup -> pattern -> fine-tune -> export.

    run_pipeline(PipelineConfig(train={"model": "vit_micro_cifar", "dataset": "synthetic"}), "runs/lotus")

Stages (each writes a sub-folder of ``out_dir``; report.md sums them up):
1. ``dense``: train the dense ViT with the engine (``engine.train``); it is
   the selector and the starting point of everything else.
2. ``tickets``: fine-tune a copy on its data lottery tickets (``ticket_mode``
   "online": the frozen dense selector picks each augmented batch's
   top-CLS-attention patches; "fixed": it scores every training image once
   and each batch maps the scores through its crops and flips; the student
   drops the other patches at the input), evaluating each epoch
   with all patches (test_acc) and with tickets (test_tickets_acc);
   ``random``: the same on random patches of the same count (the control).
3. ``essential_sparsity``: one-shot global magnitude sweep of the dense model
   on the validation split (no fine-tuning) and its knee.
4. ``instant_soup``: the ticket student (all patches), from the knee's mask
   (when below the target), pruned by ISP to exactly ``target_sparsity``.
5. per pattern in ``patterns``: the ISP mask projected to the pattern
   ("unstructured" keeps it; "2:4" / "block" re-select within it), fine-tuned
   on tickets with the mask held (pruned weights stay exactly zero), turned
   into SparseLinear layers and evaluated with all patches and with tickets.
6. export: the first pattern's model as compact safetensors, and a timing of
   dense vs sparse (vs sparse on tickets) forward passes on this device.

Why the paper's combined run could collapse to ~50% and ours does not is
measured by ``lotus ablate`` (``lotus_kernels.recipe.ablation``: eight variants of
the combination from one pipeline run). On CIFAR-10 at micro scale
(results/cifar10-micro-cpu/ablation) the collapse is the missing recovery:
every variant that fine-tunes on tickets with the mask held ends 1.3-1.6
points below dense, whatever the order, the pruner or the selector, while
the same masks without it lose 6-10 points on tickets at 50% sparsity (and
fall to 28-33% at 70%), and a ticket student pruned one-shot and served all
patches falls to 49.9% (dense 65.8%). Pruning hardly moves the tickets (a
pruned selector keeps 82-91% of them), so
"pruning removes weights the tickets need" is not what breaks it. The report
shows each step's accuracy so a collapse would be visible where it happens.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from lotus_kernels.info import environment
from lotus_kernels.masks import PATTERNS, check_sparsity
from lotus_kernels.nn import sparsity_summary
from lotus_kernels.nn.patch_dropping import disable_patch_dropping_, enable_patch_dropping_, num_kept, random_patches, use_tickets

from .data import resolve_cifar10_source
from .engine.build import build_data
from .engine.config import Config
from .engine.devices import resolve_device
from .engine.train_config import TrainConfig
from .method.essential_sparsity import DEFAULT_MAX_DROP, DEFAULT_SPARSITIES, EssentialSparsityResult, essential_sparsity_sweep, plot_essential_sparsity
from .method.instant_soup import plot_instant_soup
from .method.masking import apply_masks_, global_sparsity, hold_masks_, prunable_weights, project_masks, release_masks_, sparsify_masked_
from .method.tickets import prepare_student_
from .reporting.plots import plot_stage_accuracy
from .reporting.report import metrics_table
from .stages import (
    InstantSoupStage,
    decision_split,
    evaluate_both,
    export_safetensors,
    stage_config,
    ticket_stage_config,
    train_dense,
    train_on_tickets,
    train_students,
)


@dataclasses.dataclass
class PipelineConfig(Config):
    """Everything the pipeline decides. ``train``: TrainConfig fields of the dense run (the later
    stages reuse its data and recipe with their own epochs and learning rates).

    Instant Soup Pruning: ingredients, subset_fraction, prune_step, vote_threshold,
    ingredient_epochs, isp_lr, spelled as ``lotus prune`` / ``prune_checkpoint`` spell them
    (``stages.InstantSoupStage``); ``from_dict`` also reads the old ``isp_``-prefixed keys, so
    pipeline_config.json files written before still load and resume.
    """

    CONFIG_NAME: ClassVar[str] = "pipeline config"
    ALIASES: ClassVar[dict[str, str]] = {
        "isp_ingredients": "ingredients", "isp_subset_fraction": "subset_fraction", "isp_prune_step": "prune_step",
        "isp_vote_threshold": "vote_threshold", "isp_ingredient_epochs": "ingredient_epochs",
    }

    train: dict = dataclasses.field(default_factory=dict)
    keep_ratio: float = 0.5
    ticket_mode: str = "online"  # "online": selector on every augmented batch; "fixed": scored once, mapped through augmentation
    ticket_layer: int | str = -1
    ticket_epochs: int = 5
    ticket_lr_scale: float = 0.5  # fine-tuning lr = dense lr * this
    random_control: bool = True
    es_sparsities: tuple = DEFAULT_SPARSITIES
    es_max_drop: float = DEFAULT_MAX_DROP
    target_sparsity: float = 0.5
    ingredients: int = InstantSoupStage.ingredients
    subset_fraction: float = InstantSoupStage.subset_fraction
    prune_step: float = InstantSoupStage.prune_step
    vote_threshold: int = InstantSoupStage.vote_threshold
    ingredient_epochs: int = InstantSoupStage.ingredient_epochs
    isp_lr: float = InstantSoupStage.isp_lr
    patterns: tuple = ("unstructured",)
    block_size: int = 32
    finetune_epochs: int = 5
    timing_batch: int = 64

    def __post_init__(self):
        if not isinstance(self.train, dict):
            raise TypeError(f"train must be a dict of TrainConfig fields, got {type(self.train).__name__}")
        self.train_config  # validates model name, dataset, recipe (unknown keys too)
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) or not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}")
        if self.ticket_mode not in ("online", "fixed"):
            raise ValueError(f"ticket_mode must be 'online' or 'fixed', got {self.ticket_mode!r}")
        self.target_sparsity = check_sparsity(self.target_sparsity, "target_sparsity")
        self.es_sparsities = tuple(check_sparsity(s, "es_sparsities") for s in self.es_sparsities)
        if not self.es_sparsities:
            raise ValueError("es_sparsities must not be empty")
        self.patterns = tuple(self.patterns) if not isinstance(self.patterns, str) else (self.patterns,)
        bad = [p for p in self.patterns if p not in PATTERNS]
        if bad or not self.patterns:
            raise ValueError(f"patterns must be a non-empty list of {PATTERNS}, got {list(self.patterns)}")
        if "2:4" in self.patterns and self.target_sparsity != 0.5:
            raise ValueError(f"pattern '2:4' prunes exactly half the weights: use target_sparsity=0.5, got {self.target_sparsity}")
        for name in ("ticket_epochs", "finetune_epochs", "ingredient_epochs", "ingredients", "timing_batch", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("ticket_lr_scale", "isp_lr", "es_max_drop", "subset_fraction", "prune_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not 1 <= self.vote_threshold <= self.ingredients:
            raise ValueError(f"vote_threshold must be in [1, ingredients={self.ingredients}], got {self.vote_threshold}")
        config = self.train_config
        source = resolve_cifar10_source(config.data_path) if config.dataset == "cifar10" else None
        if source is not None and not Path(source).exists():
            raise ValueError(f"dataset 'cifar10': the data source {source!r} (data_path or $LOTUS_CIFAR10) does not exist")

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.train)

    @property
    def instant_soup(self) -> InstantSoupStage:
        """Stage 4's settings: Instant Soup Pruning to target_sparsity."""
        return InstantSoupStage(
            self.target_sparsity, ingredients=self.ingredients, subset_fraction=self.subset_fraction, prune_step=self.prune_step,
            vote_threshold=self.vote_threshold, ingredient_epochs=self.ingredient_epochs, isp_lr=self.isp_lr,
        )

    @property
    def ticket_config(self) -> TrainConfig:
        """The recipe of every training run on tickets: the dense recipe with ticket_epochs, lr * ticket_lr_scale, no warmup."""
        return ticket_stage_config(self.train_config, self.ticket_epochs, self.ticket_lr_scale)


def train_selector_and_students(config: PipelineConfig, out: Path, train_set, test_set, log=print, resume: bool = False):
    """Stages 1-2: the dense model (out/dense), the ticket student (out/tickets) and, if
    ``config.random_control``, the random-patch control (out/random).

    Returns (dense_run, selector, hooks, tickets_run, random_run or None); hooks
    are ``ticket_hooks(selector, config.ticket_mode)``. resume: each run
    continues from its folder's last checkpoint (a finished one trains no more).
    """
    log("[1/6] dense model")
    dense_run = train_dense(config.train_config, out / "dense", resume)
    log("[2/6] fine-tuning on data lottery tickets")
    selector, hooks, tickets_run, random_run = train_students(
        dense_run.model, config.ticket_config, out, train_set, test_set, keep_ratio=config.keep_ratio, mode=config.ticket_mode,
        layer=config.ticket_layer, random_control=config.random_control, log=log, resume=resume,
    )
    return dense_run, selector, hooks, tickets_run, random_run


def time_forward(model: nn.Module, images: torch.Tensor, repeats: int = 5, hook=None) -> float:
    """Median seconds of one forward (no grad, eval), device-synchronised, one warm-up call first."""
    model.eval()
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    run = (lambda: hook(model, images)) if hook else (lambda: model(images))
    times = []
    with torch.no_grad():
        run()
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


ISP_MASKS = "instant_soup_masks.safetensors"


def _check_run_folder(out: Path, config: PipelineConfig, resume: bool, overwrite: bool) -> None:
    """Before any work: a folder holding a pipeline run is continued (resume, same config) or replaced (overwrite)."""
    for name, value in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in the folder, or start afresh over it")
    saved_path = out / "pipeline_config.json"
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; the pipeline writes a folder")
    if not saved_path.is_file():
        if resume:
            raise ValueError(f"resume=True (--resume) but {out} holds no pipeline run ({saved_path} does not exist)")
        return
    if not (resume or overwrite):
        raise ValueError(f"{out} already holds a pipeline run: resume=True (--resume) continues it, skipping finished stages; "
                         "overwrite=True (--overwrite) starts afresh over it")
    if resume:
        # A run saved before the ISP keys lost their isp_ prefix compares under the current names.
        saved = PipelineConfig.renamed(json.loads(saved_path.read_text()))
        now = json.loads(json.dumps(config.to_dict()))
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise ValueError(f"cannot resume {out} with a different config (changed: {', '.join(diff)}); use --overwrite or another folder")


def run_pipeline(config: PipelineConfig, out_dir, log=print, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run every stage into ``out_dir``; returns the summary (also in summary.json, with report.md).

    A folder that already holds a pipeline run needs ``resume`` (same config:
    finished stages are read back, not redone: training runs continue from
    their last checkpoint, the Essential Sparsity sweep and Instant Soup's
    masks are loaded) or ``overwrite`` (start afresh); otherwise ValueError,
    before any work.
    """
    if not isinstance(config, PipelineConfig):
        raise TypeError(f"config must be a PipelineConfig, got {type(config).__name__}")
    out = Path(out_dir)
    _check_run_folder(out, config, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    base = config.train_config
    train_set, eval_sets = build_data(base)
    test_set = eval_sets["test"]
    val_set = eval_sets.get("val", test_set)
    num_classes = len(train_set.classes)
    summary: dict = {
        "dataset": base.dataset, "model": base.model, "keep_ratio": config.keep_ratio, "rows": [], "test_images": len(test_set),
        "environment": environment(resolve_device(base.device, None)),
        "config": config.to_dict(),
    }

    def row(name, model_acc: dict, sparsity: float, note: str = ""):
        summary["rows"].append({"stage": name, "sparsity": sparsity, **model_acc, "note": note})

    # 1-2. dense selector, tickets (online or fixed) and the random control
    dense_run, selector, hooks, tickets_run, random_run = train_selector_and_students(config, out, train_set, test_set, log, resume)
    dense, student, mode = dense_run.model, tickets_run.model, config.ticket_mode
    ft = config.ticket_config
    row("dense", {"acc_all_patches": dense_run.history[-1]["test_acc"]}, 0.0)
    row("tickets", {"acc_all_patches": tickets_run.history[-1]["test_acc"], "acc_tickets": tickets_run.history[-1]["test_tickets_acc"]}, 0.0)
    # Each stage's history, with the epochs before it: tickets (and the control) continue the dense model,
    # the pattern fine-tunes continue the ticket student after pruning.
    dense_epochs, ticket_epochs = len(dense_run.history), len(tickets_run.history)
    histories = {"dense": (dense_run.history, 0), "tickets": (tickets_run.history, dense_epochs)}
    if random_run is not None:
        histories["random patches"] = (random_run.history, dense_epochs)
        row("random patches (control)", {"acc_all_patches": random_run.history[-1]["test_acc"], "acc_tickets": random_run.history[-1]["test_tickets_acc"]}, 0.0, "random subset of the same size")

    # 3. Essential Sparsity of the dense model
    log("[3/6] Essential Sparsity sweep")
    split = decision_split(eval_sets)
    if split == "test":
        log("  WARNING: no validation split (train.holdout=0): the Essential Sparsity knee and Instant Soup's rounds are "
            "chosen on the TEST split, so the test accuracies below are optimistic; set train.holdout (e.g. 5000 on CIFAR-10)")
    summary["decision_split"] = split
    es_path = out / "essential_sparsity.json"
    if resume and es_path.is_file():
        es = EssentialSparsityResult.from_dict(json.loads(es_path.read_text()))
        log("  (read back from essential_sparsity.json)")
    else:
        es = essential_sparsity_sweep(dense, val_set, config.es_sparsities, max_drop=config.es_max_drop)
        es.save_json(es_path)
    plot_essential_sparsity(es, out / "essential_sparsity.png", f"Essential Sparsity of the dense model ({base.model}, {base.dataset})", split=split)
    log(f"  knee {es.knee:.2f} ({split} accuracy: dense {es.dense_accuracy:.2%}, max drop {_points(config.es_max_drop)})")

    # 4. Instant Soup Pruning of the ticket student (all patches) to the target
    log(f"[4/6] Instant Soup Pruning to {config.target_sparsity:.0%}")
    pruned = disable_patch_dropping_(copy.deepcopy(student))
    isp_json, isp_masks = out / "instant_soup.json", out / ISP_MASKS
    if resume and isp_json.is_file() and isp_masks.is_file():
        # Only the masks go back to the model (instant_soup: ingredient weights are discarded): read them back.
        from safetensors.torch import load_file

        isp_record = json.loads(isp_json.read_text())
        isp_result_masks = {k: v.to(next(pruned.parameters()).device) for k, v in load_file(str(isp_masks)).items()}
        apply_masks_(pruned, isp_result_masks)
        log("  (read back from instant_soup.json and its masks)")
    else:
        from safetensors.torch import save_file

        isp = config.instant_soup.run(pruned, train_set, val_set, base, knee=es.knee)
        isp.save_json(isp_json)
        save_file({k: v.detach().cpu().contiguous() for k, v in isp.masks.items()}, str(isp_masks))
        plot_instant_soup(isp, out / "instant_soup.png", f"Instant Soup Pruning of the ticket student to {config.target_sparsity:.0%}", split=split)
        release_masks_(pruned)
        isp_record, isp_result_masks = isp.to_dict(), isp.masks

    # 5. per pattern: project, fine-tune on tickets with the mask held, compact
    log("[5/6] pattern projection and fine-tuning on tickets with masks fixed")
    finals = {}
    weights = prunable_weights(pruned)
    for pattern in config.patterns:
        masks = project_masks(weights, isp_result_masks, pattern, config.block_size) if pattern != "unstructured" else isp_result_masks
        model = copy.deepcopy(pruned)
        hold_masks_(model, masks)
        prepare_student_(model, config.keep_ratio, mode)
        name = f"combined_{pattern.replace(':', 'of')}"
        run = train_on_tickets(stage_config(ft, epochs=config.finetune_epochs), out / name, model, hooks, test_set, log, resume)
        model = disable_patch_dropping_(run.model)
        release_masks_(model)
        sparsify_masked_(model, masks, pattern=pattern, block_size=config.block_size)
        prepare_student_(model, config.keep_ratio, mode)
        acc = evaluate_both(model, test_set, hooks, base.amp)
        finals[pattern] = (model, masks)
        histories[f"tickets + {pattern} {config.target_sparsity:.0%}"] = (run.history, dense_epochs + ticket_epochs)
        row(f"tickets + {pattern} pruning", acc, global_sparsity(masks), "SparseLinear, compact weights")

    # 6. export and timing
    log("[6/6] export and timing")
    pattern = config.patterns[0]
    model = disable_patch_dropping_(finals[pattern][0])
    exported = export_safetensors(
        model, out / "model.safetensors",
        {"train_config": base.to_dict(), "num_classes": num_classes, "pattern": pattern, "target_sparsity": config.target_sparsity},
    )
    device = next(dense.parameters()).device
    images = torch.randn(config.timing_batch, 3, *dense.patch_embed.img_size, device=device)
    dropped = enable_patch_dropping_(copy.deepcopy(model), config.keep_ratio, selector="given")
    k = num_kept(config.keep_ratio, dense.patch_embed.num_patches)
    tickets = random_patches(config.timing_batch, dense.patch_embed.num_patches, k, device)

    def on_fixed_tickets(m, x):
        with use_tickets(m, tickets, validate=False):
            return m(x)

    timing = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": config.timing_batch,
        "dense_s": time_forward(dense, images),
        "sparse_s": time_forward(model, images),
        "sparse_on_tickets_s": time_forward(dropped, images, hook=on_fixed_tickets),
        "torch": torch.__version__,
        "note": "median of 5 forwards after a warm-up; tickets given (selector cost excluded)",
    }
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    summary.update(
        essential_sparsity={"knee": es.knee, "dense_accuracy": es.dense_accuracy, "curve": dict(zip(es.sparsities, es.accuracies))},
        instant_soup={
            "rounds": isp_record["rounds"], "final_sparsity": isp_record["final_sparsity"],
            "start_sparsity": (isp_record.get("history") or [{}])[0].get("sparsity", 0.0),
        },
        export=str(exported), export_bytes=exported.stat().st_size, export_pattern=pattern, timing=timing,
        sparsity=str(sparsity_summary(model)),
        prunable_bytes={"dense": sparsity_summary(model).dense_bytes, "compact": sparsity_summary(model).compact_bytes},
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_pipeline_report(out, config, summary, histories)
    log(f"report: {out / 'report.md'}")
    return summary


def _points(fraction: float) -> str:
    """An accuracy difference given as a fraction, in points: 0.01 -> "1 point", 0.015 -> "1.5 points"."""
    value = 100 * fraction
    return f"{value:g} point" + ("" if value == 1 else "s")


def _at_a_glance(summary: dict, finetune_epochs: int) -> list[str]:
    """One line per question the run answers, as differences in points on the test split."""
    rows = {r["stage"]: r for r in summary["rows"]}
    lines = []

    def diff(a, b):
        return f"{100 * (a - b):+.1f} points"

    tickets, control, dense = rows.get("tickets"), rows.get("random patches (control)"), rows.get("dense")
    if tickets and control:
        lines.append(
            f"- Tickets vs random patches of the same count (the control): {diff(tickets['acc_tickets'], control['acc_tickets'])} "
            f"on each one's kept patches, {diff(tickets['acc_all_patches'], control['acc_all_patches'])} on all patches."
        )
    for r in summary["rows"]:
        if r["stage"].startswith("tickets + ") and tickets and dense:
            lines.append(
                f"- {r['stage']} ({r['sparsity']:.0%} of the prunable weights, then {finetune_epochs} more epochs on tickets, "
                "which the unpruned student did not get): "
                f"{diff(r['acc_tickets'], tickets['acc_tickets'])} vs the unpruned ticket student on its kept patches, "
                f"{diff(r['acc_all_patches'], dense['acc_all_patches'])} vs dense on all patches."
            )
    if lines:
        n = summary.get("test_images")
        lines.append(
            f"- One seed{f', {n} test images (one image = {100 / n:.2f} points)' if n else ''}: differences of a point or two are within noise."
        )
    return lines


def write_pipeline_report(out: Path, config: PipelineConfig, summary: dict, histories: dict) -> Path:
    """report.md and accuracy_per_epoch.png. histories: {stage name: (per-epoch history, epochs before the stage)}.

    Every accuracy is a percentage that names its split; differences are in points.
    """
    data = "synthetic data" if summary["dataset"] == "synthetic" else summary["dataset"]
    title = f"LOTUS pipeline: {summary['model']} on {data}"
    stages = [(name, history, start) for name, (history, start) in histories.items()]
    dense_epochs = len(histories["dense"][0])
    ticket_epochs = len(histories["tickets"][0])
    plot_stage_accuracy(stages, out / "accuracy_per_epoch.png", title, markers=[(dense_epochs + ticket_epochs + 0.5, "pruning")])
    split = summary.get("decision_split", "val")
    rows = ["| stage | sparsity | test accuracy, all patches | test accuracy, on its kept patches | note |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        tickets = r.get("acc_tickets")
        rows.append(
            f"| {r['stage']} | {r['sparsity']:.1%} | {r['acc_all_patches']:.2%} | {'' if tickets is None else f'{tickets:.2%}'} | {r['note']} |"
        )
    es = summary["essential_sparsity"]
    curve = [f"| sparsity | {split} accuracy, one-shot, no fine-tuning |", "|---|---|"] + [f"| {float(s):.0%} | {a:.2%} |" for s, a in es["curve"].items()]
    t = summary["timing"]
    isp = summary["instant_soup"]
    test_note = (
        "**The knee and the Instant Soup rounds were chosen on the test split** (no validation split: "
        "`train.holdout=0`), so the test accuracies above are optimistic; set `train.holdout` for an honest run."
        if split == "test" else
        f"Decisions (the knee, Instant Soup's rounds) are measured on the validation split carved from the training set "
        f"({config.train_config.holdout} images, not trained on); the Results table is on the test split."
    )
    start = isp.get("start_sparsity", 0.0)
    isp_start = (
        f"it starts from the knee's one-shot mask ({start:.0%})" if start > 0
        else f"it starts unpruned (the knee, {es['knee']:.0%}, is not below the target)"
    )
    bytes_ = summary.get("prunable_bytes")
    size = f" The prunable layers take {bytes_['compact'] / 1e3:.0f} KB compact instead of {bytes_['dense'] / 1e3:.0f} KB dense." if bytes_ else ""
    parts = [
        f"# {title}",
        f"Keep ratio {config.keep_ratio}: a student trains on that fraction of each image's patches, its tickets (the dense "
        f"model's top CLS-attention patches, picked on every batch in {config.ticket_mode} mode); the control trains on random "
        f"patches of the same count. Target sparsity {config.target_sparsity:.0%}, patterns {list(config.patterns)}. "
        "Accuracies are top-1 percentages on the split each table or axis names; differences are in points. "
        "\"On its kept patches\": the ticket student (and each pruned model) on its tickets, the control on random patches.",
        "## At a glance", "\n".join(_at_a_glance(summary, config.finetune_epochs)),
        "## Results", "\n".join(rows),
        "Pruned models hold Instant Soup's global mask (per-layer densities vary around the target), as it is for "
        "\"unstructured\" or projected per layer for \"2:4\" (the two largest of every four weights) and \"block\", "
        "then fine-tune on tickets with the mask held.",
        "Each curve continues the model it starts from: tickets and the random control both fine-tune the dense model "
        "(alternatives, drawn over the same epochs); the pattern fine-tunes continue the ticket student after pruning.",
        "![test accuracy per epoch](accuracy_per_epoch.png)",
        "## Essential Sparsity", test_note,
        f"Knee: {es['knee']:.0%}, the largest swept sparsity whose {split} accuracy is at most {_points(config.es_max_drop)} "
        f"below the dense model's {es['dense_accuracy']:.2%} ({split}); the rule takes the largest such sparsity, so a "
        "noisy curve may dip below the line at a smaller one.",
        "\n".join(curve), "![accuracy vs sparsity](essential_sparsity.png)",
        "## Instant Soup Pruning",
        f"Instant Soup Pruning of the ticket student (accuracies on all patches, {split} split; round 0 is before any "
        f"pruning): {isp_start}; {isp['rounds']} voting rounds, then one global-magnitude prune to exactly "
        f"{isp['final_sparsity']:.2%} (the star).",
        "![ISP rounds](instant_soup.png)",
        "## Export and timing",
        f"`{Path(summary['export']).name}` (the {summary.get('export_pattern', config.patterns[0])} model): "
        f"{summary['export_bytes'] / 1e6:.2f} MB.{size}",
        f"Forward of a batch of {t['batch']} on {t['device']} (the {summary.get('export_pattern', config.patterns[0])} model): "
        f"dense {t['dense_s'] * 1e3:.1f} ms, sparse {t['sparse_s'] * 1e3:.1f} ms, sparse on tickets {t['sparse_on_tickets_s'] * 1e3:.1f} ms "
        f"({t['note']})."
        + (" On a CPU the sparse layers run the dense backend and patch dropping the gather + SDPA path, so no speedup is "
           "expected here and a shared machine makes these timings noisy; GPU speed is what `lotus gpu-check` measures."
           if t["device"] == "cpu" else ""),
        "```\n" + summary["sparsity"] + "\n```",
        "## Per-stage metrics",
    ]
    for name, (history, _) in histories.items():
        parts += [f"### {name}", metrics_table(history, [k for k in ("epoch", "train_loss", "test_acc", "test_tickets_acc", "images_per_s") if any(k in r for r in history)])]
    parts += ["## Configuration", "```json\n" + json.dumps(config.to_dict(), indent=2) + "\n```"]
    path = out / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
