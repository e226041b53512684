"""Model swapping: nn.Linear <-> SparseLinear across a model (timm ViTs first), and what was swapped.

``sparsify_`` replaces the selected linear layers (``default_filter``: the
transformer blocks' projections) by SparseLinear, pruned by a
``SparsityConfig`` or given masks; ``sparsify_like_`` rebuilds the layers a
state_dict holds (loading a pruned checkpoint); ``densify_`` puts nn.Linear
back; ``sparsity_summary`` lists the swapped layers and their bytes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import backends
from ..masks import PATTERNS, block_shape, check_sparsity
from .sparse_linear import PRUNABLE_LAYER_NAMES, SparseLinear, check_pattern

__all__ = ["SparsityConfig", "sparsify_", "sparsify_like_", "densify_", "sparsity_summary", "default_filter", "SparsitySummary", "LayerSummary"]


@dataclass(frozen=True)
class SparsityConfig:
    """How ``sparsify_`` prunes and stores each selected layer.

    pattern: "unstructured" | "2:4" | "block"; sparsity in [0, 1) (2:4: 0.5);
    block_size: int or (bh, bw), for "block"; backend: "auto" or a name from
    ``lotus_kernels.backends.backend_names()``; fuse_gelu: see below.
    """

    pattern: str = "unstructured"
    sparsity: float = 0.5
    block_size: int | tuple[int, int] = 32
    backend: str = "auto"
    # Move an exact nn.GELU that follows a sparsified fc1 (timm's Mlp) into
    # that layer, so kernel backends apply it in the matmul's epilogue; the
    # Mlp's act becomes nn.Identity (densify_ puts the GELU back).
    fuse_gelu: bool = False

    def __post_init__(self):
        check_pattern(self.pattern)
        check_sparsity(self.sparsity)
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"pattern '2:4' has sparsity 0.5, got sparsity={self.sparsity!r}")
        block_shape(self.block_size)
        backends.check_backend_name(self.backend)


def default_filter(module: nn.Module, name: str) -> bool:
    """Transformer blocks' attention and MLP projections (timm: qkv, proj, fc1, fc2, ...).

    The patch embedding and the classifier head stay dense.
    """
    parts = name.split(".")
    return (
        isinstance(module, nn.Linear)
        and parts[-1] in PRUNABLE_LAYER_NAMES
        and parts[0] not in ("patch_embed", "head", "fc_norm", "pre_logits")
    )


def _replace_modules(model: nn.Module, fn: Callable[[nn.Module, str], nn.Module | None], prefix: str = "") -> None:
    """Walk named_children depth-first; where fn returns a module, put it in the child's place."""
    for child_name, child in list(model.named_children()):
        name = f"{prefix}{child_name}"
        replacement = fn(child, name)
        if replacement is not None:
            setattr(model, child_name, replacement)
        else:
            _replace_modules(child, fn, prefix=f"{name}.")


