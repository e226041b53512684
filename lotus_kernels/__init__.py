"""lotus_kernels: sparse kernels for Vision Transformers (LOTUS, arXiv 2405.00906).

Public API: SparseLinear, SparsityConfig, sparsify_, densify_,
sparsity_summary; save_sparse, load_sparse (safetensors); enable_patch_dropping_, disable_patch_dropping_,
use_tickets (run timm ViTs on kept patch tokens); submodules masks
(keep-mask construction) and ops (the custom ops and kernels). Importing never needs a GPU and never fails
because the extension is missing: ops that need it say so when called.
"""

from . import masks, ops
from . import triton as _triton_backends  # noqa: F401  (registers the Triton backends; does not import triton)
from . import cusparselt as _cusparselt_backend  # noqa: F401  (registers the cuSPARSELt 2:4 backend)
from .patch_dropping import disable_patch_dropping_, enable_patch_dropping_, use_tickets
from .nn import SparseLinear, SparsityConfig, densify_, sparsify_, sparsify_like_, sparsity_summary
from .serialization import load_sparse, save_sparse

__version__ = "0.1.0"
__all__ = [
    "SparseLinear", "SparsityConfig", "sparsify_", "sparsify_like_", "densify_", "sparsity_summary",
    "enable_patch_dropping_", "disable_patch_dropping_", "use_tickets", "save_sparse", "load_sparse", "masks", "ops",
]
