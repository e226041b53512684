"""Backends that compute SparseLinear's forward, and how "auto" chooses one.

A backend says, for a (pattern, device, dtype), whether it can run and if not
why; "auto" takes the first that can, in registration order, with
"reference" (pure torch, any device, exact masked-dense semantics) as the
last resort. Kernel backends ("triton", "cusparselt") register themselves
ahead of it; SparseLinear's contract does not change when they do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    # (pattern, device, dtype) -> None when usable, else the reason it is not.
    why_not: Callable[[str, torch.device, torch.dtype], str | None]
    # (module, x [..., in_features]) -> y [..., out_features]
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


_REGISTRY: dict[str, Backend] = {}
AUTO = "auto"


def register_backend(backend: Backend) -> None:
    """Adds a backend. "auto" tries backends in registration order, "reference" always last."""
    _REGISTRY[backend.name] = backend
    if "reference" in _REGISTRY and backend.name != "reference":
        _REGISTRY["reference"] = _REGISTRY.pop("reference")


def backend_names() -> list[str]:
    return list(_REGISTRY)


def check_backend_name(name) -> str:
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(f"backend must be one of {[AUTO, *_REGISTRY]}, got {name!r}")
    return name


def explain(pattern: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    """[(backend name, None if usable else why not)] in "auto" preference order."""
    return [(b.name, b.why_not(pattern, torch.device(device), dtype)) for b in _REGISTRY.values()]


def select(name: str, pattern: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs: ``name`` itself, or for "auto" the first usable one."""
    reasons = explain(pattern, device, dtype)
    if name != AUTO:
        reason = dict(reasons)[name]
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run pattern {pattern!r} on {device} {dtype}: {reason}")
        return _REGISTRY[name]
    for candidate, reason in reasons:
        if reason is None:
            return _REGISTRY[candidate]
    detail = "; ".join(f"{n}: {r}" for n, r in reasons)
    raise RuntimeError(f"no backend can run pattern {pattern!r} on {device} {dtype} ({detail})")


def _reference_forward(module, x: torch.Tensor) -> torch.Tensor:
    # Rebuilding the dense weight each call is the point of the reference: it
    # is the masked-dense semantics every kernel backend is tested against.
    return F.linear(x, module.to_dense(), module.bias)


register_backend(
    Backend(
        name="reference",
        description="pure torch: rebuilds the masked dense weight and calls F.linear (any device; no speedup)",
        why_not=lambda pattern, device, dtype: None,
        forward=_reference_forward,
    )
)
