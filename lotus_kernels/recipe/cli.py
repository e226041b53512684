"""The ``lotus`` command (also ``python -m lotus_kernels``; ``lotus_kernels.recipe.cli:main``).

    lotus train  [--config FILE.yaml|.json] [--data synthetic|cifar10] [--preset micro|lite|tiny|small | --model TIMM]
                 [--epochs N] [--batch-size N] [--pretrained] [--init-from FILE] [--set key=value ...]
                 [--out DIR] [--resume | --overwrite] [--profile auto|quick|fast|full]
    lotus eval   --checkpoint FILE [--split test|train|val] [--set key=value ...]
    lotus report RUN_DIR
    lotus info   [--json]
    lotus bench-report FILE.json ... [--out DIR] | --compare [OLD.json] NEW.json | --compare-each NEW.json ... [--threshold 0.10]
    lotus pipeline [--config FILE] [--data ...] [--preset ...] [--epochs N] [--set key=value ...] [--demo] [--out DIR] [--resume | --overwrite]
                   [--profile auto|quick|fast|full]
    lotus ablate  (--from PIPELINE_RUN | --config FILE | --demo) [--variants NAME ...] [--set key=value ...] [--out DIR]
    lotus tickets --checkpoint DENSE.pt [--keep-ratio 0.5] [--mode online|fixed|random] [--epochs N] [--out DIR] [--resume | --overwrite]
    lotus prune   --checkpoint DENSE.pt --out DIR [--method instant-soup|one-shot|essential] [--sparsity 0.5]
                  [--pattern unstructured|2:4|block] [--block-size 32] [--es-max-drop 0.01] [--ingredients 5]
                  [--isp-epochs 1] [--isp-lr 1e-4] [--set key=value ...] [--overwrite]
    lotus finetune --checkpoint PRUNED.pt --out DIR [--epochs 5] [--lr LR]
                  [--keep-ratio R [--mode online|fixed --selector DENSE.pt | --mode random]] [--set key=value ...] [--overwrite]
    lotus export  --checkpoint FILE.pt --out MODEL.safetensors
    lotus gpu-check [--budget 480] [--out DIR] [--steps NAME ...] [--resume]

A run folder (``--out``; default ``runs/<model>-<dataset>-<UTC time>``) holds
the resolved config.json, checkpoints/, metrics.jsonl, report.md and
curves.png. Configuration: a YAML or JSON file of TrainConfig fields, then
the flags, then ``--set`` overrides (values parsed as JSON where they parse: ``--set epochs=5
--set amp=none --set lr=3e-4``). ``--resume`` continues the run in ``--out``
from its last checkpoint with its saved config (``--set epochs=N`` may extend
it); the result equals an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

COMMANDS = ("train", "eval", "report", "info", "bench-report", "pipeline", "ablate", "tickets", "prune", "finetune", "export", "gpu-check")

# `lotus pipeline --demo`: the whole method on the embedded synthetic set in a few minutes on a CPU.
DEMO_PIPELINE = {
    "train": {
        "model": "vit_micro_cifar", "dataset": "synthetic", "synthetic_train": 4000, "synthetic_test": 1000, "holdout": 500,
        "epochs": 6, "batch_size": 64, "lr": 2e-3, "warmup_epochs": 0.5, "progress": False,
    },
    "ticket_epochs": 2, "finetune_epochs": 2, "target_sparsity": 0.5, "es_sparsities": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "ingredients": 3, "subset_fraction": 0.1, "isp_lr": 5e-4, "patterns": ["unstructured", "2:4"], "timing_batch": 64,
}


def parse_overrides(items: list[str]) -> dict:
    """["key=value", ...] -> {key: value}; a value is JSON when it parses as JSON, else the raw string."""
    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides[key.strip()] = value
    return overrides


def load_config_file(path) -> dict:
    """A YAML (.yaml/.yml) or JSON (.json) mapping of TrainConfig fields."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    else:
        raise ValueError(f"config file must end in .yaml, .yml or .json, got {path.name}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of fields, got {type(data).__name__}")
    return data


# --preset short names -> engine.presets.PRESETS entries.
PRESET_ALIASES = {"micro": "vit_micro_cifar", "lite": "vit_lite_cifar", "tiny": "vit_tiny_cifar", "small": "vit_small_cifar"}


