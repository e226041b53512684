"""Old import paths (before the library/recipe split of 0.2) as thin re-exports, for one release.

``import lotus_kernels.train`` and the like still work: a finder on
``sys.meta_path`` answers each old path in ``MOVED`` with a small module that
holds the public names of the module(s) that now own them, and warns once
(DeprecationWarning) with the new path. Nothing is imported until an old path
is: the library never loads the recipe by itself. Remove in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old module path -> the module(s) that now hold its public names (first wins on a clash)
MOVED: dict[str, tuple[str, ...]] = {
    "lotus_kernels.mask_compaction": ("lotus_kernels.layouts",),
    "lotus_kernels.triton": ("lotus_kernels.kernels",),
    "lotus_kernels.triton.block_sparse_matmul": ("lotus_kernels.kernels.block_sparse_matmul",),
    "lotus_kernels.triton.semi_structured_matmul": ("lotus_kernels.kernels.semi_structured_matmul",),
    "lotus_kernels.triton.patch_drop_attention": ("lotus_kernels.kernels.patch_drop_attention",),
    "lotus_kernels.weight_cache": ("lotus_kernels.ops.weight_cache",),
    "lotus_kernels.cusparselt": ("lotus_kernels.backends.cusparselt", "lotus_kernels.ops.cusparselt"),
    "lotus_kernels.patch_dropping": ("lotus_kernels.nn.patch_dropping",),
    "lotus_kernels.dynamic_2to4": ("lotus_kernels.nn.dynamic_2to4",),
    "lotus_kernels.bench_report": ("lotus_kernels.recipe.tools.bench_report",),
    "lotus_kernels.demo": ("lotus_kernels.recipe.tools.demo",),
    "lotus_kernels.gpu_check": ("lotus_kernels.recipe.tools.gpu_check",),
    "lotus_kernels.gpu_check.runner": ("lotus_kernels.recipe.tools.gpu_check.runner",),
    "lotus_kernels.gpu_check.steps": ("lotus_kernels.recipe.tools.gpu_check.steps",),
    "lotus_kernels.gpu_check.summary": ("lotus_kernels.recipe.tools.gpu_check.summary",),
    "lotus_kernels.gpu_check.pytest_progress": ("lotus_kernels.recipe.tools.gpu_check.pytest_progress",),
    # the recipe
    "lotus_kernels.train": (
        "lotus_kernels.recipe.engine",  # re-exports every public name lotus_kernels.train had (its __all__)
        "lotus_kernels.recipe.engine.loop",
        "lotus_kernels.recipe.engine.train_config",
        "lotus_kernels.recipe.engine.presets",
        "lotus_kernels.recipe.engine.build",
        "lotus_kernels.recipe.engine.checkpoint",
        "lotus_kernels.recipe.engine.evaluation",
        "lotus_kernels.recipe.engine.optim",
        "lotus_kernels.recipe.engine.mixing",
        "lotus_kernels.recipe.engine.devices",
        "lotus_kernels.recipe.engine.distributed",
    ),
    "lotus_kernels.train_step": ("lotus_kernels.recipe.engine.train_step",),
    "lotus_kernels.data": (
        "lotus_kernels.recipe.data",  # re-exports data.__all__
        "lotus_kernels.recipe.data.image_set",
        "lotus_kernels.recipe.data.sources",
        "lotus_kernels.recipe.data.synthetic",
        "lotus_kernels.recipe.data.loader",
    ),
    "lotus_kernels.tickets": ("lotus_kernels.recipe.method.tickets",),
    "lotus_kernels.pruning": ("lotus_kernels.recipe.method",),  # re-exports the old pruning.__all__
    "lotus_kernels.pruning.essential_sparsity": ("lotus_kernels.recipe.method.essential_sparsity",),
    "lotus_kernels.pruning.instant_soup": ("lotus_kernels.recipe.method.instant_soup",),
    "lotus_kernels.pruning.masking": ("lotus_kernels.recipe.method.masking",),
    "lotus_kernels.stages": ("lotus_kernels.recipe.stages",),
    "lotus_kernels.pipeline": ("lotus_kernels.recipe.pipeline", "lotus_kernels.recipe.stages"),
    "lotus_kernels.ablation": ("lotus_kernels.recipe.ablation",),
    "lotus_kernels.report": ("lotus_kernels.recipe.reporting.report", "lotus_kernels.recipe.reporting.plots"),
    "lotus_kernels.cli": ("lotus_kernels.recipe.cli",),
}


def public_names(module: types.ModuleType) -> list[str]:
    """``__all__``, or every name without a leading underscore that is not a module."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)]
    return list(names)


class _Alias(importlib.abc.Loader):
    def __init__(self, targets: tuple[str, ...]):
        self.targets = targets

    def create_module(self, spec):
        return None  # a fresh module: the real ones keep their own names and specs

    def exec_module(self, module: types.ModuleType) -> None:
        old = module.__name__
        warnings.warn(
            f"{old} moved to {' and '.join(self.targets)}; the old path goes in lotus_kernels 0.3",
            DeprecationWarning, stacklevel=2,
        )
        exported: list[str] = []
        for target in reversed(self.targets):  # first target wins on a clash
            real = importlib.import_module(target)
            for name in public_names(real):
                setattr(module, name, getattr(real, name))
                exported.append(name)
        module.__all__ = sorted(set(exported))
        if any(name.startswith(old + ".") for name in MOVED):
            module.__path__ = []  # old subpackages (lotus_kernels.gpu_check.runner) import through it


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(MOVED[fullname]))


def install() -> None:
    """Puts the finder on sys.meta_path once (importing lotus_kernels does this)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
