"""Backends: who computes an op, and how "auto" picks one (one registry class for every op family).

``registry``: Backend, the specs, ``Registry`` and its two instances, LINEAR
(SparseLinear) and ATTENTION (patch_drop_attention). ``linear``: SparseLinear's
"auto" (timed per shape class, decisions persisted). The backends themselves:
``triton``, ``cusparselt``, ``dense`` (dense and reference) and ``attention``;
they register when ``lotus_kernels`` is imported.
"""

from .linear import (
    Decision,
    apply_activation,
    auto_cache_path,
    auto_candidates,
    auto_choices,
    autocast_input,
    autocast_operands,
    backend_names,
    check_backend_name,
    explain,
    register_backend,
    saved_auto_choices,
    select,
    select_for,
    time_backend_ms,
)
from .._shared import rows_bucket
from .registry import ATTENTION, AUTO, LINEAR, AttentionSpec, Backend, LayerSpec, Registry

__all__ = [
    "ATTENTION", "AUTO", "LINEAR", "AttentionSpec", "Backend", "Decision", "LayerSpec", "Registry",
    "apply_activation", "auto_cache_path", "auto_candidates", "auto_choices", "autocast_input", "autocast_operands",
    "backend_names", "check_backend_name", "explain", "register_backend", "rows_bucket", "saved_auto_choices", "select",
    "select_for", "time_backend_ms",
]