def flag_fields(args) -> dict:
    """TrainConfig fields given as flags (--data, --preset, ...); None means not given."""
    if args.preset is not None and args.model is not None:
        raise ValueError("give --preset or --model, not both")
    model = PRESET_ALIASES.get(args.preset, args.preset) if args.preset is not None else args.model
    fields = {
        "model": model,
        "dataset": args.data,
        "data_path": args.data_path,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "init_from": args.init_from,
        "pretrained": True if args.pretrained else None,
    }
    return {k: v for k, v in fields.items() if v is not None}


PROFILES = ("auto", "quick", "fast", "full")


def apply_profile(profile: str, fields: dict, command: str = "train") -> dict:
    """``fields`` (TrainConfig fields) completed by the training profile: "quick" fills every field the user did not
    give from ``engine.presets.quick_recipe()`` (about a minute on a CPU); "fast" from ``engine.presets.fast_recipe()``
    (CIFAR-10 accuracy per second on a GPU: vit_lite_cifar, batch 512, compiled step, EMA, flip TTA);
    "full" leaves TrainConfig's defaults; "auto" is "quick" for the synthetic set on a CPU, "fast"
    for CIFAR-10 on a CUDA device, and "full" otherwise. Prints what it filled (``lotus <command>: ...``)."""
    import torch

    from .engine.presets import fast_recipe, quick_recipe
    from .engine.train_config import TrainConfig

    if profile not in PROFILES:
        raise ValueError(f"--profile must be one of {PROFILES}, got {profile!r}")
    if profile == "auto":
        dataset = fields.get("dataset", TrainConfig.dataset)
        device = str(fields.get("device", TrainConfig.device))
        on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        profile = "quick" if dataset == "synthetic" and on_cpu else "fast" if dataset == "cifar10" and not on_cpu else "full"
    if profile == "full":
        return fields
    recipe, what = (quick_recipe(), "about a minute on a CPU") if profile == "quick" else (fast_recipe(), "CIFAR-10 accuracy per second on a GPU")
    filled = {k: v for k, v in recipe.items() if k not in fields}
    if filled:
        shown = ", ".join(f"{k}={v}" for k, v in filled.items())
        print(f"lotus {command}: {profile} profile ({what}): {shown}; --profile full for TrainConfig's defaults", file=sys.stderr)
    return {**fields, **filled}


def default_run_dir(config) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.model}-{config.dataset}-{stamp}"


def _train(args) -> int:
    from .engine.loop import train
    from .engine.train_config import TrainConfig
    from .reporting.report import write_report

    overrides = parse_overrides(args.set)
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out, the run folder to continue")
        saved = Path(args.out) / "config.json"
        if not saved.exists():
            raise ValueError(f"--resume: {saved} does not exist; is {args.out} a run folder?")
        fields = {**json.loads(saved.read_text()), **(load_config_file(args.config) if args.config else {}), **flag_fields(args), **overrides}
    else:
        fields = {**(load_config_file(args.config) if args.config else {}), **flag_fields(args), **overrides}
        fields = apply_profile(args.profile, fields)
    config = TrainConfig.from_dict(fields)
    out = Path(args.out) if args.out else default_run_dir(config)
    result = train(config, out, resume=args.resume, overwrite=args.overwrite)
    report = write_report(result.out_dir)
    last = result.history[-1] if result.history else {}
    print(json.dumps({k: last[k] for k in ("epoch", "test_acc", "test_loss", "val_acc") if k in last}))
    print(f"run folder: {result.out_dir}\nreport: {report}")
    return 0


def _eval_model(path: Path, overrides: dict):
    """(model, TrainConfig for the data) of a checkpoint (.pt) or a sparse safetensors file (lotus export / save_sparse)."""
    from .engine.build import build_model
    from .engine.checkpoint import load_checkpoint, model_from_checkpoint
    from .engine.train_config import TrainConfig

    if path.is_dir():
        raise ValueError(f"--checkpoint {path} is a folder; give a checkpoint file such as {path / 'checkpoints' / 'last.pt'} or a .safetensors export")
    if path.suffix != ".safetensors":
        checkpoint = load_checkpoint(path)
        config = TrainConfig.from_dict({**checkpoint["config"], **overrides})
        return model_from_checkpoint(path), config  # sparsified models come back with their SparseLinear layers
    from lotus_kernels.serialization import load_sparse, read_header

    header = read_header(path)
    if "train_config" in header:  # lotus export: the run's own config says how to build the model and the data
        config = TrainConfig.from_dict({**header["train_config"], **overrides})
        return load_sparse(build_model(TrainConfig.from_dict(header["train_config"]), header["num_classes"]), path), config
    # save_sparse of any timm model: the file names the model; the data comes from --set (dataset, data_path, ...).
    model = load_sparse(None, path)
    return model, TrainConfig.from_dict({"model": (header.get("model") or {}).get("name", TrainConfig.model), **overrides})


