"""The training engine: one train step, one loop, checkpoints, evaluation.

- ``config``: ``Config``, the base of every recipe config (from_dict / to_dict / unknown keys);
- ``train_config``: ``TrainConfig``; ``presets``: ``PRESETS`` and the quick / fast recipes;
- ``build``: ``build_model`` and ``build_data`` from a TrainConfig;
- ``devices``: device names, AMP modes, whether to compile; ``distributed``: the data-parallel layout;
- ``train_step``: ``TrainStep`` (forward, loss, backward, clipping, AdamW, EMA), ``WeightEMA``;
- ``optim``: parameter groups, the learning-rate schedule, AdamW; ``mixing``: mixup / cutmix;
- ``evaluation``: ``evaluate``; ``checkpoint``: save / load / ``model_from_checkpoint``, best and last;
- ``loop``: ``train`` (the package's only training loop) and ``make_train_step``.

The names below are the engine's public API (what ``lotus_kernels.train`` exported).
"""

from .build import build_data, build_model
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_KEYS,
    CHECKPOINT_VERSION,
    CONVERT_HINT,
    RESUME_KEYS,
    load_checkpoint,
    model_from_checkpoint,
)
from .config import Config
from .devices import AMP_MODES
from .evaluation import evaluate
from .loop import TIMING_KEYS, TrainResult, make_train_step, train
from .mixing import mix_batch
from .optim import lr_at_step, param_groups
from .presets import PRESETS, fast_recipe, quick_recipe
from .train_config import DATASETS, TrainConfig
from .train_step import COMPILE_MODES, TrainStep, WeightEMA

__all__ = [
    "AMP_MODES",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_KEYS",
    "CHECKPOINT_VERSION",
    "COMPILE_MODES",
    "CONVERT_HINT",
    "Config",
    "DATASETS",
    "PRESETS",
    "RESUME_KEYS",
    "TIMING_KEYS",
    "TrainConfig",
    "TrainResult",
    "TrainStep",
    "WeightEMA",
    "build_data",
    "build_model",
    "evaluate",
    "fast_recipe",
    "lr_at_step",
    "make_train_step",
    "mix_batch",
    "model_from_checkpoint",
    "load_checkpoint",
    "param_groups",
    "quick_recipe",
    "train",
]
