"""Why tickets + pruning can collapse, measured: variants of the combination side by side.

    run_ablation(None, "runs/ablation", from_run="runs/pipeline")   # reuse a pipeline run's dense and ticket models
    lotus ablate --from runs/pipeline --out runs/ablation             # the same from the command line

The LOTUS paper's combined run (data lottery tickets + Instant Soup Pruning)
fell to ~50% on CIFAR-10, "attributed to pruning removing weights the tickets
need"; no code was published. Each variant here changes one thing relative to
our pipeline (``lotus_kernels.recipe.pipeline``), from the same dense model, the
same ticket student and the same target sparsity, so the table says which
choice a collapse comes from:

- order: prune the *ticket student* (ours) or prune the *dense* model first
  and move to tickets afterwards;
- pruner: Instant Soup from the Essential Sparsity knee, or one-shot global
  magnitude straight to the target;
- what ISP's ingredients train on: all patches (the pipeline) or tickets;
- who picks the tickets after pruning: the dense selector, or the pruned
  model itself (its CLS attention after pruning);
- recovery: fine-tuning on tickets with the mask held, or none.

Recovery epochs are matched: a ticket student already had ``ticket_epochs``
on tickets, so it gets ``finetune_epochs``; a model pruned before it ever saw
tickets gets ``ticket_epochs + finetune_epochs``. Every variant is evaluated
on the test set with all patches and on its tickets; the selector overlap
(the fraction of the dense selector's tickets a pruned selector still picks)
measures how much pruning moves the tickets.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn

from lotus_kernels.info import environment
from lotus_kernels.nn.patch_dropping import disable_patch_dropping_

from .data import DeviceLoader
from .engine.build import build_data
from .engine.checkpoint import model_from_checkpoint
from .engine.devices import resolve_device
from .engine.evaluation import evaluate
from .method.essential_sparsity import essential_sparsity_sweep, one_shot_masks
from .method.masking import apply_masks_, global_sparsity, hold_masks_, release_masks_, weight_sparsity
from .method.tickets import TicketSelector, expected_random_overlap, prepare_student_, ticket_hooks, ticket_overlap
from .pipeline import PipelineConfig, train_selector_and_students
from .reporting.plots import plot_stage_accuracy
from .reporting.report import metrics_table
from .stages import evaluate_both, stage_config, train_on_tickets


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of combining tickets and pruning.

    source: "tickets" (prune the ticket student) or "dense" (prune the dense
    model; tickets come after). pruner: "isp" or "one_shot". isp_on_tickets:
    ISP's ingredients train on tickets instead of all patches. selector:
    "dense" or "pruned" (the pruned model picks its own tickets; source
    "dense" only). recover: fine-tune on tickets with the mask held.
    """

    source: str
    pruner: str
    isp_on_tickets: bool
    selector: str
    recover: bool
    description: str

    @property
    def pruned_key(self) -> tuple:
        return (self.source, self.pruner, self.isp_on_tickets)


VARIANTS: dict[str, Variant] = {
    "ours": Variant("tickets", "isp", False, "dense", True, "the pipeline: ticket student, ISP (ingredients on all patches), fine-tune on tickets"),
    "ours_isp_on_tickets": Variant("tickets", "isp", True, "dense", True, "as ours, ISP ingredients train on tickets"),
    "ours_no_recovery": Variant("tickets", "isp", False, "dense", False, "as ours, no fine-tuning after pruning"),
    "one_shot": Variant("tickets", "one_shot", False, "dense", True, "ticket student one-shot to the target, fine-tune on tickets"),
    "one_shot_no_recovery": Variant("tickets", "one_shot", False, "dense", False, "ticket student one-shot to the target, no fine-tuning"),
    "prune_first": Variant("dense", "isp", False, "dense", True, "ISP of the dense model, then train on tickets (dense selector)"),
    "prune_first_self_selected": Variant("dense", "isp", False, "pruned", True, "ISP of the dense model, then train on the pruned model's own tickets"),
    "prune_first_no_recovery": Variant("dense", "isp", False, "dense", False, "ISP of the dense model, straight onto tickets, no training on them"),
}

