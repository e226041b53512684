"""Loads the compiled extension ``lotus_kernels._C`` and says how it was built.

Importing lotus_kernels never fails because of the extension: a missing or
broken build is recorded here and reported by the op that needs it (and by
``python -m lotus_kernels.info``). The extension is loaded once, at import
(loading it registers the torch.ops.lotus_kernels ops; no GPU is touched), so
that ``require`` only reads module globals and traces cleanly under
torch.compile.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

REBUILD_HINT = "rebuild with `pip install -e . --no-build-isolation` (or `make install`)"


def _load() -> tuple[Any, str | None]:
    name = f"{__package__}._C"
    if importlib.util.find_spec(name) is None:
        return None, f"{name} was not built (no compiled module in the package directory)"
    try:
        return importlib.import_module(name), None
    except ImportError as e:  # e.g. built against another torch (undefined symbols)
        return None, f"{name} failed to load: {e}"


_EXT, _ERROR = _load()
_WITH_CUDA = bool(_EXT is not None and _EXT.build_info()["cuda"])


def is_built() -> bool:
    return _EXT is not None


def load_error() -> str | None:
    """Why the extension could not be loaded, or None when it loaded."""
    return _ERROR


def built_with_cuda() -> bool:
    return _WITH_CUDA


def build_info() -> dict[str, Any]:
    """How the extension was built: cuda (bool), cuda_version, cuda_arch_list, torch_version, path.

    Returns {"built": False, "error": ...} when it was not built.
    """
    if _EXT is None:
        return {"built": False, "error": _ERROR}
    return {**_EXT.build_info(), "built": True, "path": _EXT.__file__}


def require(op: str, *tensors) -> None:
    """Raises a clear RuntimeError when ``op`` cannot run on these tensors' device."""
    if _EXT is None:
        raise RuntimeError(
            f"lotus_kernels.ops.{op}: the extension lotus_kernels._C is not available ({_ERROR}); {REBUILD_HINT}"
        )
    if not _WITH_CUDA and any(t.is_cuda for t in tensors):
        raise RuntimeError(
            f"lotus_kernels.ops.{op}: got CUDA tensors but lotus_kernels._C was built without CUDA "
            f"(LOTUS_CPU_ONLY=1, or no CUDA toolkit at build time); install a CUDA toolkit and {REBUILD_HINT}"
        )
