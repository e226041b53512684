"""One backend registry, for SparseLinear's matmul and for patch-drop attention.

A backend is a named implementation of one op family with a ``why_not(spec)``
(None when it can run that spec, else the reason) and an ``auto(spec)``
(whether "auto" may pick it there). A ``Registry`` keeps one family's
backends in preference order: kernel backends in the order they register,
the fallbacks named ``last`` behind them. ``LINEAR`` holds SparseLinear's
("triton", "cusparselt", "dense", "reference"; "auto" may time them, see
``backends.linear``); ``ATTENTION`` holds patch_drop_attention's ("triton",
"sdpa", "reference"; "auto" takes the first that allows it). The backends
register when ``lotus_kernels`` is imported (``lotus_kernels.backends.{triton,
cusparselt, dense, attention}``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

AUTO = "auto"


@dataclass(frozen=True)
class LayerSpec:
    """What a SparseLinear backend's choice depends on."""

    pattern: str
    device: torch.device
    dtype: torch.dtype
    block_size: tuple[int, int] | None = None  # "block" pattern only
    features: tuple[int, int] | None = None  # (out_features, in_features); None: not shape-specific


@dataclass(frozen=True)
class AttentionSpec:
    """What a patch-drop attention backend's choice depends on."""

    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    # spec -> None when usable, else the reason it is not.
    why_not: Callable[[object], str | None]
    # LINEAR: (module, x [..., in_features]) -> y [..., out_features];
    # ATTENTION: (qkv5 [B, N, 3, H, D], keep_idx [B, K] | None, scale, return_cls, num_prefix, padded) -> out (, cls).
    forward: Callable
    # spec -> whether "auto" may consider it (e.g. not the Triton interpreter on CPU).
    auto: Callable[[object], bool] = lambda spec: True


class Registry:
    """One op family's backends, in "auto" preference order (``last`` fallbacks stay at the end)."""

    def __init__(self, op: str, last: Sequence[str] = (), unusable: type[Exception] = RuntimeError):
        self.op = op
        self.last = tuple(last)
        self.unusable = unusable  # what an explicitly named backend that cannot run the spec raises
        self._backends: dict[str, Backend] = {}
        self._listeners: list[Callable[[], None]] = []

    def register(self, backend: Backend) -> None:
        """Adds (or replaces) a backend; the ``last`` fallbacks move behind it."""
        self._backends[backend.name] = backend
        for name in self.last:
            if name in self._backends and backend.name not in self.last:
                self._backends[name] = self._backends.pop(name)
        for listener in self._listeners:
            listener()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Calls ``listener()`` whenever a backend registers (decisions cached elsewhere go stale)."""
        self._listeners.append(listener)

    def names(self) -> list[str]:
        return list(self._backends)

    def __getitem__(self, name: str) -> Backend:
        return self._backends[name]

    def check_name(self, name, what: str = "backend") -> str:
        """name, or ValueError listing the names this registry takes ("auto" and every backend)."""
        if name != AUTO and name not in self._backends:
            raise ValueError(f"{self.op}: {what} must be one of {[AUTO, *self._backends]}, got {name!r}")
        return name

    def explain(self, spec) -> list[tuple[str, str | None]]:
        """[(backend name, None if usable else why not)] in "auto" preference order."""
        return [(b.name, b.why_not(spec)) for b in self._backends.values()]

    def auto_candidates(self, spec) -> list[Backend]:
        """The backends "auto" would consider for this spec, in preference order."""
        return [b for b in self._backends.values() if b.why_not(spec) is None and b.auto(spec)]

    def explicit(self, name: str, spec) -> Backend:
        """The backend named, or RuntimeError saying why it cannot run this spec."""
        reason = self._backends[self.check_name(name)].why_not(spec)
        if reason is not None:
            raise self.unusable(f"{self.op}: backend {name!r} cannot run {describe(spec)}: {reason}")
        return self._backends[name]

    def candidates_or_raise(self, spec) -> list[Backend]:
        candidates = self.auto_candidates(spec)
        if not candidates:
            detail = "; ".join(f"{n}: {r}" for n, r in self.explain(spec))
            raise RuntimeError(f"{self.op}: no backend can run {describe(spec)} ({detail})")
        return candidates

    def select(self, name: str, spec) -> Backend:
        """The backend named, or for "auto" the first candidate (no measuring)."""
        if name != AUTO:
            return self.explicit(name, spec)
        return self.candidates_or_raise(spec)[0]


def describe(spec) -> str:
    """A spec in words, for errors."""
    pattern = f"{spec.pattern!r} " if isinstance(spec, LayerSpec) else ""
    return f"{pattern}on {spec.device} {spec.dtype}"


LINEAR = Registry("SparseLinear", last=("dense", "reference"))
# An attention backend that cannot run is the caller's tensors' fault (device, dtype): ValueError.
ATTENTION = Registry("patch_drop_attention", last=("reference",), unusable=ValueError)
