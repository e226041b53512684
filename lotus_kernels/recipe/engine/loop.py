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

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import random
import shutil
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DeviceLoader, ImageSet, load_cifar10, resolve_cifar10_source, split_holdout, synthetic_dataset
from .train_step import COMPILE_MODES, TrainStep, WeightEMA, warn_compile_failed
from .train_step import HookedForward as _HookedForward
from .train_step import autocast as _autocast
from .train_step import module_device as _model_device

__all__ = [
    "PRESETS",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "build_data",
    "evaluate",
    "train",
    "mix_batch",
    "lr_at_step",
    "param_groups",
    "load_checkpoint",
    "model_from_checkpoint",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "TIMING_KEYS",
    "fast_recipe",
    "quick_recipe",
    "make_train_step",
]

# ---------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------

# timm VisionTransformer at 32x32 with 4x4 patches: 64 patch tokens + CLS.
# "timm_name" is the registered model whose defaults (and, with
# pretrained=True, hub weights, resampled by timm to the new patch/image
# size) the preset starts from; the other keys override its arguments.
#
# vit_micro_cifar (about 0.1 M parameters) is for tests and quick demos. It
# uses timm's "jax" init (zero head, xavier linears, lecun patch embedding):
# measured on the synthetic set, batch 64, lr 2e-3, 200 steps, seeds 0-3, it
# reached 40-50 % test accuracy where timm's default init sat near chance for
# the first ~150 steps and reached 20-35 %.
#
# vit_tiny_cifar and vit_small_cifar (depth 12) use LayerScale (timm's
# init_values; DeiT-III, CaiT) and the "jax" init when trained from scratch:
# each residual branch starts scaled by 1e-3, so the deep model first trains
# like a shallow one. Measured on this project's 2-core CPU (synthetic set,
# 188 steps of batch 32, bf16, no augmentation, seeds 0-2): 37-44 % test
# accuracy with LayerScale, 10-12 % (chance) without. ``pretrained`` builds
# drop it (the hub weights have none), and loading weights that have no
# LayerScale fills its gammas with ones, the identity (``_identity_layer_scale``).
#
# vit_lite_cifar is the ViT-Lite-7/4 shape (Hassani et al. 2021, "Escaping
# the Big Data Paradigm with Compact Transformers"): width 256, 7 blocks, 4
# heads, MLP ratio 2, 4x4 patches, 3.7 M parameters, 91.4 % on CIFAR-10 from
# scratch in their 200-epoch recipe; the fast profile's model (``fast_recipe``):
# about 0.5 GFLOP per image forward, two thirds of vit_tiny_cifar's.
_CIFAR_VIT = {"img_size": 32, "patch_size": 4}
_FROM_SCRATCH = {"weight_init": "jax", "init_values": 1e-3}
PRESETS: dict[str, dict] = {
    "vit_micro_cifar": {"timm_name": None, **_CIFAR_VIT, "embed_dim": 64, "depth": 2, "num_heads": 2, "weight_init": "jax"},
    "vit_lite_cifar": {"timm_name": None, **_CIFAR_VIT, "embed_dim": 256, "depth": 7, "num_heads": 4, "mlp_ratio": 2.0, "weight_init": "jax"},
    "vit_tiny_cifar": {"timm_name": "vit_tiny_patch16_224", **_CIFAR_VIT, "embed_dim": 192, "depth": 12, "num_heads": 3, **_FROM_SCRATCH},
    "vit_small_cifar": {"timm_name": "vit_small_patch16_224", **_CIFAR_VIT, "embed_dim": 384, "depth": 12, "num_heads": 6, **_FROM_SCRATCH},
}
# Preset keys that only make sense without hub weights.
_SCRATCH_ONLY_KEYS = ("weight_init", "init_values")
# Presets without hub weights of their own are built from this timm entry.
_PRESET_FALLBACK_TIMM = "vit_tiny_patch16_224"

DATASETS = ("synthetic", "cifar10")
AMP_MODES = ("auto", "bf16", "fp16", "none")
CHECKPOINT_FORMAT = "lotus_kernels.train"
CHECKPOINT_VERSION = 1
# Keys of a metrics line that measure wall time: they differ between otherwise identical runs.
TIMING_KEYS = frozenset({"epoch_time_s", "train_time_s", "eval_time_s", "images_per_s"})
# Config keys a resumed run may change: epochs (to extend the run) and pure display.
_RESUMABLE_CHANGES = frozenset({"epochs", "progress"})
_EVAL_BATCH_SIZE = 512


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------


def quick_recipe() -> dict:
    """TrainConfig fields for a run of about a minute on a laptop-class CPU (``lotus train --profile quick``).

    Sized for vit_tiny_cifar on the synthetic set: one epoch of 6,000 fresh
    images, batch 32 (188 steps; three passes over 2,000 images reached only
    23 %), lr 2e-3, no augmentation, drop-path or label
    smoothing (regularisers that slow the first few hundred steps), bf16
    autocast where the CPU has native bf16 (AVX512-BF16 or AMX: about 1.6x
    the fp32 speed on this project's CPU), else fp32. Measured on this
    project's 2-core CPU: 37-44 % test accuracy (chance 10 %) for seeds 0-2.
    """
    cpu = getattr(torch, "cpu", None)
    native_bf16 = any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return {
        "synthetic_train": 6000, "synthetic_test": 1000, "epochs": 1, "batch_size": 32, "lr": 2e-3,
        "warmup_epochs": 0.2, "augment": False, "drop_path": 0.0, "label_smoothing": 0.0,
        "amp": "bf16" if native_bf16 else "none",
    }


