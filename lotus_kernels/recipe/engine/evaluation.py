"""``evaluate``: loss and top-1 accuracy of a model on an ImageSet (optionally sharded across
ranks, compiled, with flip test-time augmentation)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DeviceLoader, ImageSet
from .devices import resolve_amp_dtype, resolve_compile
from .distributed import DistInfo, all_reduce_sum, distributed_from_env
from .train_step import HookedForward, check_compile, autocast, module_device, warn_compile_failed


EVAL_BATCH_SIZE = 512


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, HookedForward):
            model = model.model
        else:
            return model


def _eval_logits(model: nn.Module, hook: Callable | None, x: torch.Tensor, device_type: str, amp_dtype, tta_flip: bool):
    """float32 logits [B, C] of x (and, with tta_flip, of its mirror image: [2, B, C])."""
    if tta_flip:
        # One forward of 2B images: the batch and its mirror image.
        x = torch.cat([x, x.flip(3)])
    with autocast(torch.device(device_type), amp_dtype):
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
    batch_size: int = EVAL_BATCH_SIZE,
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
    check_compile(compile, compile_mode)
    if not isinstance(tta_flip, bool):
        raise TypeError(f"tta_flip must be a bool, got {type(tta_flip).__name__} {tta_flip!r}")
    model = _unwrap(model)
    device = module_device(model) if device is None else torch.device(device)
    amp_dtype = resolve_amp_dtype(amp, device)
    info = distributed_from_env() if distributed is None or distributed else DistInfo()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        info = DistInfo()
    if info.active:
        # A strided shard per rank, without DeviceLoader's padding, so each sample counts exactly once.
        dataset = dataset.subset(torch.arange(info.rank, len(dataset), info.world_size))
    compiled = resolve_compile(compile, device)
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
    loss_sum, correct, correct_no_flip, n = all_reduce_sum([float(loss_sum), float(correct), float(correct_no_flip), float(n)], device, info)
    n = int(n)
    result = {"loss": loss_sum / n if n else float("nan"), "acc": correct / n if n else float("nan"), "n": n}
    if tta_flip:
        result["acc_no_flip"] = correct_no_flip / n if n else float("nan")
    return result