def sparsify_(
    model: nn.Module,
    config: SparsityConfig | str = "unstructured",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Replace the selected nn.Linear layers of ``model`` by SparseLinear, in place; returns ``model``.

    config: a SparsityConfig or just its pattern. filter_fn(module, name) ->
    bool picks the layers (default: ``default_filter``). masks: optional
    {layer name: bool keep-mask} (e.g. from global pruning); a layer with a
    mask uses it instead of ``config.sparsity``. ``sparsity_summary(model)``
    lists what was replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(config, str):
        config = SparsityConfig(pattern=config)
    elif not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig or a pattern string, got {type(config).__name__}")
    filter_fn = default_filter if filter_fn is None else filter_fn
    masks = dict(masks or {})
    replaced: list[str] = []

    def swap(module: nn.Module, name: str):
        if not isinstance(module, nn.Linear) or not filter_fn(module, name):
            return None
        mask = masks.get(name)
        try:
            sparse = SparseLinear.from_dense(
                module,
                pattern=config.pattern,
                sparsity=None if mask is not None or config.pattern == "2:4" else config.sparsity,
                block_size=config.block_size,
                mask=mask,
                backend=config.backend,
            )
        except (ValueError, TypeError) as e:
            raise type(e)(f"sparsify_: layer {name!r}: {e}") from e
        replaced.append(name)
        return sparse

    unknown = set(masks)
    _replace_modules(model, swap)
    unknown -= set(replaced)
    if unknown:
        raise ValueError(f"sparsify_: masks given for layers that were not sparsified: {sorted(unknown)}")
    if not replaced:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        listed = ", ".join(linears[:5]) + (", ..." if len(linears) > 5 else "")
        warnings.warn(
            f"sparsify_: no layer of {type(model).__name__} matched filter_fn={getattr(filter_fn, '__name__', filter_fn)!r}, "
            f"so nothing was sparsified (it has {len(linears)} nn.Linear{': ' + listed if linears else ''}); "
            "pass a filter_fn that selects the layers to prune",
            UserWarning,
            stacklevel=2,
        )
    if config.fuse_gelu:
        _fuse_mlp_gelu(model)
    return model


def _is_exact_gelu(module) -> bool:
    return type(module) is nn.GELU and module.approximate == "none"


def _fuse_mlp_gelu(model: nn.Module) -> None:
    """fc1 -> act(GELU) pairs (timm's Mlp, whose forward is fc1, act, drop, norm, fc2): the GELU moves into fc1."""
    for module in model.modules():
        fc1, act = getattr(module, "fc1", None), getattr(module, "act", None)
        if isinstance(fc1, SparseLinear) and fc1.activation == "none" and act is not None and _is_exact_gelu(act):
            fc1.activation = "gelu"
            module.act = nn.Identity()


def sparsify_like_(model: nn.Module, state_dict: Mapping[str, object]) -> nn.Module:
    """Give ``model`` the SparseLinear layers a saved state_dict holds, in place; returns ``model``.

    Each saved SparseLinear records its layout (pattern, block size,
    activation) in its extra state; the nn.Linear at that name is replaced by
    an empty SparseLinear of that layout, ready for ``load_state_dict``. A
    layer saved with a fused GELU takes the GELU out of its Mlp's act, as
    ``sparsify_(fuse_gelu=True)`` did.
    """
    suffix = "._extra_state"
    for key, state in state_dict.items():
        if not (key.endswith(suffix) and isinstance(state, Mapping) and state.get("pattern") in PATTERNS):
            continue
        name = key[: -len(suffix)]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child, None)
        if isinstance(linear, SparseLinear):
            continue
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"sparsify_like_: the state holds a SparseLinear at {name!r} but the model has {type(linear).__name__} there")
        sparse = SparseLinear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            pattern=state["pattern"],
            block_size=tuple(state.get("block_size", (32, 32))),
            activation=state.get("activation", "none"),
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        setattr(parent, child, sparse)
        if sparse.activation == "gelu" and child == "fc1" and _is_exact_gelu(getattr(parent, "act", None)):
            parent.act = nn.Identity()
    return model


def densify_(model: nn.Module) -> nn.Module:
    """Replace every SparseLinear by an nn.Linear holding its masked dense weight, in place; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    # Undo fuse_gelu first: the GELU goes back to the Mlp's act.
    for module in model.modules():
        fc1, act = getattr(module, "fc1", None), getattr(module, "act", None)
        if isinstance(fc1, SparseLinear) and fc1.activation == "gelu" and isinstance(act, nn.Identity):
            fc1.activation = "none"
            module.act = nn.GELU()

    def swap(module: nn.Module, name: str):
        if not isinstance(module, SparseLinear):
            return None
        if module.activation != "none":
            raise ValueError(f"densify_: layer {name!r} applies {module.activation!r} itself and has no Mlp act to return it to")
        weight = module.to_dense().detach()
        linear = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        return linear

    _replace_modules(model, swap)
    return model


@dataclass(frozen=True)
class LayerSummary:
    name: str
    pattern: str
    shape: tuple[int, int]  # (out_features, in_features)
    density: float
    dense_bytes: int
    compact_bytes: int


@dataclass(frozen=True)
class SparsitySummary:
    layers: list[LayerSummary] = field(default_factory=list)

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def compact_bytes(self) -> int:
        return sum(layer.compact_bytes for layer in self.layers)

    @property
    def density(self) -> float:
        """Kept fraction over all sparse layers' weights."""
        total = sum(layer.shape[0] * layer.shape[1] for layer in self.layers)
        return sum(layer.density * layer.shape[0] * layer.shape[1] for layer in self.layers) / max(total, 1)

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        rows = [f"{'layer':<28} {'pattern':<12} {'shape':>12} {'density':>8} {'dense B':>10} {'compact B':>10}"]
        for layer in self.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            rows.append(
                f"{layer.name:<28} {layer.pattern:<12} {shape:>12} {layer.density:>8.3f} "
                f"{layer.dense_bytes:>10} {layer.compact_bytes:>10}"
            )
        rows.append(
            f"{len(self.layers)} sparse layers, density {self.density:.3f}, "
            f"{self.dense_bytes} B dense -> {self.compact_bytes} B compact"
        )
        return "\n".join(rows)


def sparsity_summary(model: nn.Module) -> SparsitySummary:
    """What ``sparsify_`` replaced: one row per SparseLinear in ``model``."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            label = module.pattern if module.pattern != "block" else f"block{module.block_size[0]}x{module.block_size[1]}"
            layers.append(
                LayerSummary(
                    name=name,
                    pattern=label,
                    shape=(module.out_features, module.in_features),
                    density=module.density,
                    dense_bytes=module.dense_nbytes(),
                    compact_bytes=module.compact_nbytes(),
                )
            )
    return SparsitySummary(layers)