def fast_recipe() -> dict:
    """TrainConfig fields chosen for CIFAR-10 test accuracy per second of GPU time
    (``lotus train --profile fast``, what ``--profile auto`` picks for CIFAR-10 on CUDA).

    NOT YET VALIDATED ON A GPU: the accuracy and the wall time are what the
    first GPU run of this profile measures (``lotus gpu-check --steps cifar10``
    runs it and records the accuracy curve against wall time). The choices:
    - model vit_lite_cifar (the ViT-Lite-7/4 shape, ``PRESETS``): the plain
      ViT with the best published CIFAR-10-from-scratch accuracy for its cost
      (91.4 % at 200 epochs; DeiT-Ti's shape, 3x the FLOPs, 90.9 % at ~250);
    - batch 512, peak lr 2e-3 (the 5e-4 of ViT-Lite's batch-128 recipe,
      scaled linearly), 5 warmup epochs, cosine to 1e-5, weight decay 0.05:
      a large batch because a small ViT's step is host- and launch-bound;
    - 100 epochs: about 3 minutes at the issue's 30,000 images/s target
      (data loading and compilation are extra). No public plain ViT reaches
      90 % in under ~150 epochs; whether 100 suffice here is what the GPU run
      decides (``--epochs`` overrides);
    - crop + flip, CutMix (alpha 1) / Mixup (alpha 0.8) on every batch, label
      smoothing 0.1, drop-path 0.1: the DeiT regularisers that small ViTs need
      on 50,000 images;
    - weight EMA (decay 0.999, about 10 epochs at this batch) and flip
      test-time augmentation for evaluation; metrics also carry the accuracy
      without each (``*_acc_no_ema``, ``*_acc_no_flip``), so the run shows what
      they bring;
    - compile "auto" (the whole step compiled on CUDA), bf16 autocast on CUDA,
      evaluation every 5 epochs (with the last), a checkpoint every 25.
    On a CPU the same recipe runs eagerly in fp32 (hours: for tests, override
    epochs and data sizes).
    """
    return {
        "model": "vit_lite_cifar", "dataset": "cifar10", "epochs": 100, "batch_size": 512, "lr": 2e-3, "weight_decay": 0.05,
        "warmup_epochs": 5.0, "min_lr": 1e-5, "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "drop_path": 0.1,
        "grad_clip": 1.0, "augment": True, "amp": "auto", "compile": "auto", "compile_mode": "default", "ema": 0.999,
        "tta_flip": True, "eval_every": 5, "checkpoint_every": 25,
    }


def _check_model_name(name: str) -> None:
    import timm

    if name not in PRESETS and not timm.is_model(name):
        raise ValueError(
            f"model must be a preset ({', '.join(sorted(PRESETS))}) or a timm model name "
            f"(see timm.list_models()), got {name!r}"
        )