def _eval(args) -> int:
    from .engine.build import build_data
    from .engine.evaluation import evaluate

    path = Path(args.checkpoint)
    model, config = _eval_model(path, parse_overrides(args.set))
    train_set, eval_sets = build_data(config)
    eval_sets["train"] = train_set
    if args.split not in eval_sets:
        raise ValueError(f"--split {args.split!r} is not available; this run has {sorted(eval_sets)}")
    dataset = eval_sets[args.split]
    try:
        metrics = evaluate(model, dataset, batch_size=args.batch_size, amp=config.amp)
    except (RuntimeError, AssertionError) as e:  # e.g. a 224-pixel timm model given 32-pixel CIFAR images
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"the model of {path} cannot run {dataset.name} ({type(e).__name__}: {first}); check --set dataset / the model") from None
    print(json.dumps({"checkpoint": str(args.checkpoint), "split": args.split, "dataset": dataset.name, **metrics}))
    return 0


def _report(args) -> int:
    from .reporting.report import write_report

    print(write_report(args.run_dir))
    return 0


def _info(args) -> int:
    from lotus_kernels.info import main as info_main

    return info_main(["--json"] if args.json else [])


def _bench_report(args) -> int:
    from lotus_kernels.recipe.tools.bench_report import run

    return run(
        args.files, out=args.out, compare=args.compare, threshold=args.threshold, baseline_dir=args.baseline_dir,
        compare_each_files=args.compare_each,
    )


def _pipeline_fields(args, base: dict | None = None) -> dict:
    """PipelineConfig fields: ``base`` (default: the demo's with --demo, else none), then --config, the train flags, --set."""
    fields = json.loads(json.dumps(DEMO_PIPELINE if args.demo else (base or {"train": {}})))
    fields.setdefault("train", {})
    if args.config:
        loaded = load_config_file(args.config)
        fields.update({k: v for k, v in loaded.items() if k != "train"})
        fields["train"] = {**fields.get("train", {}), **loaded.get("train", {})}
    fields["train"].update(flag_fields(args))
    for key, value in parse_overrides(args.set).items():
        if key.startswith("train."):
            fields["train"][key[len("train."):]] = value
        else:
            fields[key] = value
    # The dense run's recipe, as `lotus train` picks it; --demo (and a run reused by --from) bring their
    # own, so "auto" leaves them as they are. An explicit --profile fills what they leave out.
    profile = getattr(args, "profile", "full")
    if profile != "auto" or not (args.demo or base is not None):
        fields["train"] = apply_profile(profile, fields["train"], args.command)
    return fields


def _pipeline(args) -> int:
    from .pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig.from_dict(_pipeline_fields(args))  # every check runs here, before any training
    out = Path(args.out) if args.out else Path("runs") / f"pipeline-{config.train_config.model}-{config.train_config.dataset}"
    summary = run_pipeline(config, out, resume=args.resume, overwrite=args.overwrite)
    print((out / "report.md").read_text() if args.print_report else json.dumps(summary["rows"], indent=2))
    print(f"lotus pipeline: results in {out} (report.md, summary.json, model.safetensors)", file=sys.stderr)
    return 0


def _ablate(args) -> int:
    from .ablation import check_variants, run_ablation
    from .pipeline import PipelineConfig

    variants = check_variants(args.variants)
    if args.from_run:
        if args.demo:
            raise ValueError("--from reuses a pipeline run's settings; --demo cannot be combined with it")
        saved = Path(args.from_run) / "pipeline_config.json"
        if not saved.is_file():
            raise ValueError(f"--from {args.from_run!r} is not a `lotus pipeline` run folder: {saved} does not exist")
        base = json.loads(saved.read_text())
    elif not (args.config or args.demo):
        raise ValueError("give --from PIPELINE_RUN (reuse its dense and ticket models), --config FILE or --demo")
    else:
        base = None
    config = PipelineConfig.from_dict(_pipeline_fields(args, base))
    out = Path(args.out) if args.out else Path("runs") / f"ablation-{config.train_config.model}-{config.train_config.dataset}"
    summary = run_ablation(config, out, from_run=args.from_run, variants=variants)
    print((out / "report.md").read_text())
    print(f"lotus ablate: results in {out} (report.md, ablation.json)", file=sys.stderr)
    return 0 if summary["rows"] else 1


