"""Training and evaluation throughput (issue 17): images/s of the engine's train step and of ``evaluate``.

Train: ``train.make_train_step`` (exactly what ``train`` runs per batch:
autocast forward, loss, backward, clipping, AdamW, schedule, and the EMA
update where the recipe has one) on one fixed batch on the device, warmed up
(compiled where the case says so); images/s = batch / p50 of one step. bf16
autocast on CUDA, fp32 on a CPU (TrainConfig's amp="auto"). Each preset runs
with TrainConfig's defaults; "fast" is ``train.fast_recipe()`` (vit_lite_cifar,
batch 512, EMA 0.999) at the batch given. Mixup/cutmix and the loader are not
in the step (a few tensor ops per batch, outside it).
Eval: ``train.evaluate`` of a synthetic set of 4 batches, compiled or not,
with the fast profile's flip TTA for its case; images/s = images / p50.
Every result records useful_tflops and pct_of_peak (matmul FLOPs, training 3x
the forward, against the device's measured matmul peak) and the 1-minute load
average when it was taken.

Grid on CUDA: train: micro, lite, tiny and small at batch 512 compiled; tiny
eager at batch 128 (the issue's baseline, `lotus train --preset tiny` as it
ran: 3,000-3,300 images/s on an H200); the fast profile at 512 and 1024, in
torch.compile's default mode and with CUDA graphs (reduce-overhead), and eager
at 512. Eval: lite and tiny at 512 eager and compiled, the fast profile (TTA)
at 512 compiled. Target (issue 17): >= 30,000 training images/s for the fast
profile's model on an H100/H200 (``bench_report.TARGETS``).
LOTUS_BENCH_GRID=headline on CUDA (lotus gpu-check's speed-train step): the
fast profile at 512 compiled and with CUDA graphs, the tiny baseline eager at
128, and the fast profile's evaluation at 512 compiled.
On a CPU: train: micro at 64 and tiny at 32, eager and compiled, the fast
profile at 32 eager and compiled; eval: tiny at 64 eager and compiled, the
fast profile (TTA) at 64 compiled. Minutes, mostly compilation.
"""

from __future__ import annotations

import os

import pytest
import torch
from bench_train_step import CUDA, build, make_step, release, step_flops
from conftest import time_quantiles_ms

from lotus_kernels.recipe.data import synthetic_dataset
from lotus_kernels.recipe.engine import TrainConfig, evaluate, fast_recipe

HEADLINE = os.environ.get("LOTUS_BENCH_GRID") == "headline"

if CUDA and HEADLINE:
    # lotus gpu-check's speed-train step: the target case in both compile modes, its baseline, and evaluation.
    TRAIN = [("vit_lite_cifar", 512, c, "fast") for c in ("compiled", "reduce-overhead")] + [("vit_tiny_cifar", 128, "eager", "preset")]
    EVAL = [("vit_lite_cifar", 512, "compiled", "fast")]
elif CUDA:
    TRAIN = [(m, 512, "compiled", "preset") for m in ("vit_micro_cifar", "vit_lite_cifar", "vit_tiny_cifar", "vit_small_cifar")]
    TRAIN += [("vit_tiny_cifar", 128, "eager", "preset")]
    TRAIN += [("vit_lite_cifar", b, c, "fast") for b in (512, 1024) for c in ("compiled", "reduce-overhead")]
    TRAIN += [("vit_lite_cifar", 512, "eager", "fast")]
    EVAL = [(m, 512, c, "preset") for m in ("vit_lite_cifar", "vit_tiny_cifar") for c in ("eager", "compiled")]
    EVAL += [("vit_lite_cifar", 512, "compiled", "fast")]
else:
    TRAIN = [(m, b, c, "preset") for m, b in (("vit_micro_cifar", 64), ("vit_tiny_cifar", 32)) for c in ("eager", "compiled")]
    TRAIN += [("vit_lite_cifar", 32, c, "fast") for c in ("eager", "compiled")]
    EVAL = [("vit_tiny_cifar", 64, c, "preset") for c in ("eager", "compiled")] + [("vit_lite_cifar", 64, "compiled", "fast")]


def _id(case) -> str:
    model, batch, compile_mode, recipe = case
    return f"{'fast' if recipe == 'fast' else model}-b{batch}-{compile_mode}"


def _recipe(name: str) -> dict:
    return fast_recipe() if name == "fast" else {}


def _record(run_benchmark, device_peak, run, quantiles, *, workload, model, batch, compile_mode, recipe, images, flops, **extra):
    seconds = quantiles["p50_ms"] * 1e-3
    useful = flops / seconds / 1e12
    run_benchmark(
        run,
        rounds=5,
        **quantiles,
        op=f"train_throughput_{workload}",
        provider=_id((model, batch, compile_mode, recipe)),
        workload=workload,
        model=model,
        recipe=recipe,
        batch=batch,
        compile=compile_mode,
        images_per_s=images / seconds,
        useful_tflops=useful,
        pct_of_peak=100.0 * useful / device_peak["peak_tflops"],
        load_average_1m=os.getloadavg()[0],
        threads=torch.get_num_threads(),
        **extra,
    )


@pytest.mark.parametrize("model,batch,compile_mode,recipe", TRAIN, ids=[_id(c) for c in TRAIN])
def bench_train_throughput(run_benchmark, device_peak, model, batch, compile_mode, recipe):
    try:
        net, run, config = make_step(model, batch, compile_mode, _recipe(recipe))
        quantiles = time_quantiles_ms(run, min_reps=10)
        _record(
            run_benchmark, device_peak, run, quantiles, workload="train_step", model=model, batch=batch, compile_mode=compile_mode,
            recipe=recipe, images=batch, flops=step_flops(net, batch), amp=config.amp, ema=config.ema, drop_path=config.drop_path,
        )
    finally:
        release()


@pytest.mark.parametrize("model,batch,compile_mode,recipe", EVAL, ids=[_id(c) for c in EVAL])
def bench_eval_throughput(run_benchmark, device_peak, model, batch, compile_mode, recipe):
    try:
        device = "cuda" if CUDA else "cpu"
        fields = {**_recipe(recipe), "model": model, "device": device, "compile": compile_mode != "eager"}
        config = TrainConfig.from_dict(fields)
        net = build(model, config).to(device)
        data = synthetic_dataset(4 * batch, split="test").to(device)
        kwargs = dict(batch_size=batch, amp=config.amp, compile=config.compile, tta_flip=config.tta_flip)

        def run():
            return evaluate(net, data, **kwargs)

        run()  # compile
        quantiles = time_quantiles_ms(run, min_reps=5)
        forward_flops = step_flops(net, len(data)) / 3 * (2 if config.tta_flip else 1)
        _record(
            run_benchmark, device_peak, run, quantiles, workload="evaluate", model=model, batch=batch, compile_mode=compile_mode,
            recipe=recipe, images=len(data), flops=forward_flops, amp=config.amp, tta_flip=config.tta_flip,
        )
    finally:
        release()
