"""``TrainConfig``: everything that decides a training run, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import os


from .config import Config
from .devices import AMP_MODES, parse_device_name
from .presets import PRESETS, check_model_name
from .train_step import COMPILE_MODES


DATASETS = ("synthetic", "cifar10")


@dataclasses.dataclass
class TrainConfig(Config):
    """Everything that decides a training run (see ``train``). All fields are JSON scalars.

    Construction validates every field (TypeError for a wrong type, ValueError
    for a bad value, both naming the field) after coercing ints to floats for
    float fields and os.PathLike to str for path fields; ``from_dict``
    (``config.Config``) additionally rejects unknown keys.
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
    dynamic_2to4_every: int = 0  # re-prune 2:4 SparseLinear layers every N steps (lotus_kernels.nn.dynamic_2to4); 0: off
    dynamic_2to4_lr_scale: float = 1.0  # the pruned weights' SGD lr as a multiple of the lr

    def __post_init__(self):
        for f in dataclasses.fields(self):
            kind = _FIELD_KINDS[f.name]
            value = _coerce(getattr(self, f.name), kind)
            _check_field(f.name, value, kind)
            setattr(self, f.name, value)
        check_model_name(self.model)
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
        parse_device_name(self.device)
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
