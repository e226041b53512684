"""The recipe's stages, the public building blocks that ``pipeline``, ``ablation`` and ``cli`` compose
(this module imports none of them):

- training: ``train_dense``, ``train_students`` (the ticket student and the random control),
  ``train_on_tickets``, ``stage_config`` / ``ticket_stage_config``, ``evaluate_both``;
- pruning: ``InstantSoupStage`` (knee -> ingredients trained by the engine -> Instant Soup
  Pruning, the one place this sequence is written);
- export: ``export_safetensors`` / ``load_exported``;
- a stage as a standalone step on checkpoints: prune a trained model, fine-tune a pruned one.

    prune_checkpoint("runs/dense/checkpoints/last.pt", "runs/pruned", method="instant-soup", sparsity=0.5)
    finetune_checkpoint("runs/pruned/pruned.pt", "runs/finetuned", epochs=5, keep_ratio=0.5,
                        selector_checkpoint="runs/dense/checkpoints/last.pt")

``lotus prune`` and ``lotus finetune`` call these; ``run_pipeline`` runs the
same stages back to back. Both read and write the engine's own checkpoint
format (``engine.checkpoint``), so their outputs go straight into
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
as the pipeline does (``train_on_tickets``): mode "online" or
"fixed" (tickets of ``selector_checkpoint``'s dense model) or "random".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from lotus_kernels.info import environment
from lotus_kernels.masks import PATTERNS, block_shape, check_sparsity
from lotus_kernels.nn import SparseLinear, check_layout, sparsity_summary

from .data import ImageSet
from .engine import checkpoint as checkpoints
from .engine.build import build_data, build_model
from .engine.devices import resolve_device
from .engine.evaluation import evaluate
from .engine.loop import TrainResult, train
from .engine.train_config import TrainConfig
from .method.essential_sparsity import DEFAULT_MAX_DROP, DEFAULT_SPARSITIES, check_max_drop, essential_sparsity_sweep, one_shot_masks, plot_essential_sparsity
from .method.instant_soup import InstantSoupConfig, InstantSoupResult, instant_soup_prune, make_train_fn, plot_instant_soup
from .method.masking import apply_masks_, prunable_weights, sparsify_masked_
from .method.tickets import MODES, TicketSelector, prepare_student_, ticket_hooks
from .reporting.report import write_report

__all__ = [
    "METHODS",
    "ISP_STARTS",
    "InstantSoupStage",
    "stage_config",
    "ticket_stage_config",
    "train_dense",
    "train_on_tickets",
    "train_students",
    "evaluate_both",
    "decision_split",
    "export_safetensors",
    "load_exported",
    "prune_checkpoint",
    "finetune_checkpoint",
    "sparse_masks",
]

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


def decision_split(eval_sets: dict) -> str:
    """The split decisions (the knee, Instant Soup's rounds) are measured on: the holdout ("val") when the run has one, else "test"."""
    return "val" if "val" in eval_sets else "test"


def _accuracies(model: nn.Module, eval_sets: dict, amp: str, token_hook=None) -> dict:
    """{split: top-1 accuracy} on the validation split (if any) and test."""
    return {
        name: evaluate(model, eval_sets[name], amp=amp, token_hook=token_hook)["acc"]
        for name in ("val", "test") if name in eval_sets
    }


def _sweep_points(es_sparsities, upper: float) -> list[float]:
    """The es_sparsities below ``upper``, and ``upper`` itself, ascending."""
    return sorted({s for s in es_sparsities if s < upper} | {upper})


# ---------------------------------------------------------------------------
# building blocks (what the pipeline, the ablation and the CLI compose)
# ---------------------------------------------------------------------------


def stage_config(base: TrainConfig, **changes) -> TrainConfig:
    """``base`` with ``changes`` (TrainConfig fields), validated like any config."""
    return TrainConfig.from_dict({**base.to_dict(), **changes})


def ticket_stage_config(base: TrainConfig, epochs: int, lr_scale: float) -> TrainConfig:
    """The recipe of every training run on tickets: the dense recipe with ``epochs``, lr * ``lr_scale``, no warmup,
    no init_from (the run starts from the model it is given)."""
    return stage_config(base, epochs=epochs, lr=base.lr * lr_scale, warmup_epochs=0.0, init_from=None)


def _run_mode(out_dir: Path, resume: bool) -> dict:
    """train's arguments for one stage's run folder: continue it when resuming and it has a checkpoint (a
    finished run then trains no further epoch), else start afresh over whatever is there."""
    return {"resume": True} if resume and (Path(out_dir) / "checkpoints" / "last.pt").is_file() else {"overwrite": True}


def train_dense(config: TrainConfig, out_dir, resume: bool = False) -> TrainResult:
    """The dense model (the selector, and where everything else starts) trained into ``out_dir``;
    resume: continue the folder's run if it has one (a finished one trains no more)."""
    return train(config, out_dir, **_run_mode(out_dir, resume))


def evaluate_both(model: nn.Module, dataset: ImageSet, hooks, amp: str) -> dict:
    """{"acc_all_patches", "acc_tickets"}: top-1 accuracy of ``model`` with all patches and on its tickets.
    hooks: ``ticket_hooks``'s (train hook, all-patches hook, tickets hook)."""
    _, all_patches, on_tickets = hooks
    return {
        "acc_all_patches": evaluate(model, dataset, amp=amp, token_hook=all_patches)["acc"],
        "acc_tickets": evaluate(model, dataset, amp=amp, token_hook=on_tickets)["acc"],
    }


def train_on_tickets(config: TrainConfig, out_dir, student: nn.Module, hooks, test_set: ImageSet, log=print, resume: bool = False) -> TrainResult:
    """Train ``student`` (``prepare_student_``) on its tickets into ``out_dir``; each epoch is evaluated with all
    patches (test_acc) and on tickets (test_tickets_acc). hooks: ``ticket_hooks``'s triple."""
    on_tickets, all_patches, tickets_eval = hooks
    out_dir = Path(out_dir)

    def add_ticket_accuracy(epoch, model, metrics):
        metrics["test_tickets_acc"] = evaluate(model, test_set, amp=config.amp, token_hook=tickets_eval)["acc"]

    result = train(
        config, out_dir, model=student, token_hook=on_tickets, eval_token_hook=all_patches,
        on_epoch_end=add_ticket_accuracy, **_run_mode(out_dir, resume),
    )
    log(f"  {out_dir.name}: test_acc {result.history[-1]['test_acc']:.4f}, on tickets {result.history[-1]['test_tickets_acc']:.4f}")
    return result


def train_students(
    dense: nn.Module, config: TrainConfig, out: Path, train_set: ImageSet, test_set: ImageSet, *, keep_ratio: float, mode: str,
    layer: int | str = -1, random_control: bool = True, log=print, resume: bool = False,
):
    """Copies of ``dense`` fine-tuned with ``config`` on their data lottery tickets: the ticket student
    (``out/tickets``: the frozen dense model picks them, ``mode`` "online" or "fixed") and, with
    ``random_control``, the control on random patches of the same count (``out/random``).

    Returns (selector, hooks, tickets_run, random_run or None); hooks are
    ``ticket_hooks(selector, mode)``.
    """
    selector = TicketSelector(dense, keep_ratio, layer)
    hooks = ticket_hooks(selector, mode, train_set=train_set)
    student = prepare_student_(copy.deepcopy(dense), keep_ratio, mode)
    tickets_run = train_on_tickets(config, out / "tickets", student, hooks, test_set, log, resume)
    random_run = None
    if random_control:
        control = prepare_student_(copy.deepcopy(dense), keep_ratio, "random")
        random_run = train_on_tickets(config, out / "random", control, ticket_hooks(None, "random"), test_set, log, resume)
    return selector, hooks, tickets_run, random_run


@dataclasses.dataclass(frozen=True)
class InstantSoupStage:
    """Instant Soup Pruning as the recipe runs it, in one place for ``prune_checkpoint``, the pipeline and
    the ablation: from the Essential Sparsity knee's one-shot mask (when 0 < knee < target_sparsity),
    ingredients trained by the engine (``make_train_fn``), to exactly ``target_sparsity``, without ISP's
    own fine-tuning (the recipe fine-tunes after the pattern projection).

    ingredients, subset_fraction, prune_step, vote_threshold: ``InstantSoupConfig``'s;
    ingredient_epochs, isp_lr: each ingredient's run (``make_train_fn`` epochs and lr).
    Construction checks them all (nothing trains before).
    """

    # The recipe's Instant Soup defaults, here once: the pipeline, `lotus prune` and prune_checkpoint take theirs from these.
    target_sparsity: float
    ingredients: int = InstantSoupConfig.ingredients
    subset_fraction: float = InstantSoupConfig.subset_fraction
    prune_step: float = InstantSoupConfig.prune_step
    vote_threshold: int = InstantSoupConfig.vote_threshold
    ingredient_epochs: int = 1
    isp_lr: float = 1e-4

    def __post_init__(self):
        self.isp_config(seed=0)  # InstantSoupConfig's checks

    def isp_config(self, seed: int) -> InstantSoupConfig:
        return InstantSoupConfig(
            target_sparsity=self.target_sparsity, ingredients=self.ingredients, subset_fraction=self.subset_fraction,
            prune_step=self.prune_step, vote_threshold=self.vote_threshold, finetune=False, seed=seed,
        )

    def train_fn(self, base: TrainConfig, token_hook=None):
        """The ingredients' training: the engine in memory with ``base``'s precision, compile settings and seed,
        batches of min(base.batch_size, 128); token_hook: how they run a batch (default all patches)."""
        return make_train_fn(
            epochs=self.ingredient_epochs, batch_size=min(base.batch_size, 128), lr=self.isp_lr, amp=base.amp, seed=base.seed,
            token_hook=token_hook, compile=base.compile, compile_mode=base.compile_mode,
        )

    def starts_from_knee(self, knee: float | None) -> bool:
        return knee is not None and 0 < knee < self.target_sparsity

    def run(
        self, model: nn.Module, train_set: ImageSet, eval_data, base: TrainConfig, *, knee: float | None = None,
        token_hook=None, train_fn=None, on_round=None,
    ) -> InstantSoupResult:
        """Prune ``model`` in place (masks applied; ISP's held masks released by the caller if it wants).

        eval_data: ImageSet or callable(model) -> accuracy (the rounds' measure). train_fn: default
        ``self.train_fn(base, token_hook)``. on_round(RoundRecord): called after every round.
        """
        initial = one_shot_masks(model, knee) if self.starts_from_knee(knee) else None
        return instant_soup_prune(
            model, train_set, self.isp_config(base.seed), train_fn=train_fn or self.train_fn(base, token_hook),
            eval_data=eval_data, initial_masks=initial, on_round=on_round,
        )


def export_safetensors(model: nn.Module, path, metadata: dict) -> Path:
    """The model as safetensors (SparseLinear layers compact; ``serialization.save_sparse``), ``metadata`` (the
    training config and class count) in the header so ``load_exported`` can rebuild it."""
    from lotus_kernels.serialization import save_sparse

    return save_sparse(model, path, metadata=metadata)


def load_exported(path, train_config: TrainConfig | None = None) -> nn.Module:
    """Rebuild an exported model: the architecture from its recorded TrainConfig, SparseLinear layouts from the header."""
    from lotus_kernels.serialization import load_sparse, read_header

    header = read_header(path)
    if train_config is None and "train_config" not in header:
        raise ValueError(f"{path} records no training config: load it with lotus_kernels.load_sparse(model_or_timm_name, path)")
    config = train_config or TrainConfig.from_dict(header["train_config"])
    return load_sparse(build_model(config, header["num_classes"]), path)


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
    es_max_drop: float = DEFAULT_MAX_DROP,
    ingredients: int = InstantSoupStage.ingredients,
    subset_fraction: float = InstantSoupStage.subset_fraction,
    prune_step: float = InstantSoupStage.prune_step,
    vote_threshold: int = InstantSoupStage.vote_threshold,
    ingredient_epochs: int = InstantSoupStage.ingredient_epochs,
    isp_lr: float = InstantSoupStage.isp_lr,
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
    es_sparsities, es_max_drop: the Essential Sparsity sweep's grid and knee
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
        "es_max_drop": es_max_drop, "ingredients": ingredients, "subset_fraction": subset_fraction, "prune_step": prune_step,
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
    es_max_drop = check_max_drop(es_max_drop, "es_max_drop")
    _check_choice(isp_start, "isp_start", ISP_STARTS)
    isp = InstantSoupStage(
        sparsity, ingredients=ingredients, subset_fraction=subset_fraction, prune_step=prune_step, vote_threshold=vote_threshold,
        ingredient_epochs=ingredient_epochs, isp_lr=isp_lr,
    )
    overrides = _check_overrides(overrides)
    out = _check_out_dir(out_dir)
    if (out / PRUNED_NAME).exists() and not overwrite:
        raise ValueError(f"{out / PRUNED_NAME} already exists; pass overwrite=True (--overwrite) or another out_dir")
    ckpt = checkpoints.load_checkpoint(checkpoint)
    config = TrainConfig.from_dict({**ckpt["config"], **overrides})
    isp_train = isp.train_fn(config)
    model = checkpoints.model_from_checkpoint(checkpoint)
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
    device = resolve_device(config.device, None)
    train_set, eval_sets = build_data(config)
    eval_sets = {k: v.to(device) for k, v in eval_sets.items()}
    split = decision_split(eval_sets)
    num_classes = len(train_set.classes)
    model.to(device)

    def eval_fn(m):
        return evaluate(m, eval_sets[split], amp=config.amp)["acc"]

    log(f"pruning {checkpoint} ({config.model}, {config.dataset}): {method} to {sparsity:.0%}, pattern {pattern}; measured on {split}")
    if split == "test":
        log("  WARNING: the checkpoint's run has no validation split (holdout=0): the knee and Instant Soup's rounds are chosen "
            "on the TEST split, so its test accuracy is optimistic; train with --set holdout=N for an honest one")
    result: dict = {"method": method, "pattern": pattern, "eval_split": split, "accuracy": {"dense": _accuracies(model, eval_sets, config.amp)}}
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    es = None
    if method == "essential" or (method == "instant-soup" and isp_start == "knee"):
        es = essential_sparsity_sweep(model, eval_fn, _sweep_points(es_sparsities, sparsity), max_drop=es_max_drop)
        plot = plot_essential_sparsity(es, out / "essential_sparsity.png", f"Essential Sparsity ({config.model}, {config.dataset})", split=split)
        plots.append(plot.name)
        result["essential_sparsity"] = {
            "knee": es.knee, "dense_accuracy": es.dense_accuracy, "max_drop": es.max_drop, "upper_bound": sparsity,
            "curve": [[s, a] for s, a in zip(es.sparsities, es.accuracies)], "pruned_counts": es.pruned_counts,
            "num_prunable": es.num_prunable,
        }
        log(f"  Essential Sparsity: knee {es.knee:.2f} (dense {es.dense_accuracy:.4f}, max drop {es_max_drop})")
    if method == "one-shot":
        masks = one_shot_masks(model, sparsity)
        mask_sparsity = sparsity
    elif method == "essential":
        masks = one_shot_masks(model, es.knee)
        mask_sparsity = es.knee
    else:
        knee = es.knee if es is not None else None
        isp_result = isp.run(
            model, train_set, eval_fn, config, knee=knee, train_fn=isp_train,
            on_round=lambda r: log(f"  ISP round {r.round}: sparsity {r.sparsity:.3f}, {split} acc {r.accuracy:.4f}"),
        )
        result["instant_soup"] = {"start": "knee" if isp.starts_from_knee(knee) else "dense", **isp_result.to_dict()}
        masks = isp_result.masks
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
            isp_result, out / "instant_soup.png", f"Instant Soup Pruning to {sparsity:.0%} ({config.model}, {config.dataset})", split=split, projected=projected,
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
    checkpoints.write_model_checkpoint(
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
    ckpt = checkpoints.load_checkpoint(checkpoint)
    base = TrainConfig.from_dict(ckpt["config"])
    fields = {
        **base.to_dict(), "epochs": epochs, "lr": base.lr * 0.5 if lr is None else lr, "warmup_epochs": 0.0, "init_from": None,
        **overrides,
    }
    if "min_lr" not in overrides and isinstance(fields["lr"], (int, float)):
        fields["min_lr"] = min(base.min_lr, fields["lr"])  # the cosine ends below the (lower) fine-tuning peak
    config = TrainConfig.from_dict(fields)
    lr, epochs = config.lr, config.epochs
    model = checkpoints.model_from_checkpoint(checkpoint)
    selector = None
    if keep_ratio is not None and mode in ("online", "fixed"):
        selector = TicketSelector(checkpoints.model_from_checkpoint(selector_checkpoint), keep_ratio, layer)
    train_set, eval_sets = build_data(config)
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
        run = train(config, out, model=model, overwrite=overwrite)
        log(f"  {out.name}: test_acc {run.history[-1]['test_acc']:.4f}")
    else:
        student = prepare_student_(model, keep_ratio, mode)
        hooks = ticket_hooks(selector, mode, train_set=train_set)
        run = train_on_tickets(config, out, student, hooks, eval_sets["test"], log)
    final = run.model
    after = sparse_masks(final)
    masks_fixed = list(after) == list(before) and all(torch.equal(before[k], after[k].cpu()) for k in before)
    # Only a run that re-prunes its 2:4 layers on purpose (a dynamic_2to4_every config field, where the engine has it) may move them.
    if not masks_fixed and not getattr(config, "dynamic_2to4_every", 0):
        raise RuntimeError("the sparsity masks changed during fine-tuning; this is a bug in lotus_kernels")
    last = run.history[-1]
    counts = _counts(final)
    device = resolve_device(config.device, None)
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
