"""Loads the compiled extension ``lotus_kernels._C`` and says how it was built.

Importing lotus_kernels never fails because of the extension: a missing or
broken build is recorded here and reported by the op that needs it (and by
``python -m lotus_kernels.info``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any

import torch

REBUILD_HINT = "rebuild with `pip install -e . --no-build-isolation` (or `make install`)"


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Any, str | None]:
    name = f"{__package__}._C"
    if importlib.util.find_spec(name) is None:
        return None, f"{name} was not built (no compiled module in the package directory)"
    try:
        # Loading the library registers the torch.ops.lotus_kernels ops.
        return importlib.import_module(name), None
    except ImportError as e:  # e.g. built against another torch (undefined symbols)
        return None, f"{name} failed to load: {e}"


def is_built() -> bool:
    return _load()[0] is not None


def load_error() -> str | None:
    """Why the extension could not be loaded, or None when it loaded."""
    return _load()[1]


def build_info() -> dict[str, Any]:
    """How the extension was built: cuda (bool), cuda_version, cuda_arch_list, torch_version.

    Returns {"built": False, "error": ...} when it was not built.
    """
    ext, err = _load()
    if ext is None:
        return {"built": False, "error": err}
    info = dict(ext.build_info())
    info["built"] = True
    info["path"] = ext.__file__
    return info


def require(op: str, *tensors: torch.Tensor) -> None:
    """Raises a clear RuntimeError when ``op`` cannot run on these tensors' device."""
    ext, err = _load()
    if ext is None:
        raise RuntimeError(
            f"lotus_kernels.ops.{op}: the extension lotus_kernels._C is not built or failed to load "
            f"({err}); {REBUILD_HINT}"
        )
    if any(t.is_cuda for t in tensors) and not ext.build_info()["cuda"]:
        raise RuntimeError(
            f"lotus_kernels.ops.{op}: got CUDA tensors but lotus_kernels._C was built without CUDA "
            f"(LOTUS_CPU_ONLY=1, or no CUDA toolkit at build time); install a CUDA toolkit and {REBUILD_HINT}"
        )
