"""One training step for every training loop: ``TrainStep``.

A step is: the learning rate of this step written into the optimizer; the
forward under autocast (through a token hook if there is one); the loss
(cross-entropy with label smoothing, or against the soft targets of
mixup/cutmix); backward (through the GradScaler with fp16); clipping of the
global gradient norm; the optimizer step and the scaler update; and, if
asked, the weight EMA update. ``loop.train`` builds one per run, and every
training loop of the package is ``loop.train``: the dense run, tickets,
fine-tuning, the pipeline's stages and Instant Soup's ingredients
(``method.instant_soup.make_train_fn``).

Why the step is written the way it is (a small ViT's step is host-bound: the
eager timm forward + backward is thousands of operator calls of a few
microseconds each, far more host time than GPU time at CIFAR sizes):

- ``compile=True`` compiles forward + loss (+ train accuracy) as one module
  with ``torch.compile``; AOTAutograd compiles the backward with it, so each
  direction is a few fused kernels. ``compile_mode="reduce-overhead"`` adds
  CUDA graphs (the step then marks each iteration for cudagraph trees).
  Deep copies of a model reuse the compiled code (dynamo lifts parameters as
  inputs), so Instant Soup's ingredients compile once.
- Nothing in the step reads a device value on the host: the loss and the
  count of correct predictions come back as device scalars, clipping uses
  the foreach norms, and with fp16 the scaler hands its inf check to fused
  AdamW as a device tensor (``train`` builds a fused AdamW wherever torch
  has one). The caller reads the scalars when it needs them (once an epoch).
- With ``compile="auto"`` (the engine's default on CUDA), a compilation that
  fails in the first step is reported in a warning and the run continues
  eagerly; an explicit ``compile=True`` raises instead.

Nothing here queries the GPU at import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.loader import BatchDraws

__all__ = ["COMPILE_MODES", "StepOutput", "check_compile", "TrainStep", "WeightEMA", "warn_compile_failed"]

# torch.compile's modes; "reduce-overhead" and "max-autotune" add CUDA graphs on CUDA (nothing on CPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(compile, compile_mode: str) -> None:
    """ValueError unless compile is True, False or "auto" and compile_mode one of COMPILE_MODES
    (the arguments TrainStep, evaluate and Instant Soup's train function take alike)."""
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")


_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for ``dtype`` on ``device``'s type, or nothing (fp32) when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def needs_draws(hook) -> bool:
    return bool(getattr(hook, "needs_draws", False))


class HookedForward(nn.Module):
    """model behind a token_hook, as one module, so DDP and torch.compile wrap the hooked forward.

    A hook with ``needs_draws = True`` is called as hook(model, x, draws)
    with the batch's ``data.BatchDraws`` (travelling as three tensors so DDP
    and torch.compile see plain tensor arguments).
    """

    def __init__(self, model: nn.Module, hook: Callable, padding: int = 0):
        super().__init__()
        self.model = model
        self.hook = hook
        self.padding = padding

    def forward(self, x, indices=None, offsets=None, flips=None):
        if needs_draws(self.hook):
            return self.hook(self.model, x, BatchDraws(indices, offsets, flips, self.padding))
        return self.hook(self.model, x)


class _LossForward(nn.Module):
    """forward + loss + correct count as one module: what DDP wraps and torch.compile compiles.

    targets: int64 [B] labels (loss with label smoothing) or float32 [B, C]
    soft targets (mixup/cutmix: already smoothed). labels: the clean int64
    [B] labels the train accuracy counts against. Returns (loss float32 [],
    correct int64 []), both on the device: nothing is read on the host.
    """

    def __init__(self, forward: nn.Module, label_smoothing: float, amp_dtype: torch.dtype | None, device: torch.device, with_draws: bool):
        super().__init__()
        self.forward_module = forward
        self.label_smoothing = float(label_smoothing)
        self.amp_dtype = amp_dtype
        self.device_type = device.type
        self.with_draws = with_draws

    def forward(self, x, targets, labels, indices=None, offsets=None, flips=None):
        if self.amp_dtype is None:
            logits = self.forward_module(x, indices, offsets, flips) if self.with_draws else self.forward_module(x)
        else:
            with torch.autocast(device_type=self.device_type, dtype=self.amp_dtype):
                logits = self.forward_module(x, indices, offsets, flips) if self.with_draws else self.forward_module(x)
        logits = logits.float()
        if targets.dim() == 2:
            loss = F.cross_entropy(logits, targets)
        else:
            loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        correct = (logits.detach().argmax(1) == labels).sum()
        return loss, correct


class WeightEMA:
    """An exponential moving average of a model's parameters, in a deep copy of the model.

    After optimizer step t (1-based) the copy's parameters move towards the
    model's by ``1 - d`` with d = min(decay, (1 + t) / (10 + t)): the usual
    warm-up, so the average does not stay stuck near the initial weights in
    short runs. One foreach lerp over all parameters, no host sync.
    Buffers are copied when the average is made and not averaged (a ViT's
    buffers, such as SparseLinear's index structure, do not train).

    ``module``: the averaged copy (eval mode, no gradients); evaluate it.
    """

    def __init__(self, model: nn.Module, decay: float):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be a number in (0, 1), got {decay!r}")
        self.decay = float(decay)
        import copy

        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        pairs = [
            (e, p) for (name, e), (other, p) in zip(self.module.named_parameters(), model.named_parameters()) if p.requires_grad
        ]
        self._ema = [e for e, _ in pairs]
        self._params = [p for _, p in pairs]

    def update(self, step: int) -> None:
        weight = 1.0 - min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self._ema, self._params, weight)

    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (the module the average follows)."""
        with torch.no_grad():
            for p, e in zip(self._params, self._ema):
                p.copy_(e)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state) -> None:
        self.module.load_state_dict(state)


@dataclasses.dataclass
class StepOutput:
    """What one step returns, all on the device (reading them on the host syncs it).

    loss: float32 [] (the loss that was minimised); correct: int64 [], rows
    whose argmax is the clean label; lr: the learning rate of the step (a float).
    """

    loss: torch.Tensor
    correct: torch.Tensor
    lr: float


class TrainStep:
    """One optimizer step per call: ``step(step_index, x, targets, labels, draws=None) -> StepOutput``.

    model: the module whose parameters train (on its device already).
    optimizer: built over the model's parameters (``train`` uses AdamW with
        ``optim.param_groups``, fused where torch has it).
    schedule(step_index) -> lr: the learning rate of step ``step_index``
        (0-based), written into every param group before the step.
    label_smoothing: for integer targets (soft targets carry their own).
    grad_clip: max global gradient norm (0: no clipping); with fp16 the
        gradients are unscaled first.
    amp_dtype: autocast dtype (None: fp32). scaler: a torch.amp.GradScaler
        (None: a disabled one).
    token_hook, padding: as ``loop.train``'s token_hook (the loader's crop
        padding for hooks that need the batch's draws).
    distributed: wrap in DistributedDataParallel (a process group must be
        initialised); device_ids from the model's device.
    compile: True (torch.compile forward + loss, and so the backward),
        False, or "auto" (True, but a failed compilation in the first step
        falls back to eager with a warning; not under DDP, where it raises).
    compile_mode: one of ``COMPILE_MODES``.
    ema: a ``WeightEMA`` updated after every optimizer step, or None.

    x: float32 [B, 3, H, W]; targets: int64 [B] or float32 [B, C]; labels:
    int64 [B]; draws: the batch's ``data.BatchDraws`` (used by hooks that
    need them).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        schedule: Callable[[int], float],
        label_smoothing: float = 0.0,
        grad_clip: float = 0.0,
        amp_dtype: torch.dtype | None = None,
        scaler: torch.amp.GradScaler | None = None,
        token_hook: Callable | None = None,
        padding: int = 0,
        distributed: bool = False,
        compile: bool | str = False,
        compile_mode: str = "default",
        ema: WeightEMA | None = None,
    ):
        check_compile(compile, compile_mode)
        if not callable(schedule):
            raise TypeError(f"schedule must be callable(step) -> lr, got {type(schedule).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.grad_clip = float(grad_clip)
        self.device = module_device(model)
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(self.device.type, enabled=False)
        self.with_draws = needs_draws(token_hook)
        self.ema = ema
        forward: nn.Module = HookedForward(model, token_hook, padding) if token_hook is not None else model
        core: nn.Module = _LossForward(forward, label_smoothing, amp_dtype, self.device, self.with_draws)
        if distributed:
            core = _ddp(core, self.device)
        self.distributed = distributed
        self._eager = core
        self._run = core
        self._fallback = compile == "auto" and not distributed
        self._first = bool(compile)
        self.compiled = bool(compile)
        self._cudagraphs = False
        if compile:
            self._run = torch.compile(core, mode=compile_mode, dynamic=False)
            self._cudagraphs = compile_mode in _CUDAGRAPH_MODES and self.device.type == "cuda"
        # Clip what the optimizer trains (parameters without a gradient are skipped by the norm).
        self._params: Sequence[torch.Tensor] = [p for group in optimizer.param_groups for p in group["params"]]
        # The foreach norm and scaling: one call over all gradients where torch has it (CUDA's
        # kernels; on a CPU a C++ loop of the same per-tensor ops, so the same numbers bit for bit)
        # instead of clip_grad_norm_'s default there, a Python loop of ~2 calls per parameter.
        self._foreach_clip = True if self.device.type in ("cpu", "cuda") else None

    def __call__(self, step: int, x: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, draws: BatchDraws | None = None) -> StepOutput:
        lr = float(self.schedule(step))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        extra = (draws.indices, draws.offsets, draws.flips) if self.with_draws and draws is not None else ()
        if not self._first:
            loss, correct = self._forward_backward(self._run, x, targets, labels, extra)
        else:
            self._first = False
            try:
                loss, correct = self._forward_backward(self._run, x, targets, labels, extra)
            except Exception as e:  # noqa: BLE001 - any compiler failure; a genuine model error recurs eagerly below
                if not self._fallback:
                    raise
                warn_compile_failed("training step", e)
                self._run, self.compiled, self._cudagraphs = self._eager, False, False
                loss, correct = self._forward_backward(self._run, x, targets, labels, extra)
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            # After DDP's all-reduce: the norm of the averaged (global) gradient, the same on every rank.
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip, foreach=self._foreach_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(step + 1)
        return StepOutput(loss.detach(), correct, lr)

    def _forward_backward(self, run, x, targets, labels, extra):
        if self._cudagraphs:
            # The previous step's graph outputs are done with: cudagraph trees may reuse their memory.
            torch.compiler.cudagraph_mark_step_begin()
        self.optimizer.zero_grad(set_to_none=True)
        loss, correct = run(x, targets, labels, *extra)
        self.scaler.scale(loss).backward()
        return loss, correct


def warn_compile_failed(what: str, error: Exception) -> None:
    """The one warning of a compilation that failed under compile="auto" (the work then runs eagerly)."""
    first = (str(error).splitlines() or [""])[0][:300]
    warnings.warn(
        f"torch.compile of the {what} failed ({type(error).__name__}: {first}); running it eagerly "
        "(compile='auto'; compile=True makes this an error, compile=False skips compiling)",
        stacklevel=3,
    )


def module_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter (else buffer; else the CPU)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _ddp(module: nn.Module, device: torch.device) -> nn.Module:
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # No buffer sync before every forward: a ViT has no running statistics,
    # and SparseLinear's index buffers are identical on every rank. (torch >=
    # 2.15 renamed the switch; 2.11 knows only the old name.)
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
