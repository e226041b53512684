"""What a ``TrainConfig`` builds: the model (``build_model``) and the data (``build_data``)."""

from __future__ import annotations

import warnings

import torch.nn as nn

from ..data import ImageSet, load_cifar10, resolve_cifar10_source, split_holdout, synthetic_dataset
from .presets import PRESET_FALLBACK_TIMM, PRESETS, SCRATCH_ONLY_KEYS, check_model_name
from .train_config import TrainConfig


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
    check_model_name(config.model)
    common = {"pretrained": config.pretrained, "num_classes": num_classes, "drop_path_rate": config.drop_path}
    if config.model in PRESETS:
        preset = dict(PRESETS[config.model])
        timm_name = preset.pop("timm_name") or PRESET_FALLBACK_TIMM
        if config.pretrained:
            for key in SCRATCH_ONLY_KEYS:
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
