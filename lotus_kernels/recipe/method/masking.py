"""Keep-masks on a dense model: pick the prunable weights, zero them, hold them at zero, count, project.

Masks are dicts ``{layer name: bool keep-mask}``, keyed by the module names
``model.named_modules()`` gives (e.g. ``"blocks.0.attn.qkv"``), shaped like
that layer's weight ``[out_features, in_features]``; True keeps the weight.
They are the same dicts ``lotus_kernels.sparsify_(model, config, masks=...)``
takes, so a pruned dense model becomes a SparseLinear model in one call
(``sparsify_masked_``).

Holding masks through training (``hold_masks_`` / ``masks_held``) uses
``torch.nn.utils.parametrize``: the layer's ``weight`` becomes
``where(mask, original, 0)``, recomputed at every access. So the weight the
forward uses is exactly zero at pruned positions whatever the optimizer does
(momentum from before the mask, weight decay, a fused step), and the gradient
reaching ``original`` is zero there. ``original`` itself is zeroed at pruned
positions when the mask is registered, and zero gradients keep it zero under
SGD/Adam/AdamW with fresh state; ``release_masks_`` writes the masked weight
back as a plain parameter either way. Any ``train_fn`` that just runs forward,
backward and ``optimizer.step()`` therefore trains with fixed masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from lotus_kernels.masks import PATTERNS, block_shape, project_mask
from lotus_kernels.nn import SparsityConfig, default_filter, sparsify_

__all__ = [
    "MaskedWeight",
    "prunable_layers",
    "prunable_weights",
    "check_masks",
    "full_masks",
    "apply_masks_",
    "hold_masks_",
    "release_masks_",
    "masks_held",
    "held_masks",
    "count_pruned",
    "global_sparsity",
    "layer_sparsity",
    "weight_sparsity",
    "project_masks",
    "sparsify_masked_",
]

FilterFn = Callable[[nn.Module, str], bool]


# ---------------------------------------------------------------------------
# which weights
# ---------------------------------------------------------------------------


def prunable_layers(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    """{name: module} of the layers pruning targets, in ``named_modules`` order.

    filter_fn(module, name) -> bool; default ``lotus_kernels.nn.default_filter``
    (the transformer blocks' qkv/proj/fc1/fc2 nn.Linear layers; patch
    embedding, norms, biases and the head are never pruned).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    filter_fn = default_filter if filter_fn is None else filter_fn
    if not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, name) -> bool, got {type(filter_fn).__name__}")
    layers = {name: m for name, m in model.named_modules() if name and filter_fn(m, name)}
    for name, m in layers.items():
        if not isinstance(getattr(m, "weight", None), torch.Tensor):
            raise ValueError(f"filter_fn selected {name!r} ({type(m).__name__}), which has no weight tensor to prune")
    if not layers:
        raise ValueError(
            f"model ({type(model).__name__}) has no prunable layers under the filter; "
            "pruning needs nn.Linear layers such as a timm ViT's blocks.*.attn.qkv / mlp.fc1"
        )
    return layers


def prunable_weights(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, torch.Tensor]:
    """{layer name: weight [out, in]} (detached; masked if masks are held) of the prunable layers."""
    return {name: m.weight.detach() for name, m in prunable_layers(model, filter_fn).items()}


def weight_parameter(module: nn.Module) -> nn.Parameter:
    """The stored weight parameter: ``original`` under a held mask, else ``weight``."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


# ---------------------------------------------------------------------------
# checks and counts
# ---------------------------------------------------------------------------


def check_masks(masks, model: nn.Module | None = None, name: str = "masks") -> dict[str, torch.Tensor]:
    """A non-empty {layer name: bool tensor}; with ``model``, each name a layer whose weight has the mask's shape."""
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError(f"{name} must be a non-empty mapping {{layer name: bool keep-mask}}, got {type(masks).__name__}")
    modules = dict(model.named_modules()) if model is not None else {}
    out = {}
    for key, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"{name}[{key!r}] must be a bool tensor (True = keep), got {got}")
        if model is not None:
            module = modules.get(key)
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise ValueError(f"{name}[{key!r}]: the model has no layer with a weight named {key!r}")
            if mask.shape != weight.shape:
                raise ValueError(
                    f"{name}[{key!r}] has shape {tuple(mask.shape)} but the layer's weight is {tuple(weight.shape)}"
                )
        out[key] = mask
    return out


