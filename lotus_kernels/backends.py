"""Backends that compute SparseLinear's forward, and how "auto" chooses one.

A backend says, for a layer spec (pattern, device, dtype, block size), whether
it can run and if not why. "auto" considers the usable backends that allow
automatic use there, in registration order with "reference" (pure torch, any
device, exact masked-dense semantics) always last:
- one candidate: it runs;
- several, on CUDA: each is timed once per (spec, weight shape, nnz, rows of
  x rounded up to a power of two) and the fastest is cached; the reference
  (a cuBLAS matmul on the rebuilt dense weight) stays in the race, so a kernel
  backend is used only where it measured faster. No timing happens inside a
  torch.compile trace: there the cached choice, or the first candidate, runs.
Kernel backends register themselves (lotus_kernels.triton); SparseLinear's
contract does not change when they do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LayerSpec:
    pattern: str
    device: torch.device
    dtype: torch.dtype
    block_size: tuple[int, int] | None = None  # "block" pattern only


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    # spec -> None when usable, else the reason it is not.
    why_not: Callable[[LayerSpec], str | None]
    # (module, x [..., in_features]) -> y [..., out_features]
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    # spec -> whether "auto" may consider it (e.g. not the Triton interpreter on CPU).
    auto: Callable[[LayerSpec], bool] = lambda spec: True


_REGISTRY: dict[str, Backend] = {}
_AUTO_CHOICE: dict[tuple, str] = {}
AUTO = "auto"


def register_backend(backend: Backend) -> None:
    """Adds a backend. "auto" tries backends in registration order, "reference" always last."""
    _REGISTRY[backend.name] = backend
    if "reference" in _REGISTRY and backend.name != "reference":
        _REGISTRY["reference"] = _REGISTRY.pop("reference")
    _AUTO_CHOICE.clear()


def backend_names() -> list[str]:
    return list(_REGISTRY)


def check_backend_name(name) -> str:
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(f"backend must be one of {[AUTO, *_REGISTRY]}, got {name!r}")
    return name


def explain(spec: LayerSpec) -> list[tuple[str, str | None]]:
    """[(backend name, None if usable else why not)] in "auto" preference order."""
    return [(b.name, b.why_not(spec)) for b in _REGISTRY.values()]


def auto_candidates(spec: LayerSpec) -> list[Backend]:
    """The backends "auto" would consider for this spec, in preference order."""
    return [b for b in _REGISTRY.values() if b.why_not(spec) is None and b.auto(spec)]


def select(name: str, spec: LayerSpec) -> Backend:
    """The backend named, or for "auto" the first candidate (no measuring)."""
    if name != AUTO:
        return _explicit(name, spec)
    return _candidates_or_raise(spec)[0]


def _explicit(name: str, spec: LayerSpec) -> Backend:
    reason = _REGISTRY[name].why_not(spec)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run {spec.pattern!r} on {spec.device} {spec.dtype}: {reason}")
    return _REGISTRY[name]


def _candidates_or_raise(spec: LayerSpec) -> list[Backend]:
    candidates = auto_candidates(spec)
    if not candidates:
        detail = "; ".join(f"{n}: {r}" for n, r in explain(spec))
        raise RuntimeError(f"no backend can run {spec.pattern!r} on {spec.device} {spec.dtype} ({detail})")
    return candidates


def select_for(module, x: torch.Tensor, spec: LayerSpec, timer: Callable | None = None) -> Backend:
    """The backend that runs ``module(x)``: see the module docstring for how "auto" decides.

    timer(backend, module, x) -> milliseconds; default: CUDA events, median of 10.
    Runs on every forward: each backend's check is evaluated once per call.
    """
    if module.backend != AUTO:
        return _explicit(module.backend, spec)
    candidates = _candidates_or_raise(spec)
    if len(candidates) == 1 or x.device.type != "cuda":
        return candidates[0]
    rows = max(1, math.prod(x.shape[:-1]))
    key = (spec, tuple(module.values.shape), module.out_features, module.in_features, 1 << (rows - 1).bit_length())
    if key in _AUTO_CHOICE:
        return _REGISTRY[_AUTO_CHOICE[key]]
    if torch.compiler.is_compiling():
        return candidates[0]
    timer = timer or _time_backend_ms
    with torch.no_grad():
        times = {b.name: timer(b, module, x) for b in candidates}
    _AUTO_CHOICE[key] = min(times, key=times.get)
    return _REGISTRY[_AUTO_CHOICE[key]]


def auto_choices() -> dict[tuple, str]:
    """What "auto" has decided so far in this process (for info and benchmarks)."""
    return dict(_AUTO_CHOICE)


def _time_backend_ms(backend: Backend, module, x: torch.Tensor, repeats: int = 10) -> float:
    """Median time of backend.forward(module, x) on the current CUDA stream, after one warm-up call."""

    def fn():
        return backend.forward(module, x)

    fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(start, end):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(start, end))[repeats // 2]


def _reference_forward(module, x: torch.Tensor) -> torch.Tensor:
    # Rebuilding the dense weight each call is the point of the reference: it
    # is the masked-dense semantics every kernel backend is tested against.
    y = F.linear(x, module.to_dense(), module.bias)
    return F.gelu(y) if module.activation == "gelu" else y


register_backend(
    Backend(
        name="reference",
        description="pure torch: rebuilds the masked dense weight and calls F.linear (any device; no speedup)",
        why_not=lambda spec: None,
        forward=_reference_forward,
    )
)
