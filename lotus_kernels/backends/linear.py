"""SparseLinear's backends (registry ``LINEAR``), and how "auto" chooses one.

A backend says, for a layer spec (pattern, device, dtype, block size, weight
shape), whether it can run and if not why. Built in: "dense" (cuBLAS / CPU
matmul on the masked dense weight, cached while the weights do not change:
the fallback that is never slower than a plain nn.Linear) and "reference"
(pure torch, rebuilds the dense weight on every call: the exact masked-dense
semantics every kernel is tested against; explicit use only). Kernel backends
register themselves ("triton" from backends.triton, "cusparselt" from
backends.cusparselt) before them; SparseLinear's contract does not
change when they do.

"auto" considers the usable backends that allow automatic use there, in
registration order:
- one candidate: it runs;
- several, on CUDA: each is timed once per (spec, weight shape, nnz, rows of
  x rounded up to a power of two, inference or training) and the fastest is
  kept; in training (grad enabled, values requiring grad) the time is forward
  plus backward, since a kernel can win the forward and lose the whole
  step; "dense" stays in
  the race, so a kernel backend is used only where it measured faster than
  the dense matmul of the same weights. Decisions are also written to
  ``<LOTUS_CACHE_DIR or ~/.cache/lotus_kernels>/auto_choices.json`` per GPU
  model and library versions, so a later process reuses them without timing
  again (``LOTUS_AUTO_CACHE=0`` turns the file off) and ``python -m
  lotus_kernels.info`` lists them. No timing happens inside a torch.compile
  trace: there this process's decision for the key runs, or else "dense"
  (never a blind guess at a kernel); run one eager forward (or training
  step) before compiling to let "auto" measure.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._shared import rows_bucket
from .registry import AUTO, LINEAR, Backend, LayerSpec

_AUTO_CHOICE: dict = {}
# A new backend changes what "auto" may pick: decide again.
LINEAR.on_change(_AUTO_CHOICE.clear)


def register_backend(backend: Backend) -> None:
    """Adds a SparseLinear backend. "auto" tries backends in registration order, "dense" and "reference" last."""
    LINEAR.register(backend)


def backend_names() -> list[str]:
    return LINEAR.names()


def check_backend_name(name) -> str:
    return LINEAR.check_name(name)


def explain(spec: LayerSpec) -> list[tuple[str, str | None]]:
    """[(backend name, None if usable else why not)] in "auto" preference order."""
    return LINEAR.explain(spec)


def auto_candidates(spec: LayerSpec) -> list[Backend]:
    """The backends "auto" would consider for this spec, in preference order."""
    return LINEAR.auto_candidates(spec)


def select(name: str, spec: LayerSpec) -> Backend:
    """The backend named, or for "auto" the first candidate (no measuring)."""
    return LINEAR.select(name, spec)


class Decision(NamedTuple):
    """What one "auto" decision is for (the in-process cache key; its text is the persisted one)."""

    spec: LayerSpec
    values_shape: tuple[int, ...]
    out_features: int
    in_features: int
    rows: int  # rows of x rounded up to a power of two
    candidates: tuple[str, ...]
    mode: str  # "fwd" (inference) or "fwd+bwd" (training)


def select_for(module, x: torch.Tensor, spec: LayerSpec, timer: Callable | None = None) -> Backend:
    """The backend that runs ``module(x)``: see the module docstring for how "auto" decides.

    timer(backend, module, x) -> milliseconds; default: CUDA events, median of 10.
    Runs on every forward: each backend's check is evaluated once per call.
    """
    if module.backend != AUTO:
        return LINEAR.explicit(module.backend, spec)
    candidates = LINEAR.candidates_or_raise(spec)
    if len(candidates) == 1 or x.device.type != "cuda":
        return candidates[0]
    names = tuple(b.name for b in candidates)
    training = torch.is_grad_enabled() and module.values.requires_grad
    rows = rows_bucket(math.prod(x.shape[:-1]))
    key = Decision(spec, tuple(module.values.shape), module.out_features, module.in_features, rows, names, "fwd+bwd" if training else "fwd")
    if key in _AUTO_CHOICE:
        return LINEAR[_AUTO_CHOICE[key]]
    if torch.compiler.is_compiling():
        # No timing (nor file reading) inside a trace: the safe choice, never slower than nn.Linear.
        return LINEAR["dense"] if "dense" in names else candidates[0]
    saved = _saved_choice(key, x.device)
    if saved is not None:
        _AUTO_CHOICE[key] = saved
        return LINEAR[saved]
    timer = timer or time_backend_ms
    with torch.enable_grad() if training else torch.no_grad():
        times = {b.name: timer(b, module, x) for b in candidates}
    _AUTO_CHOICE[key] = min(times, key=times.get)
    _save_choice(key, x.device, times)
    return LINEAR[_AUTO_CHOICE[key]]


def auto_choices() -> dict[Decision, str]:
    """What "auto" has decided so far in this process (for info and benchmarks)."""
    return dict(_AUTO_CHOICE)


# ----------------------------------------------------- persisted decisions
# One JSON file: {device key: {decision key: {"choice", "times_ms"}}}. The
# device key names the GPU model and the versions that change kernel speed,
# so a driver / torch / triton / lotus upgrade measures afresh.


def auto_cache_path() -> Path | None:
    """Where decisions are persisted, or None when LOTUS_AUTO_CACHE=0."""
    if os.environ.get("LOTUS_AUTO_CACHE", "1") == "0":
        return None
    root = os.environ.get("LOTUS_CACHE_DIR") or os.path.join("~", ".cache", "lotus_kernels")
    return Path(os.path.expanduser(root)) / "auto_choices.json"


def _device_key(device: torch.device) -> str:
    import importlib.metadata

    def version(name):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
        return "none"

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name} | torch {torch.__version__} | triton {version('triton')} | lotus {version('lotus-kernels')}"


def _decision_key(key: Decision) -> str:
    spec = key.spec
    block = "" if spec.block_size is None else f" block {spec.block_size[0]}x{spec.block_size[1]}"
    return (
        f"{spec.pattern}{block} {str(spec.dtype).removeprefix('torch.')} out {key.out_features} in {key.in_features} "
        f"values {list(key.values_shape)} rows<={key.rows} {key.mode} among {','.join(key.candidates)}"
    )


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or corrupt: measure again (and rewrite it)
    return data if isinstance(data, dict) else {}


def _saved_choice(key: Decision, device: torch.device) -> str | None:
    path = auto_cache_path()
    if path is None or device.type != "cuda":
        return None
    entry = _read_cache(path).get(_device_key(device), {}).get(_decision_key(key))
    choice = entry.get("choice") if isinstance(entry, dict) else None
    return choice if choice in key.candidates else None


def _save_choice(key: Decision, device: torch.device, times: dict[str, float]) -> None:
    path = auto_cache_path()
    if path is None or device.type != "cuda":
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data.setdefault(_device_key(device), {})[_decision_key(key)] = {
            "choice": min(times, key=times.get),
            "times_ms": {k: round(v, 5) for k, v in times.items()},
        }
        # Written whole and renamed: concurrent processes never see half a file.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError:
        pass  # a read-only home must not break a forward pass; the in-process cache still holds


def saved_auto_choices(device: torch.device | str | None = None) -> dict[str, dict]:
    """Persisted decisions {device key: {decision: {"choice", "times_ms"}}}, for one device if given."""
    path = auto_cache_path()
    data = _read_cache(path) if path is not None else {}
    if device is None:
        return data
    key = _device_key(torch.device(device))
    return {key: data.get(key, {})}


def time_backend_ms(backend: Backend, module, x: torch.Tensor, repeats: int = 10) -> float:
    """Median time of backend.forward(module, x) on the current CUDA stream, after one warm-up call;
    with grad enabled, of forward plus backward (gradients returned and dropped, never
    accumulated into .grad: timing must not change training)."""
    training = torch.is_grad_enabled()
    x = x.detach().requires_grad_(training and x.requires_grad)  # the caller's graph stays untouched
    inputs = [t for t in (module.values, module.bias, x) if t is not None and t.requires_grad] if training else []

    def fn():
        y = backend.forward(module, x)
        if inputs:
            torch.autograd.grad(y, inputs, torch.ones_like(y))

    fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(start, end):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(start, end))[repeats // 2]


def apply_activation(module, y: torch.Tensor) -> torch.Tensor:
    """The layer's epilogue for backends that do not fuse it: exact GELU or nothing."""
    return F.gelu(y) if module.activation == "gelu" else y


def autocast_operands(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None):
    """(x, values, bias) in the autocast dtype when autocast is on for x's device: what F.linear does there."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, values, bias
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype), values.to(dtype), bias.to(dtype) if bias is not None else None


def autocast_input(x: torch.Tensor, bias: torch.Tensor | None):
    """(x, bias) in the compute dtype (autocast's when on for x's device, else x's), for
    backends whose weight copy is cast once, when it is made (lotus_kernels.ops.weight_cache)."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return x, bias.to(x.dtype) if bias is not None else None