@dataclasses.dataclass
class TrainConfig:
    """Everything that decides a training run (see ``train``). All fields are JSON scalars.

    Construction validates every field (TypeError for a wrong type, ValueError
    for a bad value, both naming the field) after coercing ints to floats for
    float fields and os.PathLike to str for path fields; ``from_dict``
    additionally rejects unknown keys.
    """

    model: str = "vit_tiny_cifar"  # preset name, or any timm model name
    pretrained: bool = False  # passed to timm (works where the hub is reachable)
    init_from: str | None = None  # our checkpoint, or a plain state_dict .pt/.pth/.safetensors
    dataset: str = "synthetic"  # "synthetic" | "cifar10"
    data_path: str | None = None  # cifar10 source (see data.resolve_cifar10_source)
    synthetic_train: int = 10000
    synthetic_test: int = 2000
    holdout: int = 0  # validation samples carved from train (data.split_holdout)
    epochs: int = 10
    batch_size: int = 128  # global: split across data-parallel ranks
    lr: float = 1e-3  # peak, after warmup
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(alpha, alpha); 0 disables
    cutmix: float = 0.0  # Beta(alpha, alpha); 0 disables
    drop_path: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    augment: bool = True  # crop (4-pixel zero padding) + horizontal flip
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU) | "bf16" | "fp16" | "none"
    # torch.compile the training step (forward + loss + backward) and evaluation: True | False |
    # "auto" (on CUDA, falling back to eager with a warning if compiling fails; off on CPU)
    compile: bool | str = "auto"
    compile_mode: str = "default"  # torch.compile mode (train_step.COMPILE_MODES; "reduce-overhead": CUDA graphs)
    ema: float = 0.0  # decay of a weight EMA that is evaluated and checkpointed (train_step.WeightEMA); 0: off
    tta_flip: bool = False  # evaluate on each image and its mirror image (mean logits)
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    eval_every: int = 1  # epochs (the last epoch is always evaluated)
    checkpoint_every: int = 1  # epochs (the last epoch is always saved)
    progress: bool = True  # tqdm bars (rank 0 only)
    dynamic_2to4_every: int = 0  # re-prune 2:4 SparseLinear layers every N steps (lotus_kernels.dynamic_2to4); 0: off
    dynamic_2to4_lr_scale: float = 1.0  # the pruned weights' SGD lr as a multiple of the lr

    def __post_init__(self):
        for f in dataclasses.fields(self):
            kind = _FIELD_KINDS[f.name]
            value = _coerce(getattr(self, f.name), kind)
            _check_field(f.name, value, kind)
            setattr(self, f.name, value)
        _check_model_name(self.model)
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if not (self.ema == 0.0 or 0.0 < self.ema < 1.0):
            raise ValueError(f"ema must be 0 (off) or a decay in (0, 1), got {self.ema!r}")
        if self.ema and self.dynamic_2to4_every:
            # A re-prune moves which weight each 2:4 value slot holds: averaging slots across re-prunes mixes weights.
            raise ValueError("ema must be 0 with dynamic_2to4_every > 0 (a re-prune reassigns the values an average would mix)")
        _parse_device_name(self.device)
        for name in ("synthetic_train", "synthetic_test", "epochs", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("holdout", "seed", "dynamic_2to4_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "warmup_epochs", "min_lr", "mixup", "cutmix", "grad_clip", "dynamic_2to4_lr_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0, got 0.0")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be <= lr = {self.lr}, got {self.min_lr}")
        for name in ("label_smoothing", "drop_path"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
        if self.model in PRESETS and self.pretrained and PRESETS[self.model]["timm_name"] is None:
            raise ValueError(f"preset {self.model!r} has no pretrained weights; use pretrained=False or another model")

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        """A config from a mapping (e.g. parsed JSON/YAML). Unknown keys -> ValueError listing them.

        Ints are accepted for float fields, os.PathLike for path fields;
        anything else of the wrong type is a TypeError naming the key.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping of config keys, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in _FIELD_KINDS)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)} (known: {', '.join(_FIELD_KINDS)})")
        return cls(**d)

    def to_dict(self) -> dict:
        """The config as a plain dict of JSON scalars (``from_dict`` inverts it)."""
        return dataclasses.asdict(self)


def _field_kind(annotation: str) -> str:
    # `from __future__ import annotations` leaves the field types as strings.
    return {"bool": "bool", "int": "int", "float": "float", "str": "str", "str | None": "optional_str", "bool | str": "bool_or_auto"}[annotation]


_FIELD_KINDS = {f.name: _field_kind(f.type) for f in dataclasses.fields(TrainConfig)}


def _check_field(name: str, value, kind: str) -> None:
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, float),
        "str": isinstance(value, str),
        "optional_str": value is None or isinstance(value, str),
        "bool_or_auto": isinstance(value, bool) or value == "auto",
    }[kind]
    if not ok:
        need = {"optional_str": "a str or None", "int": "an int", "bool_or_auto": "True, False or 'auto'"}.get(kind, f"a {kind}")
        raise TypeError(f"{name} must be {need}, got {type(value).__name__} {value!r}")
    if kind == "str" and not value:
        raise ValueError(f"{name} must not be empty")


def _coerce(value, kind: str):
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind == "optional_str" and isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


# ---------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The model ``config.model`` names, with ``num_classes`` outputs, on the CPU in float32.

    A preset is a timm VisionTransformer at img_size 32, patch_size 4 (see
    PRESETS); any other name goes to ``timm.create_model`` as is. drop_path is
    passed as timm's drop_path_rate, pretrained as timm's pretrained.
    ``config.init_from`` is not applied here (``train`` does that). Weights
    come from the global torch RNG: seed it first for reproducible weights.
    """
    import timm

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__} {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    _check_model_name(config.model)
    common = {"pretrained": config.pretrained, "num_classes": num_classes, "drop_path_rate": config.drop_path}
    if config.model in PRESETS:
        preset = dict(PRESETS[config.model])
        timm_name = preset.pop("timm_name") or _PRESET_FALLBACK_TIMM
        if config.pretrained:
            for key in _SCRATCH_ONLY_KEYS:
                preset.pop(key, None)
        return timm.create_model(timm_name, **common, **preset)
    try:
        return timm.create_model(config.model, **common)
    except TypeError as e:
        # A few timm families take no drop_path_rate; build them without it rather than fail.
        if "drop_path_rate" not in str(e):
            raise
        if config.drop_path:
            warnings.warn(f"{config.model} takes no drop_path_rate; drop_path={config.drop_path} is ignored", stacklevel=2)
        del common["drop_path_rate"]
        return timm.create_model(config.model, **common)


def build_data(config: TrainConfig) -> tuple[ImageSet, dict[str, ImageSet]]:
    """(train set, {"test": test set, "val": holdout set (only if config.holdout)}), all on the CPU.

    synthetic: ``synthetic_dataset(synthetic_train / synthetic_test, seed=config.seed)``;
    cifar10: ``load_cifar10(resolve_cifar10_source(config.data_path))``. The
    validation set is ``split_holdout(train, config.holdout, seed=config.seed)``.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.dataset == "synthetic":
        train_set = synthetic_dataset(config.synthetic_train, seed=config.seed, split="train")
        test_set = synthetic_dataset(config.synthetic_test, seed=config.seed, split="test")
    else:
        source = resolve_cifar10_source(config.data_path)
        train_set = load_cifar10(source, "train")
        test_set = load_cifar10(source, "test")
    evals = {"test": test_set}
    if config.holdout:
        if config.holdout >= len(train_set):
            raise ValueError(f"holdout must be < the {len(train_set)} training samples, got {config.holdout}")
        train_set, evals["val"] = split_holdout(train_set, config.holdout, seed=config.seed)
    return train_set, evals


# ---------------------------------------------------------------------------
# devices, precision, distributed
# ---------------------------------------------------------------------------


def _parse_device_name(name: str) -> None:
    if name in ("auto", "cpu", "cuda"):
        return
    if name.startswith("cuda:") and name[5:].isdigit():
        return
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def _resolve_device(name: str, local_rank: int | None) -> torch.device:
    _parse_device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here (use 'cpu' or 'auto')")
    if name.startswith("cuda:"):
        return torch.device(name)
    # "cuda" / "auto": one GPU per local rank under torchrun.
    return torch.device("cuda", local_rank or 0)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


@dataclasses.dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def _distributed_from_env() -> _Dist:
    """The data-parallel layout: an initialised process group, else torchrun's env vars, else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return _Dist()
    return _Dist(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0))


def _init_distributed(info: _Dist, device: torch.device) -> None:
    import torch.distributed as dist

    if not info.active or dist.is_initialized():
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The group stays up after train() returns: the caller (a torchrun
    # script) may evaluate or train again, and destroys it when done.
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=info.rank, world_size=info.world_size)


def _all_reduce_sum(values: list[float], device: torch.device, info: _Dist) -> list[float]:
    if not info.active:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# ---------------------------------------------------------------------------
# optimisation pieces
# ---------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: [{"params": decayed, ...}, {"params": not decayed, "weight_decay": 0}].

    Decayed: matrices and conv kernels (ndim >= 2), and every SparseLinear's
    compact ``values`` (whatever its ndim: it *is* a weight matrix, stored
    flat for the unstructured pattern). Not decayed: biases, norm scales and
    shifts, and what the model lists in ``no_weight_decay()`` (timm ViT:
    pos_embed, cls_token), the usual ViT recipe.
    """
    from .nn import SparseLinear

    skip: set[str] = set()
    if hasattr(model, "no_weight_decay"):
        skip = set(model.no_weight_decay())
    sparse_values = {id(m.values) for m in model.modules() if isinstance(m, SparseLinear)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in skip or name.split(".")[-1] in skip:
            no_decay.append(p)
        elif id(p) in sparse_values or p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at_step(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Linear warmup lr * (step + 1) / warmup_steps for the first warmup_steps
    steps (so the first step is not wasted at lr 0), then cosine from lr at
    step warmup_steps down to min_lr at step total_steps - 1 (with fewer than
    two steps after warmup, lr).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 1:
        return lr  # a single post-warmup step has nothing to anneal towards: spend it at the peak
    progress = min(1.0, (step - warmup_steps) / (decay_steps - 1))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _beta(alpha: float, generator: torch.Generator) -> float:
    # torch's Beta/Gamma samplers take no generator: draw a numpy seed from
    # the torch generator so everything still follows from that one stream.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix of a batch with a permutation of itself, with soft targets.

    x: float [B, C, H, W] on any device; y: int64 [B] on x's device.
    With both alphas > 0, CutMix or Mixup is picked with probability 1/2
    (timm's default); with one, that one; with neither, x is returned as is.
    lam ~ Beta(alpha, alpha); Mixup: lam * x + (1 - lam) * x[perm]; CutMix:
    a box of area ~(1 - lam) of x[perm] pasted into x, lam then corrected to
    the exact kept area. Targets: lam * t(y) + (1 - lam) * t(y[perm]) with
    t the one-hot label smoothed by ``label_smoothing`` (each row sums to 1).
    generator: a CPU torch.Generator deciding the mode, lam, box and the
    seed of the permutation (a fresh unseeded one if None). The permutation is
    drawn on x's device and the mixing runs there: nothing waits for the
    device (no host-to-device copy per batch).

    Returns (x_mixed same shape/dtype/device as x, targets float32 [B, num_classes], lam).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise TypeError(f"x must be a float tensor [B, C, H, W], got {_describe(x)}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
        raise TypeError(f"y must be an int64 tensor [B] = [{x.shape[0]}], got {_describe(y)}")
    for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {alpha!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
    if generator is None:
        generator = torch.Generator()
    B, _, H, W = x.shape
    off = label_smoothing / num_classes
    targets = torch.full((B, num_classes), off, dtype=torch.float32, device=x.device)
    targets.scatter_(1, y.view(B, 1), 1.0 - label_smoothing + off)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, targets, 1.0
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or bool(torch.rand((), generator=generator) < 0.5))
    lam = _beta(cutmix_alpha if use_cutmix else mixup_alpha, generator)
    device_generator = torch.Generator(device=x.device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    perm = torch.randperm(B, generator=device_generator, device=x.device)
    if use_cutmix:
        # timm's rand_bbox: a box of side sqrt(1 - lam) times the image's, centre uniform, clipped at the border.
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = (int(v) for v in torch.randint(0, 1 << 30, (2,), generator=generator))
        cy, cx = cy % H, cx % W
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        mixed = x.clone()
        mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        mixed = x * lam + x[perm] * (1.0 - lam)
    targets = targets * lam + targets[perm] * (1.0 - lam)
    return mixed, targets, lam


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


def _seed_from(*parts) -> int:
    """A 63-bit seed from ints and strings, the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # all devices
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, _HookedForward):
            model = model.model
        else:
            return model


