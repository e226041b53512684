"""The training engine: ViTs on 32x32 images (CIFAR-10 or the synthetic set),
single process or DistributedDataParallel, resumable bit for bit.

``train(config, out_dir)`` builds a model (a preset from ``PRESETS`` or any
timm model name) unless one is passed in, trains it with AdamW (weight decay
on matrices only), a per-step linear-warmup + cosine learning rate, label
smoothing, optional mixup/cutmix, gradient clipping, AMP, an optional weight
EMA and torch.compile of the whole step (``config.compile``, on CUDA by
default), and writes into ``out_dir``:

- ``config.json``: the config (``TrainConfig.to_dict()``; feed it back to
  ``TrainConfig.from_dict``);
- ``metrics.jsonl``: one JSON object per epoch (see ``train``);
- ``checkpoints/last.pt`` (every ``checkpoint_every`` epochs and at the end)
  and ``checkpoints/best.pt`` (best val_acc with a holdout, else test_acc),
  written atomically (temp file in the same directory, fsync, os.replace).
  The pair stays consistent: best.pt is always the epoch last.pt's "best"
  record names. An improvement waits in ``best.pending.pt`` until last.pt is
  written with it (then renamed over best.pt); a resume promotes or drops a
  pending file by last.pt's record. Temp files a killed save left behind are
  removed by the next save.
- Every checkpoint loads with ``torch.load(weights_only=True)``, and nothing
  here loads one any other way (unpickling runs code): ``extra_state`` must
  hold tensors, numbers, strings, None and lists/tuples/dicts of them.

Every optimizer step is one ``train_step.TrainStep`` call, and ``train`` is
the package's only training loop: tickets, fine-tuning, the pipeline's stages
and Instant Soup's ingredients all call it (``out_dir=None`` trains in
memory, writing nothing; ``train_data`` / ``subset`` / ``eval_data`` choose
the data).

Reproducibility: the model is initialised after seeding with ``config.seed``;
the global RNGs (torch, numpy, python) are reseeded at the start of every
epoch from (seed, epoch, rank); the data order and crop/flip come from
``DeviceLoader`` seeded by (seed, epoch); mixup/cutmix draws come from a
generator seeded by (seed, epoch, step, rank); the learning rate is a pure
function of the global step. So nothing random carries over from one epoch to
the next except the weights and the optimizer state, both in the checkpoint:
on CPU, a run stopped after epoch k and resumed ends with exactly the weights
and metrics of an uninterrupted run.

Distributed: under torchrun (WORLD_SIZE > 1 in the environment) or with a
process group already initialised, every rank gets batch_size // world_size
samples of each global batch (DeviceLoader's rank/world_size sharding, so the
union of the ranks' batches is the single-process batch), gradients are
averaged by DDP, evaluation metrics are summed across ranks, and only rank 0
writes files and shows progress bars.

Nothing here queries the GPU at import.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import pathlib
import random
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from ..data import DeviceLoader, ImageSet
from ..data.image_set import describe
from ..seeding import derive_seed
from .build import build_data, build_model
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    RESUME_KEYS,
    check_checkpoint_keys,
    check_loads_weights_only,
    fsync_dir,
    load_checkpoint,
    load_init_weights,
    metrics_line,
    reconcile_best,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_json,
    write_metrics,
)
from .devices import resolve_amp_dtype, resolve_compile, resolve_device
from .distributed import all_reduce_sum, distributed_from_env, init_distributed
from .evaluation import evaluate
from .mixing import mix_batch
from .optim import adamw, lr_at_step
from .train_config import TrainConfig
from .train_step import TrainStep, WeightEMA

# Keys of a metrics line that measure wall time: they differ between otherwise identical runs.
TIMING_KEYS = frozenset({"epoch_time_s", "train_time_s", "eval_time_s", "images_per_s"})
# Config keys a resumed run may change: epochs (to extend the run) and pure display.
_RESUMABLE_CHANGES = frozenset({"epochs", "progress"})



def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # all devices
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ---------------------------------------------------------------------------
# evaluation



# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns. history: one dict per epoch (the metrics.jsonl lines).

    extra: the extra_state given, or on resume without one, the one saved in the checkpoint.
    out_dir and final_checkpoint are None for a run in memory (out_dir=None).
    """

    out_dir: pathlib.Path | None
    history: list[dict]
    final_checkpoint: pathlib.Path | None
    model: nn.Module
    extra: dict | None = None




