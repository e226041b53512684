"""Patch-drop attention's backends (registry ``ATTENTION``): "triton", "sdpa", "reference".

"auto" takes the first that allows it: the fused Triton kernel on CUDA, else
SDPA on the gathered tokens. On CPU the Triton kernel is the interpreter (a
test vehicle, slow): by name only. No timing race here: the fused kernel
reads only the kept tokens, the others copy them first.
"""

from __future__ import annotations

from ..ops.patch_drop_attention import (
    patch_drop_attention_reference,
    patch_drop_attention_sdpa,
    patch_drop_attention_triton,
)
from .registry import ATTENTION, Backend
from .triton import device_reason


ATTENTION.register(
    Backend(
        name="triton",
        description="fused gather + flash attention over the kept tokens (Triton), forward and backward",
        why_not=lambda spec: device_reason(spec.device, spec.dtype),
        forward=patch_drop_attention_triton,
        auto=lambda spec: spec.device.type == "cuda",
    )
)
ATTENTION.register(
    Backend(
        name="sdpa",
        description="gather the kept tokens (a copy), then torch's scaled_dot_product_attention",
        why_not=lambda spec: None,
        forward=patch_drop_attention_sdpa,
    )
)
ATTENTION.register(
    Backend(
        name="reference",
        description="gather + fp32 softmax attention (the semantics the kernels are tested against; by name only)",
        why_not=lambda spec: None,
        forward=patch_drop_attention_reference,
        auto=lambda spec: False,
    )
)