def _eval_logits(model: nn.Module, hook: Callable | None, x: torch.Tensor, device_type: str, amp_dtype, tta_flip: bool):
    """float32 logits [B, C] of x (and, with tta_flip, of its mirror image: [2, B, C])."""
    if tta_flip:
        # One forward of 2B images: the batch and its mirror image.
        x = torch.cat([x, x.flip(3)])
    with _autocast(torch.device(device_type), amp_dtype):
        logits = hook(model, x) if hook is not None else model(x)
    logits = logits.float()
    return logits.view(2, -1, logits.shape[-1]) if tta_flip else logits


_COMPILED_EVAL: dict[str, Callable] = {}


def _compiled_eval_logits(mode: str) -> Callable:
    # One compiled function per mode for every evaluation: dynamo caches its graphs on the code object,
    # keyed by guards (model structure, hook, shapes), so evaluating a deep copy reuses them.
    if mode not in _COMPILED_EVAL:
        _COMPILED_EVAL[mode] = torch.compile(_eval_logits, mode=mode, dynamic=False)
    return _COMPILED_EVAL[mode]


def evaluate(
    model: nn.Module,
    dataset: ImageSet,
    *,
    batch_size: int = _EVAL_BATCH_SIZE,
    device=None,
    amp: str = "auto",
    token_hook: Callable | None = None,
    distributed: bool | None = None,
    compile: bool | str = False,
    compile_mode: str = "default",
    tta_flip: bool = False,
) -> dict:
    """Mean cross-entropy (no label smoothing) and top-1 accuracy of ``model`` on ``dataset``.

    No augmentation, dataset order, model.eval() under torch.no_grad(); every
    module's previous train/eval mode is restored afterwards.
    device: where to run (default: the model's); the model must already be there.
    amp: as TrainConfig.amp. token_hook(model, x) -> logits [B, classes], if
    given, is called instead of model(x) (x float32 [B, 3, H, W]).
    distributed: shard the set across the ranks of the initialised process
    group and sum the counts (default: whenever one with world_size > 1 is
    initialised); every rank must call it and gets the same answer.
    compile: as TrainConfig.compile (True, False, or "auto": compiled on
    CUDA, eager if compiling fails); compiled, a short last batch is padded
    to batch_size so one graph serves every batch. compile_mode: torch.compile's.
    tta_flip: the logits are the mean of the image's and its mirror image's.

    Returns {"loss": float, "acc": float in [0, 1], "n": int samples}, and
    with tta_flip "acc_no_flip" (the accuracy of the un-mirrored images alone).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(dataset, ImageSet):
        raise TypeError(f"dataset must be an ImageSet, got {type(dataset).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if token_hook is not None and not callable(token_hook):
        raise TypeError(f"token_hook must be callable(model, x) -> logits, got {type(token_hook).__name__}")
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    if not isinstance(tta_flip, bool):
        raise TypeError(f"tta_flip must be a bool, got {type(tta_flip).__name__} {tta_flip!r}")
    model = _unwrap(model)
    device = _model_device(model) if device is None else torch.device(device)
    amp_dtype = _amp_dtype(amp, device)
    info = _distributed_from_env() if distributed is None or distributed else _Dist()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        info = _Dist()
    if info.active:
        # A strided shard per rank, without DeviceLoader's padding, so each sample counts exactly once.
        dataset = dataset.subset(torch.arange(info.rank, len(dataset), info.world_size))
    compiled = _resolve_compile(compile, device)
    logits_fn = _compiled_eval_logits(compile_mode) if compiled else _eval_logits
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    correct_no_flip = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        if len(dataset):
            loader = DeviceLoader(dataset, batch_size, shuffle=False, augment=False, device=device)
            with torch.no_grad():
                for x, y in loader:
                    rows = y.numel()
                    if compiled and rows < batch_size:
                        x = torch.cat([x, x.new_zeros(batch_size - rows, *x.shape[1:])])  # same shape, same graph
                    try:
                        logits = logits_fn(model, token_hook, x, device.type, amp_dtype, tta_flip)
                    except Exception as e:  # noqa: BLE001 - a compiler failure under "auto": eager, said once
                        if not (compiled and compile == "auto" and logits_fn is not _eval_logits):
                            raise
                        warn_compile_failed("evaluation", e)
                        logits_fn = _eval_logits
                        logits = logits_fn(model, token_hook, x, device.type, amp_dtype, tta_flip)
                    if tta_flip:
                        correct_no_flip += (logits[0, :rows].argmax(1) == y).sum()
                        logits = logits.mean(0)
                    logits = logits[:rows]
                    loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
                    correct += (logits.argmax(1) == y).sum()
                    n += rows
    finally:
        for m, mode in modes:
            m.training = mode
    loss_sum, correct, correct_no_flip, n = _all_reduce_sum([float(loss_sum), float(correct), float(correct_no_flip), float(n)], device, info)
    n = int(n)
    result = {"loss": loss_sum / n if n else float("nan"), "acc": correct / n if n else float("nan"), "n": n}
    if tta_flip:
        result["acc_no_flip"] = correct_no_flip / n if n else float("nan")
    return result


def _resolve_compile(compile: bool | str, device: torch.device) -> bool:
    """Whether to compile: "auto" compiles on CUDA only (on a CPU, compiling costs more than it saves in short runs)."""
    return device.type == "cuda" if compile == "auto" else bool(compile)


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        # numpy's key as an int64 tensor, so the checkpoint loads with weights_only=True.
        "numpy": {
            "kind": np_state[0],
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    s = state["numpy"]
    np.random.set_state((s["kind"], s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _remove_stale_temp_files(directory: pathlib.Path) -> None:
    """Temp files (``_atomic_write``'s ``.NAME.PID.tmp``) that killed saves left in ``directory``."""
    for tmp in directory.glob(".*.tmp"):
        pid = tmp.name[: -len(".tmp")].rpartition(".")[2]
        # Another live process's save is left alone (a pid reused since is kept too: harmless).
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _atomic_write(path: pathlib.Path, write: Callable) -> None:
    """write(file object) into a temp file beside ``path``, fsync, then os.replace it over ``path``.

    A crash at any point leaves either the old file or the new one, never a
    torn one; a kill leaves the temp file, which the next write removes.
    """
    _remove_stale_temp_files(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _save_checkpoint(path: pathlib.Path, state: dict) -> None:
    _atomic_write(path, lambda f: torch.save(state, f))


def _reconcile_best(saved: dict, last_path: pathlib.Path, best_path: pathlib.Path, pending_path: pathlib.Path) -> None:
    """Make best.pt the epoch that last.pt's "best" record names, after a crash anywhere in a save.

    best.pending.pt of the recorded epoch (killed between writing last.pt and
    the rename) becomes best.pt; one of a later epoch belongs to epochs the
    resumed run redoes and is dropped. Runs saved before best.pending.pt
    existed wrote last.pt then best.pt: when the record names last.pt's own
    epoch and best.pt is not it, last.pt (the same state) is copied over.
    """
    record = (saved.get("best") or {}).get("epoch")
    if pending_path.exists():
        if record is not None and _checkpoint_epoch(pending_path) == record:
            os.replace(pending_path, best_path)
        else:
            pending_path.unlink()
        _fsync_dir(best_path.parent)
    if record is None or (best_path.exists() and _checkpoint_epoch(best_path) == record):
        return
    if record == saved["epoch"]:

        def copy_last(f) -> None:
            with open(last_path, "rb") as src:
                shutil.copyfileobj(src, f)

        _atomic_write(best_path, copy_last)
    else:
        warnings.warn(
            f"{best_path} does not hold epoch {record}, the best one {last_path} records; it is replaced at the "
            "next improvement",
            stacklevel=3,
        )


def _is_our_checkpoint(obj) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


# What every use of a checkpoint reads (eval, export, the pipeline stages), and what resuming adds.
CHECKPOINT_KEYS = ("model", "config", "num_classes", "epoch")
RESUME_KEYS = ("optimizer", "step", "rng")

# How to turn a checkpoint that needs a full unpickle into one we load: said, never done for the user.
CONVERT_HINT = (
    "lotus_kernels loads checkpoints with torch.load(weights_only=True) only: unpickling anything else runs code. "
    "If you wrote this file yourself and trust it, convert it once: ckpt = torch.load(path, weights_only=False); "
    "replace the objects in ckpt['extra'] (or wherever the error points) by tensors, numbers, strings, None, "
    "lists or dicts of them; torch.save(ckpt, path)"
)


def load_checkpoint(path, *, map_location="cpu") -> dict:
    """A checkpoint written by ``train`` (a dict; see ``train`` for its keys).

    Loads with ``torch.load(weights_only=True)`` and nothing else: a file
    holding other objects is refused with a ValueError that says how to
    convert it (it is never unpickled). Checks the format and that the keys
    every use reads (``CHECKPOINT_KEYS``) are there.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a folder; give a checkpoint file such as {str(path / 'checkpoints' / 'last.pt')!r}")
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: say how to convert, never unpickle
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"could not load checkpoint {str(path)!r} ({first}). {CONVERT_HINT}") from e
    except Exception as e:  # a truncated or corrupt file, or not a torch file at all
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{str(path)!r} is not a readable checkpoint: corrupt, cut short or not a torch file ({type(e).__name__}: {first})") from e
    if not _is_our_checkpoint(ckpt):
        raise ValueError(f"{str(path)!r} is not a lotus_kernels.train checkpoint")
    if ckpt.get("format_version", 0) > CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {ckpt['format_version']}, newer than this "
            f"code's {CHECKPOINT_VERSION}: update lotus_kernels"
        )
    _check_checkpoint_keys(ckpt, path, CHECKPOINT_KEYS)
    for key, kind in (("model", Mapping), ("config", Mapping), ("num_classes", int), ("epoch", int)):
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            raise ValueError(f"checkpoint {str(path)!r}: {key!r} must be a {kind.__name__}, got {type(ckpt[key]).__name__}")
    return ckpt


def _check_checkpoint_keys(ckpt: Mapping, path, keys) -> None:
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {missing} (damaged, or written by something else than train)")


def _check_loads_weights_only(extra, name: str) -> None:
    """ValueError unless ``extra`` survives torch.save + torch.load(weights_only=True) (checkpoints must)."""
    buffer = io.BytesIO()
    torch.save(extra, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{name} must hold only tensors, numbers, strings, None and lists/tuples/dicts of them: it is saved in "
            f"checkpoints, which load with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e


def _checkpoint_epoch(path: pathlib.Path) -> int | None:
    """The epoch a checkpoint file holds (tensors memory-mapped, not read), or None when it cannot tell."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:
        return None


def model_from_checkpoint(path, *, map_location="cpu") -> nn.Module:
    """The trained model of a checkpoint (eval mode, on map_location): its EMA weights when the run kept
    an average (config.ema > 0: the weights its metrics describe), else its weights.

    Built from the checkpoint's config; a model that was sparsified before it
    was passed to ``train(model=...)`` gets its SparseLinear layers back from
    the layouts saved in its state (``lotus_kernels.sparsify_like_``). Any
    other model passed to train cannot be rebuilt from the config: build it
    the same way and ``load_state_dict(ckpt["model"])``.
    """
    from .nn import sparsify_like_

    ckpt = load_checkpoint(path, map_location=map_location)
    config = TrainConfig.from_dict(ckpt["config"])
    config = dataclasses.replace(config, pretrained=False)  # the weights come from the checkpoint
    state = _evaluated_state(ckpt)
    model = sparsify_like_(build_model(config, ckpt["num_classes"]), state)
    try:
        model.load_state_dict(_identity_layer_scale(model, state))
    except (RuntimeError, ValueError) as e:
        if ckpt.get("model_source") == "config":
            # A ValueError (the CLI's one-line error), not load_state_dict's RuntimeError.
            raise ValueError(f"checkpoint {str(path)!r}: its model state does not fit the model its config builds: {e}") from e
        raise ValueError(
            f"checkpoint {str(path)!r} holds a model passed to train(model=...) ({ckpt.get('model_class')}) "
            f"that the config does not rebuild ({str(e).splitlines()[0]}); build that model and "
            "load_state_dict(ckpt['model']) into it"
        ) from e
    return model.eval()


def _evaluated_state(ckpt: Mapping) -> Mapping:
    """The weights a checkpoint's metrics describe: the EMA copy's when the run kept one."""
    return ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]


def _identity_layer_scale(model: nn.Module, state: Mapping) -> Mapping:
    """``state`` plus ones for the LayerScale gammas (timm's ``*.ls1.gamma``, ``*.ls2.gamma``)
    that ``model`` has and ``state`` lacks: weights trained without LayerScale
    (hub ViTs, checkpoints made before the presets had it) load exactly, as
    gamma = 1 is the identity. Any other missing key is left for
    ``load_state_dict`` to report."""
    missing = {
        name: torch.ones_like(param)
        for name, param in model.state_dict().items()
        if name.endswith((".ls1.gamma", ".ls2.gamma")) and name not in state
    }
    return {**state, **missing} if missing else state


def _load_init_weights(model: nn.Module, path: str) -> None:
    """config.init_from: our checkpoint, or a state_dict file (.pt/.pth/.bin via torch.load, .safetensors)."""
    p = pathlib.Path(os.path.expanduser(path))
    if not p.is_file():
        raise ValueError(f"init_from {path!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"init_from {path!r} could not be loaded as a state_dict: {type(e).__name__}: {e}") from e
        if _is_our_checkpoint(state):
            state = _evaluated_state(state)
        elif isinstance(state, Mapping):
            # Common wrappers: {"state_dict": ...}, {"model": ...} (timm / DeiT training scripts).
            for key in ("state_dict", "model", "model_state_dict"):
                if isinstance(state.get(key), Mapping):
                    state = state[key]
                    break
    if not isinstance(state, Mapping):
        raise ValueError(f"init_from {path!r} holds a {type(state).__name__}, not a state_dict")
    # DDP / torch.compile prefixes from other trainers.
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(_identity_layer_scale(model, state))
    except RuntimeError as e:
        raise ValueError(f"init_from {path!r} does not fit the model: {e}") from e


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


def _json_default(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON serialisable")


def _metrics_line(metrics: dict) -> str:
    return json.dumps(metrics, default=_json_default, allow_nan=True)


def _write_metrics(path: pathlib.Path, history: list[dict]) -> None:
    text = "".join(_metrics_line(m) + "\n" for m in history)
    _atomic_write(path, lambda f: f.write(text.encode()))


def _write_json(path: pathlib.Path, obj) -> None:
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    _atomic_write(path, lambda f: f.write(text.encode()))


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
        raise TypeError(f"subset must be a 1-D sequence or tensor of integer sample positions, got {_describe(index)}")
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
    # ----------------------------------------------------------- arguments
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
        _check_loads_weights_only(extra_state, "extra_state")
    for name, fn in (("on_epoch_end", on_epoch_end), ("token_hook", token_hook), ("eval_token_hook", eval_token_hook), ("on_step_end", on_step_end)):
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
    writes_files = out_dir is not None
    if writes_files:
        out_dir = pathlib.Path(out_dir)
        ckpt_dir = out_dir / "checkpoints"
        last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
        pending_best_path = ckpt_dir / "best.pending.pt"
        metrics_path = out_dir / "metrics.jsonl"
    else:
        ckpt_dir = last_path = best_path = pending_best_path = metrics_path = None

    saved = None
    if resume:
        if not last_path.is_file():
            raise ValueError(f"resume=True (--resume) but there is no checkpoint at {last_path}")
        saved = load_checkpoint(last_path)
        _check_checkpoint_keys(saved, last_path, RESUME_KEYS)
        diff = _config_diff(saved["config"], config)
        if diff:
            details = ", ".join(f"{k}: saved {saved['config'].get(k)!r} vs now {getattr(config, k, None)!r}" for k in diff)
            raise ValueError(f"cannot resume {out_dir} with a different config ({details}); only epochs may change")
        if config.epochs < saved["epoch"]:
            raise ValueError(f"epochs must be >= the {saved['epoch']} epochs already in {last_path}, got {config.epochs}")
        if saved.get("model_source") == "argument" and model is None:
            raise ValueError(
                f"{last_path} was trained from a model passed to train(model=...) ({saved.get('model_class')}); "
                "pass a model built the same way to resume it"
            )
    elif writes_files and last_path.exists() and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a run ({last_path}); pass resume=True (lotus: --resume) to continue it, "
            "overwrite=True (--overwrite) to start afresh, or another out_dir"
        )

    # ------------------------------------------------------- distributed
    info = _distributed_from_env()
    device = _resolve_device(config.device, info.local_rank if info.active else None)
    if config.batch_size % info.world_size:
        raise ValueError(f"batch_size must be divisible by the world size {info.world_size}, got {config.batch_size}")
    amp_dtype = _amp_dtype(config.amp, device)
    if amp_dtype == torch.float16 and device.type == "cpu":
        warnings.warn("amp='fp16' on CPU is slow and rarely useful; 'bf16' or 'none' are the usual CPU choices", stacklevel=2)
    # What evaluate gets ("auto" keeps its fallback to eager on CUDA and means off on a CPU).
    compile_arg = config.compile if _resolve_compile(config.compile, device) else False
    _init_distributed(info, device)
    is_main = info.is_main

    # -------------------------------------------------------------- data
    if train_data is not None:
        train_set, eval_sets = train_data, {}
    else:
        train_set, eval_sets = build_data(config)
    if eval_data is not None:
        eval_sets = dict(eval_data)
    subset_index = _check_subset(subset, len(train_set)) if subset is not None else None
    if subset_index is not None:
        train_set = train_set.subset(subset_index.to(train_set.device))
    data_record = _data_record(train_data, subset_index, len(train_set))
    if saved is not None and saved.get("data") is not None and saved["data"] != data_record:
        raise ValueError(
            f"cannot resume {out_dir} on other data: it trained on {saved['data']}, this call gives {data_record} "
            "(pass the same train_data and subset)"
        )
    num_classes = len(train_set.classes)
    per_rank_batch = config.batch_size // info.world_size
    if len(train_set) < config.batch_size:
        raise ValueError(
            f"batch_size ({config.batch_size}) is larger than the training set ({len(train_set)} samples); "
            "lower batch_size or use more training data"
        )
    # drop_last: every step sees a full global batch, and DeviceLoader's
    # sharding then makes the ranks' batches partition exactly the batch a
    # single process would draw (one batch shape: one compiled graph).
    loader = DeviceLoader(
        train_set,
        per_rank_batch,
        shuffle=True,
        drop_last=True,
        augment=config.augment,
        seed=config.seed,
        rank=info.rank,
        world_size=info.world_size,
        device=device,
    )
    eval_sets = {name: s.to(device) for name, s in eval_sets.items()}
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps)

    # ------------------------------------------------------------- model
    _seed_everything(config.seed)
    model_source = "argument" if model is not None else "config"
    if model is None:
        model = build_model(config, num_classes)
    if config.init_from is not None and saved is None:
        _load_init_weights(model, config.init_from)
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as e:
            raise ValueError(f"cannot resume from {last_path}: its model state does not fit the model: {e}") from e
    model.to(device)
    model.train()

    optimizer = _adamw(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    dynamic = None
    if config.dynamic_2to4_every:
        from .dynamic_2to4 import Dynamic2to4

        # Before DDP / torch.compile wrap the model: their graphs must see the hooks.
        dynamic = Dynamic2to4(
            model, config.dynamic_2to4_every, pruned_lr_scale=config.dynamic_2to4_lr_scale,
            grad_scaler=scaler if scaler.is_enabled() else None,
        )
    ema = WeightEMA(model, config.ema) if config.ema else None
    step_fn = _train_step(
        config, model, optimizer, scaler, ema, device=device, warmup_steps=warmup_steps, total_steps=total_steps,
        token_hook=token_hook, padding=loader.padding, distributed=info.active,
    )
    eval_kwargs = dict(
        device=device, amp=config.amp, token_hook=eval_token_hook, distributed=info.active, compile=compile_arg,
        compile_mode=config.compile_mode, tta_flip=config.tta_flip,
    )

    # ------------------------------------------------------------- state
    start_epoch, step = 0, 0
    history: list[dict] = []
    monitor = "val_acc" if "val" in eval_sets else "test_acc"
    best = {"metric": monitor, "value": None, "epoch": None}
    extra = extra_state
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scaler") is not None:
            scaler.load_state_dict(saved["scaler"])
        if ema is not None and saved.get("ema") is not None:
            ema.load_state_dict(saved["ema"])
        start_epoch, step = int(saved["epoch"]), int(saved["step"])
        history = list(saved.get("history", []))
        best = dict(saved.get("best") or best)
        _set_rng_state(saved["rng"])
        if extra is None:
            extra = saved.get("extra")
        if dynamic is not None and saved.get("dynamic_2to4") is not None:
            dynamic.load_state_dict(saved["dynamic_2to4"])
        if saved.get("world_size", 1) != info.world_size:
            warnings.warn(
                f"resuming a run saved with world_size={saved.get('world_size')} on world_size={info.world_size}: "
                "results will not match an uninterrupted run bit for bit",
                stacklevel=2,
            )

    if is_main and writes_files:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if saved is None:
            # overwrite=True: a stale best.pt from the old run must not outlive it.
            for stale in (last_path, best_path, pending_best_path):
                stale.unlink(missing_ok=True)
        else:
            _reconcile_best(saved, last_path, best_path, pending_best_path)
        _write_json(out_dir / "config.json", config.to_dict())
        # Rewritten, not appended to: drops lines of epochs after the checkpoint (a crash between the two).
        _write_metrics(metrics_path, history)

    def checkpoint_state(epoch: int) -> dict:
        import timm

        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "model_source": model_source,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "num_classes": num_classes,
            "optimizer": optimizer.state_dict(),
            "scheduler": {"step": step, "warmup_steps": warmup_steps, "total_steps": total_steps},
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": epoch,
            "step": step,
            "rng": _rng_state(),
            "config": config.to_dict(),
            "extra": extra,
            "history": history,
            "best": best,
            "world_size": info.world_size,
            "data": data_record,
            "dynamic_2to4": dynamic.state_dict() if dynamic is not None else None,
            "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
        }

    # --------------------------------------------------------------- loop
    from tqdm.auto import tqdm

    show = config.progress and is_main
    epoch_bar = tqdm(total=config.epochs, initial=start_epoch, desc="epochs", unit="epoch", disable=not show, dynamic_ncols=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mixing = config.mixup > 0 or config.cutmix > 0
    display = _LossDisplay(device)
    # Hooks that follow samples (fixed tickets) index the training set the caller knows, not the subset.
    subset_positions = subset_index.to(device) if subset_index is not None else None
    evaluated_model = ema.module if ema is not None else model
    try:
        for epoch in range(start_epoch, config.epochs):
            # Nothing random carries over between epochs: a resumed run redraws exactly what a straight one would.
            _seed_everything(_seed_from("epoch", config.seed, epoch, info.rank) % 2**63)
            loader.set_epoch(epoch)
            model.train()
            sync()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            changed_groups = reprune_groups = 0
            lr = optimizer.param_groups[0]["lr"]
            batches = loader.iter_with_draws()
            batch_bar = tqdm(batches, total=len(loader), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not show, dynamic_ncols=True)
            for x, y, draws in batch_bar:
                if mixing:
                    g = torch.Generator().manual_seed(_seed_from("mix", config.seed, epoch, step, info.rank))
                    inputs, targets, _ = mix_batch(
                        x, y, num_classes, mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                        label_smoothing=config.label_smoothing, generator=g,
                    )
                else:
                    inputs, targets = x, y
                if subset_positions is not None:
                    draws = dataclasses.replace(draws, indices=subset_positions[draws.indices])
                out = step_fn(step, inputs, targets, y, draws)
                lr = out.lr
                step += 1
                if dynamic is not None:
                    result = dynamic(step, model, optimizer)
                    if result.repruned:
                        changed_groups += result.changed_groups
                        reprune_groups += result.total_groups
                if on_step_end is not None:
                    on_step_end(step, model, optimizer)
                # Accumulated on the device: no host sync per step.
                loss_sum += out.loss.double() * y.numel()
                correct += out.correct
                seen += y.numel()
                if show:
                    shown = display.offer(out.loss)
                    if shown is not None:
                        batch_bar.set_postfix(loss=f"{shown:.4f}", lr=f"{lr:.2e}")
            batch_bar.close()
            sync()
            train_time = time.perf_counter() - t0
            train_loss, train_correct, train_n = _all_reduce_sum([float(loss_sum), float(correct), float(seen)], device, info)

            metrics: dict = {
                "epoch": epoch + 1,
                "step": step,
                "lr": lr,
                "train_loss": train_loss / train_n,
                "train_acc": train_correct / train_n,
            }
            t1 = time.perf_counter()
            last_epoch = epoch + 1 == config.epochs
            evaluated = last_epoch or (epoch + 1) % config.eval_every == 0
            for name in ("val", "test") if "val" in eval_sets else ("test",) if "test" in eval_sets else ():
                result = evaluate(evaluated_model, eval_sets[name], **eval_kwargs) if evaluated else {}
                metrics[f"{name}_loss"], metrics[f"{name}_acc"] = result.get("loss"), result.get("acc")
                if ema is not None:
                    metrics[f"{name}_acc_no_ema"] = evaluate(model, eval_sets[name], **eval_kwargs)["acc"] if evaluated else None
                if config.tta_flip:
                    metrics[f"{name}_acc_no_flip"] = result.get("acc_no_flip")
            eval_time = time.perf_counter() - t1
            metrics.update(
                train_time_s=train_time,
                eval_time_s=eval_time,
                epoch_time_s=train_time + eval_time,
                images_per_s=train_n / train_time if train_time > 0 else float("nan"),
            )
            if dynamic is not None:
                metrics["dynamic_2to4_changed"] = changed_groups / reprune_groups if reprune_groups else 0.0
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, evaluated_model, metrics)
            history.append(metrics)

            improved = evaluated and metrics.get(monitor) is not None and (best["value"] is None or metrics[monitor] > best["value"])
            if improved:
                best = {"metric": monitor, "value": metrics[monitor], "epoch": epoch + 1}
            if is_main and writes_files:
                with open(metrics_path, "a") as f:
                    f.write(_metrics_line(metrics) + "\n")
                save_last = last_epoch or (epoch + 1) % config.checkpoint_every == 0
                if save_last or improved:
                    state = checkpoint_state(epoch + 1)
                    # best.pt changes only together with a last.pt whose record names it: an
                    # improvement waits in best.pending.pt (see _reconcile_best for a crash
                    # anywhere in between).
                    if improved:
                        _save_checkpoint(pending_best_path, state)
                    if save_last:
                        _save_checkpoint(last_path, state)
                        if pending_best_path.exists():
                            os.replace(pending_best_path, best_path)
                            _fsync_dir(ckpt_dir)
            if show:
                epoch_bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k in ("train_loss", monitor) and v is not None})
            epoch_bar.update(1)
    finally:
        epoch_bar.close()

    if dynamic is not None:
        dynamic.remove()
    if ema is not None:
        ema.copy_to(model)  # the returned model is the one the metrics describe
    model.eval()
    return TrainResult(out_dir=out_dir, history=history, final_checkpoint=last_path, model=model, extra=extra)