def _tickets(args) -> int:
    import copy

    from .engine.build import build_data
    from .engine.checkpoint import load_checkpoint, model_from_checkpoint
    from .engine.train_config import TrainConfig
    from .method.tickets import TicketSelector, prepare_student_, ticket_hooks
    from .stages import stage_config, train_on_tickets

    if not 0 < args.keep_ratio <= 1:
        raise ValueError(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}")
    checkpoint = load_checkpoint(args.checkpoint)
    config = TrainConfig.from_dict({**checkpoint["config"], **parse_overrides(args.set)})
    config = stage_config(config, epochs=args.epochs, warmup_epochs=0.0, init_from=None)
    dense = model_from_checkpoint(args.checkpoint)
    selector = TicketSelector(dense, args.keep_ratio, args.layer if args.layer == "rollout" else int(args.layer)) if args.mode != "random" else None
    student = prepare_student_(copy.deepcopy(dense), args.keep_ratio, args.mode)
    train_set, eval_sets = build_data(config)
    out = Path(args.out) if args.out else Path("runs") / f"tickets-{args.mode}-{args.keep_ratio}"
    if (out / "checkpoints" / "last.pt").exists() and not (args.resume or args.overwrite):
        raise ValueError(f"--out {out} already holds a run: --resume continues it, --overwrite starts afresh over it")
    if args.resume and not (out / "checkpoints" / "last.pt").exists():
        raise ValueError(f"--resume but --out {out} holds no run ({out / 'checkpoints' / 'last.pt'} does not exist)")
    hooks = ticket_hooks(selector, args.mode, train_set=train_set)
    result = train_on_tickets(config, out, student, hooks, eval_sets["test"], print, resume=args.resume)
    print(json.dumps({k: result.history[-1].get(k) for k in ("epoch", "test_acc", "test_tickets_acc")}))
    print(f"lotus tickets: run in {out}", file=sys.stderr)
    return 0


def _prune(args) -> int:
    from .stages import prune_checkpoint

    # The sweep's and Instant Soup's settings the user left out take prune_checkpoint's defaults (the recipe's, kept once).
    given = {
        "es_sparsities": args.es_sparsities, "es_max_drop": args.es_max_drop, "ingredients": args.ingredients, "subset_fraction": args.subset_fraction,
        "prune_step": args.prune_step, "vote_threshold": args.vote_threshold, "ingredient_epochs": args.isp_epochs, "isp_lr": args.isp_lr,
    }
    result = prune_checkpoint(
        args.checkpoint, args.out, method=args.method, sparsity=args.sparsity, pattern=args.pattern, block_size=args.block_size,
        isp_start=args.isp_start, overrides=parse_overrides(args.set), overwrite=args.overwrite,
        **{k: v for k, v in given.items() if v is not None},
    )
    split = result["eval_split"]
    line = {k: result[k] for k in ("method", "pattern", "sparsity", "pruned", "prunable", "eval_split")}
    line.update({f"dense_{split}_acc": result["accuracy"]["dense"][split], f"pruned_{split}_acc": result["accuracy"]["pruned"][split]})
    if "essential_sparsity" in result:
        line["knee"] = result["essential_sparsity"]["knee"]
    print(json.dumps(line))
    print(f"pruned checkpoint: {Path(args.out) / result['checkpoint']}\nsummary: {Path(args.out) / 'prune.json'}")
    return 0


