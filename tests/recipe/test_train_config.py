"""TrainConfig (engine.train_config): round trips, unknown keys and bad values named; model names;
build_data's validation holdout."""

import dataclasses
import json
from pathlib import Path

import pytest

from lotus_kernels.recipe.engine import TrainConfig, build_data

from tiny_runs import tiny


def test_config_round_trip():
    config = tiny(mixup=0.8, init_from=None, holdout=32)
    d = config.to_dict()
    assert TrainConfig.from_dict(d) == config
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == config
    assert set(d) == {f.name for f in dataclasses.fields(TrainConfig)}
    # ints coerce to floats; path-likes to str
    coerced = TrainConfig.from_dict({"lr": 1, "data_path": Path("/x/y"), "model": "vit_micro_cifar"})
    assert coerced.lr == 1.0 and isinstance(coerced.lr, float) and coerced.data_path == "/x/y"
    assert TrainConfig.from_dict({}) == TrainConfig()
    assert TrainConfig(warmup_epochs=2).warmup_epochs == 2.0  # direct construction coerces too


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown config keys: bogus, lr_max"):
        TrainConfig.from_dict({"lr_max": 1.0, "bogus": 2, "lr": 1e-3})
    with pytest.raises(TypeError, match="epochs must be an int"):
        TrainConfig.from_dict({"epochs": 2.5})
    with pytest.raises(TypeError, match="augment must be a bool"):
        TrainConfig.from_dict({"augment": 1})
    with pytest.raises(TypeError, match="lr must be a float"):
        TrainConfig.from_dict({"lr": "fast"})
    with pytest.raises(TypeError, match="d must be a mapping"):
        TrainConfig.from_dict([("lr", 1.0)])


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"model": "no_such_model"}, ValueError, r"preset \(vit_lite_cifar, vit_micro_cifar, vit_small_cifar, vit_tiny_cifar\) or a timm"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"epochs": 0}, ValueError, "epochs must be >= 1"),
        ({"amp": "fp8"}, ValueError, "amp must be one of"),
        ({"dataset": "imagenet"}, ValueError, "dataset must be one of"),
        ({"device": "tpu"}, ValueError, "device must be"),
        ({"lr": -1.0}, ValueError, "lr must be"),
        ({"lr": 0.0}, ValueError, "lr must be > 0"),
        ({"min_lr": 1.0, "lr": 0.1}, ValueError, "min_lr must be <= lr"),
        ({"label_smoothing": 1.0}, ValueError, "label_smoothing must lie in"),
        ({"drop_path": -0.1}, ValueError, "drop_path must lie in"),
        ({"holdout": -1}, ValueError, "holdout must be >= 0"),
        ({"eval_every": 0}, ValueError, "eval_every must be >= 1"),
        ({"mixup": float("nan")}, ValueError, "mixup must be a finite number"),
        ({"pretrained": True}, ValueError, "has no pretrained weights"),
        ({"model": ""}, ValueError, "model must not be empty"),
        ({"init_from": 3}, TypeError, "init_from must be a str or None"),
        ({"dynamic_2to4_every": -1}, ValueError, "dynamic_2to4_every must be >= 0"),
        ({"dynamic_2to4_lr_scale": -1.0}, ValueError, "dynamic_2to4_lr_scale must be"),
        ({"compile": "yes"}, TypeError, "compile must be True, False or 'auto', got str 'yes'"),
        ({"compile": 1}, TypeError, "compile must be True, False or 'auto'"),
        ({"compile_mode": "fastest"}, ValueError, "compile_mode must be one of"),
        ({"ema": 1.0}, ValueError, r"ema must be 0 \(off\) or a decay in \(0, 1\)"),
        ({"ema": -0.5}, ValueError, "ema must be 0"),
        ({"ema": 0.99, "dynamic_2to4_every": 10}, ValueError, "ema must be 0 with dynamic_2to4_every"),
        ({"tta_flip": "yes"}, TypeError, "tta_flip must be a bool"),
    ],
)
def test_config_bad_values(overrides, error, message):
    with pytest.raises(error, match=message):
        tiny(**overrides)


def test_timm_names_accepted():
    config = tiny(model="vit_tiny_patch16_224")  # any registered timm name validates
    assert config.model == "vit_tiny_patch16_224"


def test_build_data_holdout():
    train_set, evals = build_data(tiny(holdout=100))
    assert len(train_set) == 412 and len(evals["val"]) == 100 and len(evals["test"]) == 256
    assert set(build_data(tiny())[1]) == {"test"}
    with pytest.raises(ValueError, match="holdout must be <"):
        build_data(tiny(holdout=512))