def full_masks(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All-True masks (nothing pruned) shaped like ``weights``."""
    return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}


def count_pruned(masks: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(pruned, total) entries over all masks, exact ints."""
    masks = check_masks(masks)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return total - kept, total


def global_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Pruned fraction over all masks together."""
    pruned, total = count_pruned(masks)
    return pruned / total


def layer_sparsity(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """{layer name: pruned fraction of that layer}."""
    return {name: 1.0 - int(m.sum()) / m.numel() for name, m in check_masks(masks).items()}


def weight_sparsity(model: nn.Module, filter_fn: FilterFn | None = None) -> float:
    """Fraction of exact zeros among the prunable weights (what the model actually holds)."""
    weights = prunable_weights(model, filter_fn)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return zeros / sum(w.numel() for w in weights.values())


# ---------------------------------------------------------------------------
# applying and holding
# ---------------------------------------------------------------------------


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights in place, once (nothing keeps them zero afterwards); returns ``model``."""
    masks = check_masks(masks, model)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        param = weight_parameter(modules[name])
        param.masked_fill_(~mask.to(param.device), 0)
    return model


class MaskedWeight(nn.Module):
    """Parametrization ``weight = where(mask, original, 0)``; mask is a bool buffer [out, in] (moves with .to())."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # where (not weight * mask): a NaN/Inf in a pruned slot of original must not leak into the forward.
        return torch.where(self.mask, weight, weight.new_zeros(()))


def hold_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Keep the pruned weights exactly zero through training, in place; returns ``model``.

    Registers a ``MaskedWeight`` parametrization on each masked layer (a layer
    that already holds one gets the new mask instead). While held, parameter
    names gain ``parametrizations.weight.original``: build the optimizer after
    this call, and ``release_masks_`` before saving state_dicts meant for
    plain models.
    """
    masks = check_masks(masks, model)
    apply_masks_(model, masks)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules[name]
        mask = mask.to(weight_parameter(module).device)
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, MaskedWeight):
                    p.mask = mask.clone()
                    break
            else:
                raise ValueError(f"layer {name!r} already has a weight parametrization that is not a MaskedWeight")
        else:
            parametrize.register_parametrization(module, "weight", MaskedWeight(mask))
    return model


def held_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: mask} of the masks ``hold_masks_`` registered (empty if none)."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, MaskedWeight):
                    out[name] = p.mask.clone()
    return out


def release_masks_(model: nn.Module) -> nn.Module:
    """Remove the masks ``hold_masks_`` registered; the weights stay masked (zeros kept). Returns ``model``."""
    for name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, MaskedWeight) for p in module.parametrizations.weight
        ):
            if len(module.parametrizations.weight) != 1:
                raise ValueError(f"layer {name!r} stacks other parametrizations on its MaskedWeight; remove them first")
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


@contextlib.contextmanager
def masks_held(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``hold_masks_`` for the duration of a ``with`` block, then ``release_masks_`` (also on error)."""
    hold_masks_(model, masks)
    try:
        yield model
    finally:
        release_masks_(model)


# ---------------------------------------------------------------------------
# kernel-friendly patterns
# ---------------------------------------------------------------------------


def project_masks(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    pattern: str,
    block_size=32,
) -> dict[str, torch.Tensor]:
    """Project unstructured masks onto a pattern the kernels run ("unstructured" | "2:4" | "block").

    weights, masks: {layer name: [out, in]}. The score of a weight is |w|
    where the mask keeps it and 0 where it prunes it (``masks.project_mask``):
    - "unstructured": the masks, copied;
    - "2:4": each group of 4 along in_features keeps its 2 highest scores
      (sparsity exactly 0.5 whatever the input's; a group with fewer than 2
      kept weights fills up with already-zero slots);
    - "block": per layer, the block-sum scores keep as many (bh, bw) blocks as
      the layer's own sparsity leaves (``num_pruned`` rounding), so the
      per-layer distribution global pruning chose carries over.
    Returns {layer name: bool mask}, ready for ``sparsify_(..., masks=...)``.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    masks = check_masks(masks)
    if not isinstance(weights, Mapping) or set(weights) != set(masks):
        got = sorted(weights) if isinstance(weights, Mapping) else type(weights).__name__
        raise ValueError(f"weights must map the same layer names as masks ({sorted(masks)}), got {got}")
    if pattern == "block":
        block_shape(block_size)  # raise on a bad block_size before any work
    out = {}
    for name, mask in masks.items():
        w = weights[name]
        if w.shape != mask.shape:
            raise ValueError(f"weights[{name!r}] has shape {tuple(w.shape)} but masks[{name!r}] {tuple(mask.shape)}")
        if pattern == "unstructured":
            out[name] = mask.clone()
            continue
        score = torch.where(mask.to(w.device), w.detach().abs().float(), 0.0)
        try:
            if pattern == "2:4":
                out[name] = project_mask(score, "2:4")
            else:
                sparsity = 1.0 - int(mask.sum()) / mask.numel()
                out[name] = project_mask(score, "block", sparsity=sparsity, block_size=block_size)
        except ValueError as e:
            raise ValueError(f"project_masks: layer {name!r} ({tuple(w.shape)}): {e}") from e
    return out


def sparsify_masked_(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    pattern: str = "unstructured",
    block_size=32,
    backend: str = "auto",
) -> nn.Module:
    """Turn a pruned dense model into SparseLinear layers, in place; returns ``model``.

    Releases held masks, projects ``masks`` onto ``pattern`` (``project_masks``
    against the current weights) and calls ``sparsify_`` with them: each
    masked layer becomes a SparseLinear that stores only its kept weights.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    masks = check_masks(masks, model)
    release_masks_(model)
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight.detach() for name in masks}
    projected = project_masks(weights, masks, pattern, block_size)
    apply_masks_(model, projected)
    config = SparsityConfig(pattern=pattern, sparsity=0.5, block_size=block_size, backend=backend)
    return sparsify_(model, config, filter_fn=lambda module, name: name in projected, masks=projected)