def _finetune(args) -> int:
    from .stages import finetune_checkpoint

    if args.layer != "rollout" and not args.layer.lstrip("-").isdigit():
        raise ValueError(f"--layer must be a block index or 'rollout', got {args.layer!r}")
    if args.keep_ratio is None and args.mode is not None:
        raise ValueError(f"--mode {args.mode} chooses tickets: give --keep-ratio too, or leave --mode out to train on all patches")
    result = finetune_checkpoint(
        args.checkpoint, args.out, epochs=args.epochs, lr=args.lr, keep_ratio=args.keep_ratio, selector_checkpoint=args.selector,
        mode=args.mode or "online", layer=args.layer if args.layer == "rollout" else int(args.layer), overrides=parse_overrides(args.set),
        overwrite=args.overwrite,
    )
    print(json.dumps({**result["metrics"], "sparsity": result["sparsity"]}))
    print(f"run folder: {args.out}\ncheckpoint: {result['checkpoint']}\nreport: {result['report']}")
    return 0


def _export(args) -> int:
    from .engine.checkpoint import load_checkpoint, model_from_checkpoint
    from .stages import export_safetensors

    checkpoint = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(args.checkpoint)
    path = export_safetensors(model, args.out, {"train_config": checkpoint["config"], "num_classes": checkpoint["num_classes"]})
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")
    return 0


def _add_train_flags(parser) -> None:
    parser.add_argument("--config", help="YAML or JSON file (train: TrainConfig fields; pipeline: PipelineConfig, train fields under 'train')")
    parser.add_argument("--data", choices=("synthetic", "cifar10"), help="dataset (config field dataset)")
    parser.add_argument("--data-path", help="CIFAR-10 source: pickle dir, image folder or .tar/.tar.gz (else $LOTUS_CIFAR10)")
    parser.add_argument("--preset", help=f"model preset: {', '.join(PRESET_ALIASES)} (or a full preset name)")
    parser.add_argument("--model", help="any timm model name (instead of --preset)")
    parser.add_argument("--epochs", type=int, help="training epochs (pipeline: of the dense model)")
    parser.add_argument("--batch-size", type=int, help="images per optimizer step, over all GPUs")
    parser.add_argument("--pretrained", action="store_true", help="timm hub weights (needs the hub to be reachable)")
    parser.add_argument("--init-from", metavar="FILE", help="initial weights: a lotus checkpoint or a state_dict file")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any field (repeatable; wins over flags; pipeline: train.KEY=VALUE for training fields)",
    )


def _add_profile_flag(parser, what: str) -> None:
    parser.add_argument(
        "--profile", choices=PROFILES, default="auto",
        help=f"fills the {what} not given. quick: a one-minute CPU recipe; fast: CIFAR-10 accuracy per second on a GPU "
        "(engine.presets.fast_recipe: vit_lite_cifar, batch 512, compiled step, EMA, flip TTA); full: TrainConfig's defaults; "
        "auto (default): quick for the synthetic set on a CPU, fast for CIFAR-10 on CUDA, else full",
    )


def _version() -> str:
    from lotus_kernels import __version__

    return __version__