def _config_diff(saved: Mapping, config: TrainConfig) -> list[str]:
    """Config keys that differ between a saved run and ``config`` (epochs and display aside).

    A field the saved config lacks (a run saved before the field existed) counts as its old
    behaviour: equal when ``config`` leaves it at the value that reproduces that behaviour.
    """
    mine = config.to_dict()
    keys = sorted(set(saved) | set(mine))
    return [
        k for k in keys
        if k not in _RESUMABLE_CHANGES and saved.get(k, _BEFORE_FIELD.get(k, "<missing>")) != mine.get(k, "<missing>")
    ]


# What a field added later amounts to in a run saved before it existed ("compile" was a bool, default False).
_BEFORE_FIELD = {"compile_mode": "default", "ema": 0.0, "tta_flip": False, "dynamic_2to4_every": 0, "dynamic_2to4_lr_scale": 1.0}


class _LossDisplay:
    """The progress bar's loss, read without stalling the device.

    At most once per ``every_s`` seconds: on CUDA the latest loss is copied
    into pinned host memory without blocking, and the value shown is the one
    whose copy has finished (a step or so old); on a CPU it is read directly.
    """

    def __init__(self, device: torch.device, every_s: float = 1.0):
        self.cuda = device.type == "cuda"
        self.every_s = every_s
        self.last = -math.inf
        self.value: float | None = None
        self.buffer = torch.zeros((), pin_memory=True) if self.cuda else None
        self.event = None

    def offer(self, loss: torch.Tensor) -> float | None:
        """The value to show now, or None when it is not yet time to refresh."""
        now = time.monotonic()
        if now - self.last < self.every_s:
            return None
        self.last = now
        if not self.cuda:
            return float(loss)
        if self.event is None or self.event.query():
            if self.event is not None:
                self.value = float(self.buffer)
            self.buffer.copy_(loss.detach().float(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        return self.value


def _check_subset(subset, n: int) -> torch.Tensor:
    index = torch.as_tensor(subset)
    if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"subset must be a 1-D sequence or tensor of integer sample positions, got {describe(index)}")
    if index.numel() == 0:
        raise ValueError("subset must select at least one sample, got an empty one")
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= n:
        raise ValueError(f"subset positions must lie in [0, {n}) (the training set's size), got values in [{low}, {high}]")
    return index.long().cpu()


def _data_record(train_data: ImageSet | None, subset: torch.Tensor | None, n: int) -> dict:
    """What the run trained on beyond its config: checked on resume, so a resume never silently trains other data."""
    digest = hashlib.sha256(subset.numpy().tobytes()).hexdigest()[:16] if subset is not None else None
    return {"source": "argument" if train_data is not None else "config", "samples": n, "subset_sha256": digest}


def train(
    config: TrainConfig,
    out_dir,
    *,
    model: nn.Module | None = None,
    resume: bool = False,
    extra_state: dict | None = None,
    on_epoch_end: Callable | None = None,
    token_hook: Callable | None = None,
    eval_token_hook: Callable | None = None,
    on_step_end: Callable | None = None,
    overwrite: bool = False,
    train_data: ImageSet | None = None,
    subset=None,
    eval_data: Mapping[str, ImageSet] | None = None,
) -> TrainResult:
    """Train per ``config`` and write the run into ``out_dir`` (created; rank 0 only).

    out_dir: the run folder, or None to train in memory: nothing is written
        (no config.json, metrics.jsonl or checkpoints) and the run cannot be
        resumed (what Instant Soup's ingredients do, ``make_train_fn``).
    model: train this module (e.g. one sparsified with ``sparsify_``) instead
        of ``build_model(config, ...)``; it is moved to the device and trained
        in place through plain ``model.parameters()``; config.model,
        pretrained and drop_path are then unused. config.init_from, if set,
        is loaded into whichever model is trained (not on resume).
    resume: continue from ``out_dir/checkpoints/last.pt``. The config must
        equal the saved one except ``epochs`` (which may grow) and
        ``progress``; otherwise ValueError naming the keys. metrics.jsonl is
        rewritten from the checkpoint's history, so epochs run after the last
        checkpoint are not duplicated. With the same epochs the result equals
        an uninterrupted run's (bit for bit on CPU, compiled or not); extending epochs
        stretches the cosine over the new total from the next step on, so it
        then differs from a run planned that long from the start. The data
        (train_data, subset) must be the same as well.
    extra_state: tensors, masks, ticket indices (tensors, numbers, strings,
        None and lists/tuples/dicts of them: what torch.load(weights_only=True)
        reads back; anything else is a ValueError here) saved under "extra" in
        every checkpoint and returned as TrainResult.extra. On resume without
        extra_state, the saved one is used.
    on_epoch_end(epoch, model, metrics): called on every rank after each
        epoch's evaluation, with the 1-based epoch, the evaluated model (the
        unwrapped model; its EMA copy when config.ema > 0) and the metrics
        dict, which it may extend with JSON-serialisable values.
    token_hook(model, x) -> logits: replaces model(x) in training forwards
        (x: the float32 [B, 3, H, W] batch after mixup/cutmix), for patch
        dropping; eval_token_hook does the same for evaluation (default: the
        plain model, all patches). A token_hook with an attribute
        ``needs_draws = True`` is called hook(model, x, draws) with the
        batch's ``data.BatchDraws`` (dataset indices, crop offsets, flips;
        under mixup/cutmix they describe each row's first image), which fixed
        data lottery tickets follow through the augmentation.
    on_step_end(step, model, optimizer): called on every rank after each
        optimizer step (step: steps done so far, 1-based), e.g. to adjust
        masks. config.dynamic_2to4_every > 0 installs
        ``dynamic_2to4.Dynamic2to4`` this way (the model must hold 2:4
        SparseLinear layers; its state is checkpointed and resumed, and each
        epoch's metrics gain dynamic_2to4_changed: the fraction of 2:4 groups
        whose kept pair changed in that epoch's re-prunes).
    overwrite: allow a fresh run (resume=False) into an out_dir that already
        holds a checkpoint; otherwise that is a ValueError.
    train_data: an ImageSet to train on instead of the training split the
        config describes (dataset, sizes, data_path and holdout are then
        unused for training).
    subset: train on these positions only (a 1-D int sequence or tensor,
        positions in the training set: train_data, or the config's training
        split after the holdout is carved off). The BatchDraws a hook gets
        name positions in that training set, not in the subset.
    eval_data: {"test": ImageSet, optionally "val": ImageSet} evaluated
        after the epochs eval_every picks; default: the config's sets
        (``build_data``), or none when train_data is given.

    Every optimizer step is one ``train_step.TrainStep`` call (forward, loss,
    backward, clipping, AdamW, learning rate, EMA). With compile (config.compile
    True, or "auto" on CUDA) the step's forward + loss + backward and the
    evaluation run compiled, AdamW is the fused one, and nothing in an epoch
    reads a device value on the host except the progress bar, at most once a
    second without blocking on CUDA.

    metrics.jsonl, one object per epoch: epoch (1-based), step (optimizer
    steps so far), lr (of the epoch's last step), train_loss (mean loss on
    the training batches as trained: smoothed and mixed targets), train_acc
    (argmax of the logits against the *clean* labels, before mixing),
    test_loss / test_acc and, with a holdout, val_loss / val_acc (plain
    cross-entropy and top-1 accuracy as fractions; null on epochs skipped by
    eval_every; of the EMA weights when config.ema > 0, with flip test-time
    augmentation when config.tta_flip), then test_acc_no_ema (the raw
    weights, config.ema > 0) and test_acc_no_flip (without the mirror
    image, config.tta_flip), val_* alike; train_time_s, eval_time_s,
    epoch_time_s, images_per_s (training images per second over the train
    phase, all ranks), and whatever on_epoch_end added.

    The returned model is the trained module itself (unwrapped from DDP /
    torch.compile), on the device, in eval mode; with config.ema > 0 it holds
    the averaged weights (the ones evaluated).

    Checkpoint (a dict, torch.save): format, format_version, model (the
    unwrapped module's state_dict: SparseLinear layers in compact form),
    ema (the EMA copy's state_dict, or None), model_source ("config" |
    "argument"), model_class, num_classes, optimizer, scheduler ({"step",
    "warmup_steps", "total_steps"}), scaler (fp16 only, else None), epoch
    (completed), step, rng (torch, cuda, numpy, python), config, extra,
    history, best ({"metric", "value", "epoch"}), world_size, data
    ({"source", "samples", "subset_sha256"}), versions.
    """
    _check_arguments(
        config, out_dir, model, resume, overwrite, extra_state, train_data, eval_data,
        on_epoch_end=on_epoch_end, token_hook=token_hook, eval_token_hook=eval_token_hook, on_step_end=on_step_end,
    )
    files = RunFiles.of(out_dir) if out_dir is not None else None
    saved = _saved_run(files, config, model, resume, overwrite)
    run = _Run(config, files, saved, model, train_data, subset, eval_data, extra_state, token_hook, eval_token_hook)
    run.restore()
    run.prepare_files()
    run.loop(on_epoch_end, on_step_end)
    return run.finish()


# ---------------------------------------------------------------------------
# train's pieces
# ---------------------------------------------------------------------------


def _check_arguments(config, out_dir, model, resume, overwrite, extra_state, train_data, eval_data, **hooks) -> None:
    """TypeError / ValueError for any bad argument of ``train``, before anything is read or built."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a str, os.PathLike or None (train in memory), got {type(out_dir).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    for name, value in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    if out_dir is None and resume:
        raise ValueError("resume=True needs out_dir, the run folder to continue (out_dir=None trains in memory)")
    if extra_state is not None and not isinstance(extra_state, dict):
        raise TypeError(f"extra_state must be a dict or None, got {type(extra_state).__name__}")
    if extra_state is not None:
        check_loads_weights_only(extra_state, "extra_state")
    for name, fn in hooks.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
    if train_data is not None and not isinstance(train_data, ImageSet):
        raise TypeError(f"train_data must be an ImageSet or None, got {type(train_data).__name__}")
    if eval_data is not None:
        if not isinstance(eval_data, Mapping) or not set(eval_data) <= {"test", "val"}:
            keys = sorted(map(str, eval_data)) if isinstance(eval_data, Mapping) else type(eval_data).__name__
            raise ValueError(f"eval_data must map 'test' (and optionally 'val') to ImageSets, got {keys}")
        for name, value in eval_data.items():
            if not isinstance(value, ImageSet):
                raise TypeError(f"eval_data[{name!r}] must be an ImageSet, got {type(value).__name__}")
        if "val" in eval_data and "test" not in eval_data:
            raise ValueError("eval_data with 'val' needs 'test' as well (metrics report both)")


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """The files of a run folder: checkpoints/last.pt, best.pt, best.pending.pt and metrics.jsonl."""

    out_dir: pathlib.Path
    ckpt_dir: pathlib.Path
    last: pathlib.Path
    best: pathlib.Path
    pending_best: pathlib.Path
    metrics: pathlib.Path

    @classmethod
    def of(cls, out_dir) -> "RunFiles":
        out_dir = pathlib.Path(out_dir)
        ckpt_dir = out_dir / "checkpoints"
        return cls(out_dir, ckpt_dir, ckpt_dir / "last.pt", ckpt_dir / "best.pt", ckpt_dir / "best.pending.pt", out_dir / "metrics.jsonl")


def _saved_run(files: RunFiles | None, config: TrainConfig, model: nn.Module | None, resume: bool, overwrite: bool) -> dict | None:
    """The checkpoint a resumed run continues (checked against ``config`` and ``model``), or None for a fresh run
    (a ValueError if that would silently start over a run already in the folder)."""
    if resume:
        last_path = files.last
        if not last_path.is_file():
            raise ValueError(f"resume=True (--resume) but there is no checkpoint at {last_path}")
        saved = load_checkpoint(last_path)
        check_checkpoint_keys(saved, last_path, RESUME_KEYS)
        diff = _config_diff(saved["config"], config)
        if diff:
            details = ", ".join(f"{k}: saved {saved['config'].get(k)!r} vs now {getattr(config, k, None)!r}" for k in diff)
            raise ValueError(f"cannot resume {files.out_dir} with a different config ({details}); only epochs may change")
        if config.epochs < saved["epoch"]:
            raise ValueError(f"epochs must be >= the {saved['epoch']} epochs already in {last_path}, got {config.epochs}")
        if saved.get("model_source") == "argument" and model is None:
            raise ValueError(
                f"{last_path} was trained from a model passed to train(model=...) ({saved.get('model_class')}); "
                "pass a model built the same way to resume it"
            )
        return saved
    if files is not None and files.last.exists() and not overwrite:
        raise ValueError(
            f"{files.out_dir} already holds a run ({files.last}); pass resume=True (lotus: --resume) to continue it, "
            "overwrite=True (--overwrite) to start afresh, or another out_dir"
        )
    return None


class _Run:
    """One call of ``train``: the device, data, model, optimizer and step it builds, and the state
    (step, history, best) its epochs advance. Built in the order the RNG streams require: the data
    first, then ``config.seed``, then the model."""

    def __init__(self, config, files, saved, model, train_data, subset, eval_data, extra_state, token_hook, eval_token_hook):
        self.config, self.files, self.saved = config, files, saved
        # ------------------------------------------------------- distributed
        self.info = info = distributed_from_env()
        self.device = device = resolve_device(config.device, info.local_rank if info.active else None)
        if config.batch_size % info.world_size:
            raise ValueError(f"batch_size must be divisible by the world size {info.world_size}, got {config.batch_size}")
        amp_dtype = resolve_amp_dtype(config.amp, device)
        if amp_dtype == torch.float16 and device.type == "cpu":
            warnings.warn("amp='fp16' on CPU is slow and rarely useful; 'bf16' or 'none' are the usual CPU choices", stacklevel=3)
        # What evaluate gets ("auto" keeps its fallback to eager on CUDA and means off on a CPU).
        compile_arg = config.compile if resolve_compile(config.compile, device) else False
        init_distributed(info, device)
        self.is_main = info.is_main
        self._prepare_data(train_data, subset, eval_data)
        self._prepare_model(model, amp_dtype, token_hook)
        self.eval_kwargs = dict(
            device=device, amp=config.amp, token_hook=eval_token_hook, distributed=info.active, compile=compile_arg,
            compile_mode=config.compile_mode, tta_flip=config.tta_flip,
        )
        self.start_epoch, self.step = 0, 0
        self.history: list[dict] = []
        self.monitor = "val_acc" if "val" in self.eval_sets else "test_acc"
        self.best = {"metric": self.monitor, "value": None, "epoch": None}
        self.extra = extra_state

    def _prepare_data(self, train_data, subset, eval_data) -> None:
        config, info = self.config, self.info
        if train_data is not None:
            train_set, eval_sets = train_data, {}
        else:
            train_set, eval_sets = build_data(config)
        if eval_data is not None:
            eval_sets = dict(eval_data)
        self.subset_index = subset_index = _check_subset(subset, len(train_set)) if subset is not None else None
        if subset_index is not None:
            train_set = train_set.subset(subset_index.to(train_set.device))
        self.data_record = _data_record(train_data, subset_index, len(train_set))
        saved = self.saved
        if saved is not None and saved.get("data") is not None and saved["data"] != self.data_record:
            raise ValueError(
                f"cannot resume {self.files.out_dir} on other data: it trained on {saved['data']}, this call gives {self.data_record} "
                "(pass the same train_data and subset)"
            )
        self.num_classes = len(train_set.classes)
        per_rank_batch = config.batch_size // info.world_size
        if len(train_set) < config.batch_size:
            raise ValueError(
                f"batch_size ({config.batch_size}) is larger than the training set ({len(train_set)} samples); "
                "lower batch_size or use more training data"
            )
        # drop_last: every step sees a full global batch, and DeviceLoader's
        # sharding then makes the ranks' batches partition exactly the batch a
        # single process would draw (one batch shape: one compiled graph).
        self.loader = DeviceLoader(
            train_set,
            per_rank_batch,
            shuffle=True,
            drop_last=True,
            augment=config.augment,
            seed=config.seed,
            rank=info.rank,
            world_size=info.world_size,
            device=self.device,
        )
        self.eval_sets = {name: s.to(self.device) for name, s in eval_sets.items()}
        steps_per_epoch = len(self.loader)
        self.total_steps = steps_per_epoch * config.epochs
        self.warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), self.total_steps)

    def _prepare_model(self, model, amp_dtype, token_hook) -> None:
        config, saved, device = self.config, self.saved, self.device
        _seed_everything(config.seed)
        self.model_source = "argument" if model is not None else "config"
        if model is None:
            model = build_model(config, self.num_classes)
        if config.init_from is not None and saved is None:
            load_init_weights(model, config.init_from)
        if saved is not None:
            try:
                model.load_state_dict(saved["model"])
            except RuntimeError as e:
                raise ValueError(f"cannot resume from {self.files.last}: its model state does not fit the model: {e}") from e
        model.to(device)
        model.train()
        self.model = model
        self.optimizer = adamw(model, config, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.dynamic = None
        if config.dynamic_2to4_every:
            from lotus_kernels.nn.dynamic_2to4 import Dynamic2to4

            # Before DDP / torch.compile wrap the model: their graphs must see the hooks.
            self.dynamic = Dynamic2to4(
                model, config.dynamic_2to4_every, pruned_lr_scale=config.dynamic_2to4_lr_scale,
                grad_scaler=self.scaler if self.scaler.is_enabled() else None,
            )
        self.ema = WeightEMA(model, config.ema) if config.ema else None
        self.step_fn = _train_step(
            config, model, self.optimizer, self.scaler, self.ema, device=device, warmup_steps=self.warmup_steps,
            total_steps=self.total_steps, token_hook=token_hook, padding=self.loader.padding, distributed=self.info.active,
        )

    def restore(self) -> None:
        """Continue from the saved checkpoint: optimizer, scaler, EMA, step, history, best, RNG, extra, dynamic 2:4."""
        saved = self.saved
        if saved is None:
            return
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scaler") is not None:
            self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None and saved.get("ema") is not None:
            self.ema.load_state_dict(saved["ema"])
        self.start_epoch, self.step = int(saved["epoch"]), int(saved["step"])
        self.history = list(saved.get("history", []))
        self.best = dict(saved.get("best") or self.best)
        set_rng_state(saved["rng"])
        if self.extra is None:
            self.extra = saved.get("extra")
        if self.dynamic is not None and saved.get("dynamic_2to4") is not None:
            self.dynamic.load_state_dict(saved["dynamic_2to4"])
        if saved.get("world_size", 1) != self.info.world_size:
            warnings.warn(
                f"resuming a run saved with world_size={saved.get('world_size')} on world_size={self.info.world_size}: "
                "results will not match an uninterrupted run bit for bit",
                stacklevel=3,
            )

    def prepare_files(self) -> None:
        """config.json and metrics.jsonl as of the start; stale checkpoints of a replaced run removed (rank 0)."""
        files = self.files
        if not (self.is_main and files is not None):
            return
        files.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if self.saved is None:
            # overwrite=True: a stale best.pt from the old run must not outlive it.
            for stale in (files.last, files.best, files.pending_best):
                stale.unlink(missing_ok=True)
        else:
            reconcile_best(self.saved, files.last, files.best, files.pending_best)
        write_json(files.out_dir / "config.json", self.config.to_dict())
        # Rewritten, not appended to: drops lines of epochs after the checkpoint (a crash between the two).
        write_metrics(files.metrics, self.history)

    def checkpoint_state(self, epoch: int) -> dict:
        import timm

        ema, dynamic = self.ema, self.dynamic
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "model_source": self.model_source,
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "num_classes": self.num_classes,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": self.step, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": epoch,
            "step": self.step,
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "extra": self.extra,
            "history": self.history,
            "best": self.best,
            "world_size": self.info.world_size,
            "data": self.data_record,
            "dynamic_2to4": dynamic.state_dict() if dynamic is not None else None,
            "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
        }

    def loop(self, on_epoch_end, on_step_end) -> None:
        """Every remaining epoch: train, evaluate, hand the metrics to on_epoch_end, record, save."""
        from tqdm.auto import tqdm

        config = self.config
        self.show = show = config.progress and self.is_main
        epoch_bar = tqdm(total=config.epochs, initial=self.start_epoch, desc="epochs", unit="epoch", disable=not show, dynamic_ncols=True)
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.display = _LossDisplay(self.device)
        # Hooks that follow samples (fixed tickets) index the training set the caller knows, not the subset.
        self.subset_positions = self.subset_index.to(self.device) if self.subset_index is not None else None
        evaluated_model = self.ema.module if self.ema is not None else self.model
        try:
            for epoch in range(self.start_epoch, config.epochs):
                metrics, (train_time, train_n, changed_groups, reprune_groups) = self.train_epoch(epoch, tqdm, on_step_end)
                last_epoch = epoch + 1 == config.epochs
                evaluated = last_epoch or (epoch + 1) % config.eval_every == 0
                t1 = time.perf_counter()
                self.evaluate_epoch(metrics, evaluated_model, evaluated)
                eval_time = time.perf_counter() - t1
                metrics.update(
                    train_time_s=train_time,
                    eval_time_s=eval_time,
                    epoch_time_s=train_time + eval_time,
                    images_per_s=train_n / train_time if train_time > 0 else float("nan"),
                )
                if self.dynamic is not None:
                    metrics["dynamic_2to4_changed"] = changed_groups / reprune_groups if reprune_groups else 0.0
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, evaluated_model, metrics)
                self.history.append(metrics)
                self.record(epoch, metrics, evaluated, last_epoch)
                if show:
                    epoch_bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k in ("train_loss", self.monitor) and v is not None})
                epoch_bar.update(1)
        finally:
            epoch_bar.close()

    def train_epoch(self, epoch: int, tqdm, on_step_end) -> tuple[dict, tuple[float, float, int, int]]:
        """One pass over the training set: (its metrics, (train seconds, images over all ranks, 2:4 groups
        changed by the epoch's re-prunes, groups re-pruned))."""
        config, device, info, model, optimizer = self.config, self.device, self.info, self.model, self.optimizer
        # Nothing random carries over between epochs: a resumed run redraws exactly what a straight one would.
        _seed_everything(derive_seed("epoch", config.seed, epoch, info.rank) % 2**63)
        self.loader.set_epoch(epoch)
        model.train()
        self.sync()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        changed_groups = reprune_groups = 0
        mixing = config.mixup > 0 or config.cutmix > 0
        lr = optimizer.param_groups[0]["lr"]
        batches = self.loader.iter_with_draws()
        batch_bar = tqdm(
            batches, total=len(self.loader), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not self.show, dynamic_ncols=True,
        )
        for x, y, draws in batch_bar:
            if mixing:
                g = torch.Generator().manual_seed(derive_seed("mix", config.seed, epoch, self.step, info.rank))
                inputs, targets, _ = mix_batch(
                    x, y, self.num_classes, mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                    label_smoothing=config.label_smoothing, generator=g,
                )
            else:
                inputs, targets = x, y
            if self.subset_positions is not None:
                draws = dataclasses.replace(draws, indices=self.subset_positions[draws.indices])
            out = self.step_fn(self.step, inputs, targets, y, draws)
            lr = out.lr
            self.step += 1
            if self.dynamic is not None:
                result = self.dynamic(self.step, model, optimizer)
                if result.repruned:
                    changed_groups += result.changed_groups
                    reprune_groups += result.total_groups
            if on_step_end is not None:
                on_step_end(self.step, model, optimizer)
            # Accumulated on the device: no host sync per step.
            loss_sum += out.loss.double() * y.numel()
            correct += out.correct
            seen += y.numel()
            if self.show:
                shown = self.display.offer(out.loss)
                if shown is not None:
                    batch_bar.set_postfix(loss=f"{shown:.4f}", lr=f"{lr:.2e}")
        batch_bar.close()
        self.sync()
        train_time = time.perf_counter() - t0
        train_loss, train_correct, train_n = all_reduce_sum([float(loss_sum), float(correct), float(seen)], device, info)
        metrics = {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": lr,
            "train_loss": train_loss / train_n,
            "train_acc": train_correct / train_n,
        }
        return metrics, (train_time, train_n, changed_groups, reprune_groups)

    def evaluate_epoch(self, metrics: dict, evaluated_model: nn.Module, evaluated: bool) -> None:
        """{split}_loss / {split}_acc (and the no-EMA / no-flip accuracies) into ``metrics``; None on skipped epochs."""
        eval_sets, kwargs = self.eval_sets, self.eval_kwargs
        for name in ("val", "test") if "val" in eval_sets else ("test",) if "test" in eval_sets else ():
            result = evaluate(evaluated_model, eval_sets[name], **kwargs) if evaluated else {}
            metrics[f"{name}_loss"], metrics[f"{name}_acc"] = result.get("loss"), result.get("acc")
            if self.ema is not None:
                metrics[f"{name}_acc_no_ema"] = evaluate(self.model, eval_sets[name], **kwargs)["acc"] if evaluated else None
            if self.config.tta_flip:
                metrics[f"{name}_acc_no_flip"] = result.get("acc_no_flip")

    def record(self, epoch: int, metrics: dict, evaluated: bool, last_epoch: bool) -> None:
        """The best record, the metrics line and the checkpoints of an epoch (files on rank 0 only)."""
        monitor, best, files = self.monitor, self.best, self.files
        improved = evaluated and metrics.get(monitor) is not None and (best["value"] is None or metrics[monitor] > best["value"])
        if improved:
            self.best = {"metric": monitor, "value": metrics[monitor], "epoch": epoch + 1}
        if not (self.is_main and files is not None):
            return
        with open(files.metrics, "a") as f:
            f.write(metrics_line(metrics) + "\n")
        save_last = last_epoch or (epoch + 1) % self.config.checkpoint_every == 0
        if save_last or improved:
            state = self.checkpoint_state(epoch + 1)
            # best.pt changes only together with a last.pt whose record names it: an
            # improvement waits in best.pending.pt (see reconcile_best for a crash
            # anywhere in between).
            if improved:
                save_checkpoint(files.pending_best, state)
            if save_last:
                save_checkpoint(files.last, state)
                if files.pending_best.exists():
                    os.replace(files.pending_best, files.best)
                    fsync_dir(files.ckpt_dir)

    def finish(self) -> TrainResult:
        model = self.model
        if self.dynamic is not None:
            self.dynamic.remove()
        if self.ema is not None:
            self.ema.copy_to(model)  # the returned model is the one the metrics describe
        model.eval()
        files = self.files
        return TrainResult(
            out_dir=files.out_dir if files else None, history=self.history, final_checkpoint=files.last if files else None,
            model=model, extra=self.extra,
        )


def _train_step(config, model, optimizer, scaler, ema, *, device, warmup_steps, total_steps, token_hook=None, padding=4, distributed=False) -> TrainStep:
    """The TrainStep of a run of ``config`` (what ``train`` and ``make_train_step`` build)."""
    compile_arg = config.compile if resolve_compile(config.compile, device) else False
    return TrainStep(
        model,
        optimizer,
        schedule=functools.partial(lr_at_step, lr=config.lr, min_lr=config.min_lr, warmup_steps=warmup_steps, total_steps=total_steps),
        label_smoothing=config.label_smoothing,
        grad_clip=config.grad_clip,
        amp_dtype=resolve_amp_dtype(config.amp, device),
        scaler=scaler,
        token_hook=token_hook,
        padding=padding,
        distributed=distributed,
        compile=compile_arg,
        compile_mode=config.compile_mode,
        ema=ema,
    )


def make_train_step(config: TrainConfig, model: nn.Module, *, total_steps: int = 1000) -> TrainStep:
    """The train step ``train`` would run for ``config`` on ``model``: the same AdamW (fused or not),
    GradScaler, EMA, compile settings and learning-rate schedule, for a run of ``total_steps`` steps
    over config.epochs epochs. The model is moved to the config's device in train mode. For benchmarks
    and callers that bring their own batches (``step(i, x, targets, labels)``); ``train`` is the loop.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    device = resolve_device(config.device, None)
    model.to(device).train()
    optimizer = adamw(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=resolve_amp_dtype(config.amp, device) == torch.float16)
    ema = WeightEMA(model, config.ema) if config.ema else None
    steps_per_epoch = max(1, total_steps // config.epochs)
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps)
    return _train_step(config, model, optimizer, scaler, ema, device=device, warmup_steps=warmup_steps, total_steps=total_steps)
