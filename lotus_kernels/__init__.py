"""lotus_kernels: sparse kernels for Vision Transformers (LOTUS, arXiv 2405.00906).

Public API: SparseLinear, SparsityConfig, sparsify_, densify_,
sparsity_summary; save_sparse, load_sparse (safetensors); enable_patch_dropping_, disable_patch_dropping_,
use_tickets (run timm ViTs on kept patch tokens); submodules masks
(keep-mask construction) and ops (the custom ops and kernels). Importing never needs a GPU and never fails
because the extension is missing: ops that need it say so when called.

This package is the library (masks, layouts, ops, kernels, backends, nn,
serialization, info); ``lotus_kernels.recipe`` is the LOTUS training recipe
and the ``lotus`` command built on it. The library never imports the recipe.
"""

from . import _compat, masks, ops
# Each registers its backends; the order is "auto"'s preference (dense and reference stay last).
from .backends import triton  # noqa: F401, I001
from .backends import cusparselt  # noqa: F401
from .backends import attention, dense  # noqa: F401
from .nn import SparseLinear, SparsityConfig, densify_, sparsify_, sparsify_like_, sparsity_summary
from .nn.patch_dropping import disable_patch_dropping_, enable_patch_dropping_, use_tickets
from .serialization import load_sparse, save_sparse

_compat.install()

__version__ = "0.1.0"
__all__ = [
    "SparseLinear", "SparsityConfig", "sparsify_", "sparsify_like_", "densify_", "sparsity_summary",
    "enable_patch_dropping_", "disable_patch_dropping_", "use_tickets", "save_sparse", "load_sparse", "masks", "ops",
]