def _add_resume_flags(parser, resume_help: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help=resume_help)
    group.add_argument("--overwrite", action="store_true", help="start afresh in an --out that already holds a run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lotus", description="LOTUS sparse ViTs: train, evaluate, report.")
    parser.add_argument("--version", action="version", version=f"lotus_kernels {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    train = commands.add_parser("train", help="train a ViT (config file + --set overrides)")
    _add_train_flags(train)
    train.add_argument("--out", help="run folder (default runs/<model>-<dataset>-<time>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="start afresh in an --out that already holds a run")
    _add_profile_flag(train, "training fields")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="a run's checkpoint (.pt) or a model exported with lotus export (.safetensors)")
    evaluate.add_argument("--split", default="test", choices=("test", "val", "train"), help="which data (val: the run's holdout; default test)")
    evaluate.add_argument("--batch-size", type=int, default=512, help="images per forward (default 512)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. data_path")
    evaluate.set_defaults(func=_eval)

    report = commands.add_parser("report", help="(re)write report.md and curves.png of a run folder")
    report.add_argument("run_dir", help="a run folder (config.json, metrics.jsonl)")
    report.set_defaults(func=_report)

    info = commands.add_parser("info", help="what was built and what runs here")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)

    bench = commands.add_parser(
        "bench-report", help="markdown tables and plots of pytest-benchmark JSON files, or --compare two runs (exit 1 on a regression)"
    )
    bench.add_argument("files", nargs="*", metavar="FILE.json", help="pytest --benchmark-json files")
    bench.add_argument("--out", help="output folder for bench_report.md and the PNGs (default bench/results)")
    bench.add_argument(
        "--compare", nargs="+", metavar="FILE.json",
        help="OLD.json NEW.json, or NEW.json alone (baseline: newest committed file of the same device in --baseline-dir)",
    )
    bench.add_argument(
        "--compare-each", nargs="+", metavar="NEW.json",
        help="each file against its own baseline in --baseline-dir; one without a baseline is reported and passes",
    )
    bench.add_argument("--threshold", type=float, default=0.10, help="--compare/--compare-each: flag p50 more than this fraction slower (default 0.10)")
    bench.add_argument("--baseline-dir", default="bench/results", help="--compare with one file, --compare-each: where committed runs live")
    bench.set_defaults(func=_bench_report)

    pipeline = commands.add_parser("pipeline", help="the LOTUS method end to end: dense, tickets, ES, ISP, pattern, fine-tune, export")
    _add_train_flags(pipeline)
    pipeline.add_argument("--demo", action="store_true", help="start from the demo settings (synthetic data, minutes on a CPU)")
    _add_profile_flag(pipeline, "dense run's training fields (the later stages reuse its recipe); auto leaves --demo's alone")
    pipeline.add_argument("--print-report", action="store_true", help="print report.md at the end")
    pipeline.add_argument("--out", help="output folder (default runs/pipeline-<model>-<dataset>)")
    _add_resume_flags(pipeline, "continue the pipeline run in --out (same config): finished stages are read back, a stage cut short continues")
    pipeline.set_defaults(func=_pipeline)

    ablate = commands.add_parser(
        "ablate", help="tickets x pruning combined in several ways (order, pruner, selector, recovery): where a collapse comes from",
    )
    _add_train_flags(ablate)
    ablate.add_argument("--from", dest="from_run", metavar="RUN", help="a `lotus pipeline` run folder: reuse its dense and ticket models and settings")
    ablate.add_argument("--demo", action="store_true", help="start from the pipeline demo settings (synthetic data)")
    ablate.add_argument("--variants", nargs="+", metavar="NAME", help="which variants (default all; see lotus_kernels.recipe.ablation.VARIANTS)")
    ablate.add_argument("--out", help="output folder (default runs/ablation-<model>-<dataset>)")
    ablate.set_defaults(func=_ablate)

    tickets = commands.add_parser("tickets", help="fine-tune a dense checkpoint on its data lottery tickets (or random patches)")
    tickets.add_argument("--checkpoint", required=True, help="the dense model (also the selector)")
    tickets.add_argument("--keep-ratio", type=float, default=0.5, help="fraction of the patches each image keeps (default 0.5)")
    tickets.add_argument(
        "--mode", choices=("online", "fixed", "random"), default="online",
        help="online: selector on each augmented batch; fixed: scored once, mapped through crops/flips; random: the control",
    )
    tickets.add_argument("--layer", default="-1", help="selector block index, or 'rollout'")
    tickets.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs on tickets (default 5)")
    tickets.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training field, e.g. lr")
    tickets.add_argument("--out", help="run folder (default runs/tickets-<mode>-<keep ratio>)")
    _add_resume_flags(tickets, "continue the run in --out from its last checkpoint")
    tickets.set_defaults(func=_tickets)

    prune = commands.add_parser("prune", help="prune a dense checkpoint into SparseLinear layers (one-shot, Essential Sparsity or Instant Soup)")
    prune.add_argument("--checkpoint", required=True, help="the dense model")
    prune.add_argument("--out", required=True, help="output folder: pruned.pt, prune.json, plots")
    prune.add_argument("--method", default="instant-soup", help="instant-soup (default) | one-shot | essential (prunes at the knee)")
    prune.add_argument("--sparsity", type=float, default=0.5, help="target in [0, 1); essential: the sweep's upper bound (default 0.5)")
    prune.add_argument("--pattern", default="unstructured", help="unstructured (default) | 2:4 (needs --sparsity 0.5) | block")
    prune.add_argument("--block-size", type=int, default=32, help="block pattern: square blocks of this side (default 32)")
    prune.add_argument("--es-sparsities", type=float, nargs="+", default=None, metavar="S", help="Essential Sparsity sweep grid (default 0.1 ... 0.9)")
    prune.add_argument(
        "--es-max-drop", "--max-drop", type=float, default=None,
        help="knee: largest sparsity within this accuracy fraction of dense (default 0.01; --max-drop: its old name)",
    )
    prune.add_argument("--ingredients", type=int, default=None, help="ISP ingredients per round (default 5)")
    prune.add_argument("--subset-fraction", type=float, default=None, help="ISP: each ingredient's share of the training set (default 0.1)")
    prune.add_argument("--prune-step", type=float, default=None, help="ISP: fraction of the kept weights pruned per round (default 0.1)")
    prune.add_argument("--vote-threshold", type=int, default=None, help="ISP: keep a weight kept by at least this many ingredients (default 1: union)")
    prune.add_argument("--isp-epochs", type=int, default=None, help="ISP: epochs per ingredient on its subset (default 1)")
    prune.add_argument("--isp-lr", type=float, default=None, help="ISP: ingredient learning rate (default 1e-4)")
    prune.add_argument("--isp-start", default="knee", help="ISP starts from the Essential Sparsity knee (default) or 'dense'")
    prune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field of the checkpoint, e.g. data_path")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing pruned.pt in --out")
    prune.set_defaults(func=_prune)

    finetune = commands.add_parser("finetune", help="fine-tune a pruned checkpoint with its mask fixed (all patches or data lottery tickets)")
    finetune.add_argument("--checkpoint", required=True, help="the pruned model (lotus prune's pruned.pt)")
    finetune.add_argument("--out", required=True, help="run folder")
    finetune.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (default 5)")
    finetune.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the checkpoint's lr * 0.5)")
    finetune.add_argument("--keep-ratio", type=float, default=None, help="train on this fraction of the patches (tickets); default all patches")
    finetune.add_argument(
        "--mode", default=None, help="with --keep-ratio: online (tickets of --selector, default) | fixed (scored once) | random (control)",
    )
    finetune.add_argument("--selector", default=None, metavar="DENSE.pt", help="online tickets: the dense checkpoint that picks them")
    finetune.add_argument("--layer", default="-1", help="selector block index, or 'rollout'")
    finetune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training field (wins over the flags)")
    finetune.add_argument("--overwrite", action="store_true", help="start afresh in an --out that already holds a run")
    finetune.set_defaults(func=_finetune)

    export = commands.add_parser("export", help="a checkpoint as compact safetensors (SparseLinear layers stay compact)")
    export.add_argument("--checkpoint", required=True, help="a run's or lotus prune's checkpoint (.pt)")
    export.add_argument("--out", required=True, help="MODEL.safetensors")
    export.set_defaults(func=_export)

    gpu = commands.add_parser(
        "gpu-check", help="what a short GPU lease must learn, in priority order, each step in its own process under one budget",
        description="Steps in priority order (build, env, speed-block, speed-attn, cusparselt, speed-2to4, speed-vit, "
        "correctness, correctness-cusparselt, tests, cifar10), each in its own subprocess under a deadline carved from "
        "--budget; results go to at most 8 files in --out (summary.md, gpu_check.json, cases.jsonl, tests.jsonl, steps.log).",
    )
    gpu.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    gpu.add_argument("--out", help="output folder (default $OUT, else runs/gpu-check-<UTC time>)")
    gpu.add_argument("--steps", nargs="+", metavar="NAME", help="run only these steps (in their priority order)")
    gpu.add_argument("--resume", action="store_true", help="keep --out's earlier results; the tests step skips tests that passed there")
    gpu.set_defaults(func=_gpu_check)
    return parser


def _gpu_check(args) -> int:
    import os

    from lotus_kernels.recipe.tools.gpu_check import run

    out = args.out or os.environ.get("OUT") or f"runs/gpu-check-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    command = f"lotus gpu-check --budget {args.budget:g} --out {out}" + (f" --steps {' '.join(args.steps)}" if args.steps else "")
    command += " --resume" if args.resume else ""
    results = run(out, budget=args.budget, steps=args.steps, resume=args.resume, command=command)
    print(f"gpu-check: results in {out} (summary.md)")
    return 0 if all(r.status in ("passed", "skipped") for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        # Bad input: one clear line, not a traceback.
        print(f"lotus {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A path that cannot be read or written (missing folder, a file where a folder belongs, no permission, full disk).
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"lotus {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Checkpoints are written whole and renamed, so an interrupted run resumes from its last one (--resume).
        print(f"lotus {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
