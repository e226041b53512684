"""The "cusparselt" backend of SparseLinear(pattern="2:4"): NVIDIA cuSPARSELt (``ops.cusparselt``).

"auto" races it against the Triton kernel and the dense matmul per shape
(``backends.linear``), but only in a call configuration a GPU run has proven
(``ops.cusparselt.PROVEN``): a device fault in a trial run would kill the
process's CUDA context, so it cannot be raced to find out.
"""

from __future__ import annotations

import torch

from ..ops import cusparselt
from .linear import apply_activation, autocast_input, register_backend
from .registry import Backend, LayerSpec


def why_not(spec: LayerSpec) -> str | None:
    """None when the cusparselt backend can run a layer of this spec, else why not."""
    if spec.pattern != "2:4":
        return "runs pattern '2:4' only"
    if cusparselt.call_config() is None:
        return cusparselt.config_error() or f"turned off ({cusparselt.ENV}=off)"
    if spec.device.type != "cuda":
        return "needs a CUDA device (NVIDIA cuSPARSELt)"
    if spec.dtype not in cusparselt.CUSPARSELT_DTYPES:
        return f"dtype must be one of {cusparselt.CUSPARSELT_DTYPES} (torch's cuSPARSELt binding has no fp32), got {spec.dtype}"
    if spec.features is not None and any(f % cusparselt.WEIGHT_MULTIPLE for f in spec.features):
        return f"out_features and in_features must be multiples of {cusparselt.WEIGHT_MULTIPLE}, got {spec.features}"
    if torch.compiler.is_compiling():
        return cusparselt.known_device_reason(spec.device)  # decided eagerly before the trace, or assumed fine
    return cusparselt.device_reason(spec.device)


def cusparselt_linear(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` through cuSPARSELt: x [..., in_features] -> [..., out_features] (differentiable)."""
    x, bias = autocast_input(x, module.bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        # The stored values go in uncast: the op keys its packed copy on them.
        y = cusparselt.cusparselt_matmul(x2, module.values, module.metadata, bias)
    return apply_activation(module, y.reshape(*lead, module.out_features))


def auto_may_race(spec: LayerSpec) -> bool:
    """Whether "auto" may time this backend: only in a configuration proven on a GPU."""
    config = cusparselt.call_config()
    return config is not None and config.name in cusparselt.PROVEN


register_backend(
    Backend(
        name="cusparselt",
        description="NVIDIA cuSPARSELt 2:4 matmul via torch._cslt_sparse_mm (packed once per weight; called as "
        "torch's semi-structured path calls it unless LOTUS_CUSPARSELT says otherwise), forward and backward",
        why_not=why_not,
        forward=cusparselt_linear,
        auto=auto_may_race,
    )
)
