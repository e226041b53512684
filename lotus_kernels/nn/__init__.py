"""Modules: SparseLinear and model swapping, patch dropping for timm ViTs, dynamic 2:4 training.

``sparse_linear``: SparseLinear (the drop-in nn.Linear that stores only kept
weights). ``sparsify``: sparsify_ / sparsify_like_ / densify_ /
sparsity_summary. ``patch_dropping``: timm ViTs on their kept patch tokens.
``dynamic_2to4``: 2:4 masks re-chosen during training.
"""

from .sparse_linear import INDEX_BUFFERS, PRUNABLE_LAYER_NAMES, SUPPORTED_DTYPES, SparseLinear, check_layout, check_pattern
from .sparsify import (
    LayerSummary,
    SparsityConfig,
    SparsitySummary,
    default_filter,
    densify_,
    sparsify_,
    sparsify_like_,
    sparsity_summary,
)

__all__ = [
    "SparseLinear", "SparsityConfig", "sparsify_", "sparsify_like_", "densify_", "sparsity_summary", "default_filter",
    "SparsitySummary", "LayerSummary", "check_layout", "check_pattern", "INDEX_BUFFERS", "PRUNABLE_LAYER_NAMES",
    "SUPPORTED_DTYPES",
]