def _adamw(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``param_groups`` (betas 0.9, 0.999), fused (one kernel for all parameters) on CUDA and
    on the compiled CPU path. The eager CPU path keeps the for-loop AdamW, so eager CPU runs stay bit
    for bit what they were before the fused kernel was used."""
    groups = param_groups(model, config.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = device.type == "cuda" or _resolve_compile(config.compile, device)
    fused = fused and all(p.is_floating_point() and p.device.type in _fused_adamw_devices() for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), fused=fused)


def _train_step(config, model, optimizer, scaler, ema, *, device, warmup_steps, total_steps, token_hook=None, padding=4, distributed=False) -> TrainStep:
    """The TrainStep of a run of ``config`` (what ``train`` and ``make_train_step`` build)."""
    compile_arg = config.compile if _resolve_compile(config.compile, device) else False
    return TrainStep(
        model,
        optimizer,
        schedule=functools.partial(lr_at_step, lr=config.lr, min_lr=config.min_lr, warmup_steps=warmup_steps, total_steps=total_steps),
        label_smoothing=config.label_smoothing,
        grad_clip=config.grad_clip,
        amp_dtype=_amp_dtype(config.amp, device),
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
    device = _resolve_device(config.device, None)
    model.to(device).train()
    optimizer = _adamw(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=_amp_dtype(config.amp, device) == torch.float16)
    ema = WeightEMA(model, config.ema) if config.ema else None
    steps_per_epoch = max(1, total_steps // config.epochs)
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps)
    return _train_step(config, model, optimizer, scaler, ema, device=device, warmup_steps=warmup_steps, total_steps=total_steps)


def _fused_adamw_devices() -> tuple[str, ...]:
    """Device types with a fused AdamW kernel in this torch (CPU since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # an older torch: CUDA only
        return ("cuda",)
