"""Copies derived from a SparseLinear's stored weight, made once per weight state and found at run time.

Two backends run on a copy of the stored weight rather than on the weight
itself: "dense" on the masked dense matrix, "cusparselt" on the library's
packed buffer. Making the copy costs a pass over the weight, so it is made
once per weight state (after an optimizer step, a load, a re-prune, a .to())
and reused by every call until the next one.

The key. A copy belongs to the stored ``values`` tensor by identity (a
weak reference: the copy goes when the tensor does) and is valid while the
(address, version counter) of values and of the index buffers are those it
was made from. In-place updates (optimizers, load_state_dict, copy_ under
no_grad) bump the version counter; .to() and set_weight_ change the address
or the tensor. Writes through ``.data`` bypass the version counter (that is
what .data is for): update the weights in place under ``torch.no_grad()``
instead. Tensors made under ``torch.inference_mode()`` have no version
counter at all: for them the copy is made on every call (correct, not fast;
build the model outside inference mode and run it inside).

Why at run time. Under torch.compile the copy is looked up inside a custom
op, whose body runs eagerly on every call with the module's own tensors:
a lookup during tracing would bake one copy into the graph (stale after the
first update), and building the copy in the graph would repeat it on every
call. The ops are tagged cudagraph_unsafe so that "reduce-overhead" never
replays them without the lookup.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..layouts import dense_weight_ref

# (id(values), name) -> (weakref to values, state key, copy)
_CACHE: dict[tuple, tuple] = {}

# A CUDA graph replaying an op that reads this cache would skip the lookup. Keyword
# arguments for torch.library.custom_op (empty on a torch without the tag).
_TAG = getattr(torch.Tag, "cudagraph_unsafe", None)
CUDAGRAPH_UNSAFE = {"tags": (_TAG,)} if _TAG is not None and "tags" in inspect.signature(torch.library.custom_op).parameters else {}


def _state(values: torch.Tensor, indices: Sequence[torch.Tensor]) -> tuple:
    return tuple((t.device, t.dtype, t.data_ptr(), t._version) for t in (values, *indices))


def _forget(slot: tuple) -> None:
    _CACHE.pop(slot, None)


def derived(
    name: str, values: torch.Tensor, indices: Sequence[torch.Tensor], build: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``build()`` (under no_grad), kept until ``values`` or ``indices`` change or ``values`` is freed.

    name tells apart copies of one weight (e.g. "dense-torch.float16",
    "cusparselt-torch.bfloat16"). Never in state_dict, never pickled.
    """
    if any(t.is_inference() for t in (values, *indices)):
        # Made under torch.inference_mode: such tensors have no version counter, so an
        # in-place update could not be seen. Correct first: built afresh on every call.
        with torch.no_grad():
            return build()
    slot = (id(values), name)
    state = _state(values, indices)
    hit = _CACHE.get(slot)
    if hit is None or hit[0]() is not values or hit[1] != state:
        # A normal tensor even when first asked for under inference_mode, so that a later
        # call outside it (input gradients through frozen weights) may save it for backward.
        with torch.inference_mode(False), torch.no_grad():
            copy = build()
        # The id check above guards against a new tensor at a freed tensor's id; the
        # callback frees the copy with its tensor.
        hit = _CACHE[slot] = (weakref.ref(values, lambda _, slot=slot: _forget(slot)), state, copy)
    return hit[2]


def cached_nbytes() -> int:
    """Bytes held by derived copies in this process (what the dense and cuSPARSELt backends add to a model)."""
    return sum(copy.numel() * copy.element_size() for _, _, copy in _CACHE.values())


def dense_weight(
    pattern: str, values: torch.Tensor, indices: Sequence[torch.Tensor], shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The masked dense weight [out, in] in ``dtype``, cached (not differentiable: inference only)."""
    return derived(
        f"dense-{dtype}", values, indices, lambda: dense_weight_ref(pattern, values.detach(), tuple(indices), shape).to(dtype)
    )


@torch.library.custom_op("lotus_kernels::dense_linear_cached", mutates_args=(), **CUDAGRAPH_UNSAFE)
def dense_linear_cached(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: list[torch.Tensor],
    bias: torch.Tensor | None,
    pattern: str,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """y [..., out] = x [..., in] @ W^T + bias with W the cached dense weight of the layout, in x's dtype.

    The compiled form of the "dense" backend's path for frozen weights:
    gradients reach x and bias (saliency, bias-only tuning), never ``values``
    (training rebuilds the weight in the graph so that they do).
    """
    weight = dense_weight(pattern, values, indices, (out_features, in_features), x.dtype)
    return F.linear(x, weight, bias)


@dense_linear_cached.register_fake
def _(x, values, indices, bias, pattern, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup(ctx, inputs, output):
    x, values, indices, bias, pattern, out_features, in_features = inputs
    ctx.save_for_backward(values, *indices)
    ctx.layout = (pattern, (out_features, in_features))
    ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None


def _backward(ctx, grad):
    values, *indices = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError(
            "dense_linear_cached: the cached weight is not differentiable w.r.t. values "
            "(the dense backend rebuilds the weight in the graph when values require grad)"
        )
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        # Rebuilt, not looked up: under torch.compile this formula is traced, and the
        # lookup needs real tensors. Input gradients through frozen weights are rare.
        pattern, shape = ctx.layout
        grad_x = grad @ dense_weight_ref(pattern, values, tuple(indices), shape).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, [None] * len(indices), grad_bias, None, None, None


dense_linear_cached.register_autograd(_backward, setup_context=_setup)
