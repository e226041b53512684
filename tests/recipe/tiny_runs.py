"""The tiny training runs the engine's tests share (512 synthetic images, batch 64: 8 steps an epoch, well
under a second on 2 CPU cores) and how they compare runs."""

import json
from pathlib import Path

import torch

from lotus_kernels.recipe.engine import TIMING_KEYS, TrainConfig

TINY = dict(
    model="vit_micro_cifar",
    synthetic_train=512,
    synthetic_test=256,
    batch_size=64,
    epochs=2,
    progress=False,
    device="cpu",
)
METRIC_KEYS = {"epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "images_per_s"}


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


def without_timing(history):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history]


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    """Stands in for the process dying."""


def kill_at(epoch_to_die):
    def on_epoch_end(epoch, model, metrics):
        # Raised before epoch `epoch_to_die` is checkpointed: like a crash during that epoch.
        if epoch == epoch_to_die:
            raise Killed

    return on_epoch_end