# The fields a ticket student depends on: a run reused with --from must agree on them.
_STUDENT_FIELDS = ("train", "keep_ratio", "ticket_mode", "ticket_layer", "ticket_epochs", "ticket_lr_scale")


def check_variants(variants) -> list[str]:
    if variants is None:
        return list(VARIANTS)
    if isinstance(variants, str) or not all(isinstance(v, str) for v in variants) or not variants:
        raise ValueError(f"variants must be a non-empty list of names from {list(VARIANTS)}, got {variants!r}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    return list(dict.fromkeys(variants))


def _load_run(from_run, config: PipelineConfig | None) -> tuple[PipelineConfig, Path, Path]:
    """The pipeline run's config (or ``config``, checked against it) and its dense / ticket checkpoints."""
    run = Path(from_run)
    saved = run / "pipeline_config.json"
    dense_ckpt, tickets_ckpt = (run / stage / "checkpoints" / "last.pt" for stage in ("dense", "tickets"))
    missing = [str(p) for p in (saved, dense_ckpt, tickets_ckpt) if not p.is_file()]
    if missing:
        raise ValueError(f"from_run {str(run)!r} is not a finished `lotus pipeline` run folder: missing {missing}")
    run_config = PipelineConfig.from_dict(json.loads(saved.read_text()))
    if config is None:
        return run_config, dense_ckpt, tickets_ckpt
    def fields(c: PipelineConfig) -> dict:
        d = c.to_dict()
        # The train recipe as resolved (defaults filled), without fields that do not change the models.
        d["train"] = {k: v for k, v in c.train_config.to_dict().items() if k not in ("progress", "device")}
        return {k: d[k] for k in _STUDENT_FIELDS}

    a, b = fields(config), fields(run_config)
    differ = [k for k in _STUDENT_FIELDS if a[k] != b[k]]
    if differ:
        raise ValueError(
            f"config differs from the run in {str(run)!r} on {differ}, which its dense and ticket models were made with; "
            "only pruning and fine-tuning settings may change"
        )
    return config, dense_ckpt, tickets_ckpt


def run_ablation(config: PipelineConfig | None, out_dir, *, from_run=None, variants=None, log=print) -> dict:
    """Run ``variants`` (default all of VARIANTS) into ``out_dir``; returns the summary (ablation.json, report.md).

    config: the pipeline's settings (target_sparsity, keep_ratio, ISP and
    fine-tuning epochs...). from_run: a ``lotus pipeline`` run folder whose
    dense and ticket models are reused (config may then be None: the run's
    own); without it, those two are trained first, as the pipeline does.
    """
    names = check_variants(variants)
    if from_run is not None:
        config, dense_ckpt, tickets_ckpt = _load_run(from_run, config)
    elif not isinstance(config, PipelineConfig):
        raise TypeError(f"config must be a PipelineConfig (or None with from_run), got {type(config).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = config.train_config
    train_set, eval_sets = build_data(base)
    test_set = eval_sets["test"]
    val_set = eval_sets.get("val", test_set)
    mode, keep = config.ticket_mode, config.keep_ratio
    started = time.perf_counter()

    if from_run is not None:
        log(f"dense and ticket models from {from_run}")
        dense = model_from_checkpoint(dense_ckpt)
        student = prepare_student_(model_from_checkpoint(tickets_ckpt), keep, mode)
        selector = TicketSelector(dense, keep, config.ticket_layer)
        hooks = ticket_hooks(selector, mode, train_set=train_set)
    else:
        config = dataclasses.replace(config, random_control=False)
        dense_run, selector, hooks, tickets_run, _ = train_selector_and_students(config, out, train_set, test_set, log)
        dense, student = dense_run.model, tickets_run.model

    summary: dict = {
        "dataset": base.dataset, "model": base.model, "keep_ratio": keep, "target_sparsity": config.target_sparsity,
        "from_run": None if from_run is None else str(from_run), "environment": environment(resolve_device(base.device, None)),
        "config": config.to_dict(), "rows": [],
    }
    dense_acc = evaluate(dense, test_set, amp=base.amp)["acc"]
    student_acc = evaluate_both(student, test_set, hooks, base.amp)
    summary["reference"] = {"dense": {"acc_all_patches": dense_acc}, "tickets": student_acc}
    log(f"dense {dense_acc:.4f}; ticket student {student_acc['acc_all_patches']:.4f} all patches, {student_acc['acc_tickets']:.4f} on tickets")

    knee = essential_sparsity_sweep(dense, val_set, config.es_sparsities, max_drop=config.es_max_drop).knee
    summary["essential_sparsity_knee"] = knee
    pruned: dict[tuple, tuple[nn.Module, dict]] = {}

    def pruned_model(v: Variant) -> tuple[nn.Module, dict]:
        """The pruned model (pruned weights exact zeros, no patch dropping) and its masks; each kind made once."""
        if v.pruned_key in pruned:
            return pruned[v.pruned_key]
        model = copy.deepcopy(dense if v.source == "dense" else student)
        if v.pruner == "one_shot":
            masks = one_shot_masks(model, config.target_sparsity)
            apply_masks_(model, masks)
        elif v.isp_on_tickets:
            # The student keeps its patch dropping so that ingredients train, and rounds are judged, on tickets.
            on_tickets = hooks[2]
            accuracy = lambda m: evaluate(m, val_set, amp=base.amp, token_hook=on_tickets)["acc"]  # noqa: E731
            masks = config.instant_soup.run(model, train_set, accuracy, base, knee=knee, token_hook=on_tickets).masks
        else:
            masks = config.instant_soup.run(disable_patch_dropping_(model), train_set, val_set, base, knee=knee).masks
        pruned[v.pruned_key] = (disable_patch_dropping_(model), masks)
        return model, masks

    histories: dict[str, list] = {}
    ft = config.ticket_config
    for i, name in enumerate(names, 1):
        v = VARIANTS[name]
        log(f"[{i}/{len(names)}] {name}: {v.description}")
        t0 = time.perf_counter()
        model, masks = pruned_model(v)
        model = copy.deepcopy(model)
        if v.selector == "pruned":
            vhooks = ticket_hooks(TicketSelector(model, keep, config.ticket_layer), mode, train_set=train_set)
        else:
            vhooks = hooks
        epochs = 0
        if v.recover:
            epochs = config.finetune_epochs + (config.ticket_epochs if v.source == "dense" else 0)
            hold_masks_(model, masks)
            prepare_student_(model, keep, mode)
            run = train_on_tickets(stage_config(ft, epochs=epochs), out / name, model, vhooks, test_set, log)
            histories[name] = run.history
            model = release_masks_(disable_patch_dropping_(run.model))
        prepare_student_(model, keep, mode)
        acc = evaluate_both(model, test_set, vhooks, base.amp)
        summary["rows"].append({
            "variant": name, **dataclasses.asdict(v), "recovery_epochs": epochs,
            "mask_sparsity": global_sparsity(masks), "weight_sparsity": weight_sparsity(model), **acc,
            "drop_vs_dense_on_tickets": dense_acc - acc["acc_tickets"], "wall_s": time.perf_counter() - t0,
        })
        log(f"  {name}: {acc['acc_all_patches']:.4f} all patches, {acc['acc_tickets']:.4f} on tickets")
    overlap = {"random_expected": expected_random_overlap(keep, dense.patch_embed.num_patches)}
    # How far pruning moves the tickets: each pruned dense model as a selector against the dense one.
    for (source, pruner, _), (model, _) in pruned.items():
        if source == "dense":
            overlap[f"dense_{pruner}"] = _selector_overlap(selector, TicketSelector(model, keep, config.ticket_layer), test_set)
    summary["selector_overlap"] = overlap
    summary["wall_s"] = time.perf_counter() - started
    (out / "ablation.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    write_ablation_report(out, summary, histories)
    log(f"report: {out / 'report.md'}")
    return summary


@torch.no_grad()
def _selector_overlap(a: TicketSelector, b: TicketSelector, dataset, limit: int = 2000, batch_size: int = 250) -> float:
    """Mean fraction of a's tickets that b also picks, over the first ``limit`` images of ``dataset`` (un-augmented)."""
    device = next(a.model.parameters()).device
    b.to(device)
    seen, total = 0, 0.0
    for x, _ in DeviceLoader(dataset, batch_size, shuffle=False, augment=False, device=device):
        x = x[: limit - seen]
        total += ticket_overlap(a(x), b(x), a.num_patches) * x.shape[0]
        seen += x.shape[0]
        if seen >= limit:
            break
    return total / seen


def rewrite_ablation_report(out) -> Path:
    """report.md (and recovery.png) of a finished ablation folder again, from its ablation.json and metrics."""
    out = Path(out)
    summary = json.loads((out / "ablation.json").read_text())
    histories = {}
    for r in summary["rows"]:
        metrics = out / r["variant"] / "metrics.jsonl"
        if r["recovery_epochs"] and metrics.is_file():
            histories[r["variant"]] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return write_ablation_report(out, summary, histories)


def write_ablation_report(out: Path, summary: dict, histories: dict) -> Path:
    ref = summary["reference"]
    lines = [
        f"# Tickets x pruning: where a collapse would come from ({summary['model']} on {summary['dataset']})",
        f"Keep ratio {summary['keep_ratio']}, target sparsity {summary['target_sparsity']:.0%}, Essential Sparsity knee "
        f"{summary['essential_sparsity_knee']:.0%}. Dense model: {ref['dense']['acc_all_patches']:.4f}; ticket student (unpruned): "
        f"{ref['tickets']['acc_all_patches']:.4f} all patches, {ref['tickets']['acc_tickets']:.4f} on tickets. Test set accuracies.",
        "| variant | pruned model | pruner | ISP ingredients on | tickets picked by | epochs on tickets after pruning | weight sparsity "
        "| acc, all patches | acc, on tickets | on tickets vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['variant']} | {'ticket student' if r['source'] == 'tickets' else 'dense'} | {r['pruner']} | "
            f"{'' if r['pruner'] != 'isp' else ('tickets' if r['isp_on_tickets'] else 'all patches')} | "
            f"{'dense selector' if r['selector'] == 'dense' else 'the pruned model'} | {r['recovery_epochs']} | {r['weight_sparsity']:.1%} | "
            f"{r['acc_all_patches']:.4f} | {r['acc_tickets']:.4f} | {-100 * r['drop_vs_dense_on_tickets']:+.2f} pts |"
        )
    lines += ["", "Variants:", *[f"- `{r['variant']}`: {r['description']}" for r in summary["rows"]]]
    overlap = summary["selector_overlap"]
    if len(overlap) > 1:
        lines += ["", "## How much pruning moves the tickets",
                  "Fraction of the dense selector's tickets that the pruned model, as a selector, still picks "
                  f"(first 2,000 test images; two random selections share {overlap['random_expected']:.2f}):", ""]
        lines += [f"- the dense model after {k.removeprefix('dense_').replace('_', '-')} pruning: {v:.3f}" for k, v in overlap.items() if k != "random_expected"]
    parts = ["\n".join(lines)]
    if histories:
        plot_stage_accuracy(
            [(name, history, 0) for name, history in histories.items()], out / "recovery.png",
            f"Recovery on tickets after pruning to {summary['target_sparsity']:.0%}", xlabel="epochs of recovery (fine-tuning on tickets, mask held)",
        )
        parts.append("![recovery per epoch](recovery.png)")
        for name, history in histories.items():
            parts += [f"### {name}", metrics_table(history, [k for k in ("epoch", "train_loss", "test_acc", "test_tickets_acc") if any(k in r for r in history)])]
    env = summary["environment"]
    parts.append(f"Run on {env.get('device')} ({summary['wall_s'] / 60:.1f} min); configuration in ablation.json.")
    path = out / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
