"""The fallback SparseLinear backends: "dense" (masked dense weight, cached) and "reference" (rebuilt per call).

"dense" is cuBLAS / the CPU matmul on the masked dense weight, cached while
the weights do not change (``ops.weight_cache``): never slower than a plain
nn.Linear, and "auto"'s yardstick. "reference" rebuilds the dense weight on
every call: the exact masked-dense semantics every kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import weight_cache
from .linear import apply_activation, autocast_input, register_backend
from .registry import Backend


def _reference_forward(module, x: torch.Tensor) -> torch.Tensor:
    # Rebuilding the dense weight each call is the point of the reference: it
    # is the masked-dense semantics every kernel backend is tested against.
    return apply_activation(module, F.linear(x, module.to_dense(), module.bias))


def _dense_forward(module, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and module.values.requires_grad:
        # Training: rebuilt so gradients reach the stored values (an O(out*in)
        # pass, small next to the matmul).
        return apply_activation(module, F.linear(x, module.to_dense(), module.bias))
    # Inference: the dense weight in the compute dtype, made once per weight
    # state (lotus_kernels.ops.weight_cache); compiled, through the op that looks it
    # up at run time.
    x, bias = autocast_input(x, module.bias)
    shape = (module.out_features, module.in_features)
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():
            y = weight_cache.dense_linear_cached(x, module.values, list(module.index_tensors()), bias, module.pattern, *shape)
        else:
            weight = weight_cache.dense_weight(module.pattern, module.values, module.index_tensors(), shape, x.dtype)
            y = F.linear(x, weight, bias)
    return apply_activation(module, y)


register_backend(
    Backend(
        name="dense",
        description="cuBLAS / CPU matmul on the masked dense weight, kept while the weights do not change "
        "(memory of a dense layer; no speedup, never slower than nn.Linear)",
        why_not=lambda spec: None,
        forward=_dense_forward,
    )
)
register_backend(
    Backend(
        name="reference",
        description="pure torch: rebuilds the masked dense weight on every call (the semantics kernels are tested "
        "against; explicit backend='reference' only)",
        why_not=lambda spec: None,
        forward=_reference_forward,
        auto=lambda spec: False,
    )
)
