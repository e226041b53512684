"""The code's layout rules (README, "How the code is laid out"), checked on the source: the import
graph's layers, no private names across modules, one name per op from kernel to benchmark, and the
old import paths (lotus_kernels._compat) for one release."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lotus_kernels"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package(MODULES[importer]):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """[(module imported, name taken from it or None, line)] of one module, function-level imports included."""
    tree = ast.parse(MODULES[name].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = resolve(name, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    found.append((f"{source}.{alias.name}", None, node.lineno))  # a submodule
                else:
                    found.append((source, alias.name, node.lineno))
    return [f for f in found if f[0] == "lotus_kernels" or f[0].startswith("lotus_kernels.")]


def in_layer(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


# __main__ is the `lotus` command (the recipe's); _compat imports old paths only when asked.
LIBRARY = [m for m in MODULES if not in_layer(m, "lotus_kernels.recipe") and m not in ("lotus_kernels._compat", "lotus_kernels.__main__")]


def test_no_module_imports_a_private_name_of_another():
    bad = [
        f"{MODULES[m].relative_to(ROOT)}:{line} takes {source}.{taken}"
        for m in MODULES
        for source, taken, line in imports(m)
        if taken is not None and taken.startswith("_") and source != m and not taken.startswith("__")
    ]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_private_modules_are_imported_only_inside_their_layer():
    # lotus_kernels._extension, ops._common, kernels._common: the library's own business.
    bad = []
    for m in MODULES:
        for source, _, line in imports(m):
            private = [i for i, part in enumerate(source.split(".")) if part.startswith("_") and not part.startswith("__")]
            if private:
                owner = ".".join(source.split(".")[: private[0]])
                if not in_layer(m, owner) or (in_layer(m, "lotus_kernels.recipe") and not in_layer(source, "lotus_kernels.recipe")):
                    bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {source}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "layer, never",
    [
        # The library never reaches up into the recipe (nor do old-path aliases load it unasked).
        *[(m, "lotus_kernels.recipe") for m in ["lotus_kernels"]],
        # Kernels are the bottom: layouts (for their *_ref) and _shared only.
        ("lotus_kernels.kernels", "lotus_kernels.ops"),
        ("lotus_kernels.kernels", "lotus_kernels.backends"),
        ("lotus_kernels.kernels", "lotus_kernels.nn"),
        ("lotus_kernels.layouts", "lotus_kernels.ops"),
        ("lotus_kernels.masks", "lotus_kernels.ops"),
        ("lotus_kernels.ops", "lotus_kernels.nn"),
        ("lotus_kernels.backends", "lotus_kernels.nn"),
        # The recipe's layers: data -> engine -> method -> stages -> pipeline / ablation / cli.
        ("lotus_kernels.recipe.data", "lotus_kernels.recipe.engine"),
        ("lotus_kernels.recipe.engine", "lotus_kernels.recipe.method"),
        ("lotus_kernels.recipe.method", "lotus_kernels.recipe.stages"),
        *[(low, high) for low in ("lotus_kernels.recipe.method", "lotus_kernels.recipe.stages")
          for high in ("lotus_kernels.recipe.pipeline", "lotus_kernels.recipe.ablation", "lotus_kernels.recipe.cli")],
        ("lotus_kernels.recipe.reporting", "lotus_kernels.recipe.stages"),
    ],
)
def test_layers_import_downwards_only(layer, never):
    scope = LIBRARY if layer == "lotus_kernels" else [m for m in MODULES if in_layer(m, layer)]
    bad = [
        f"{MODULES[m].relative_to(ROOT)}:{line} imports {source}"
        for m in scope
        for source, _, line in imports(m)
        if in_layer(source, never)
    ]
    assert scope and not bad, "\n".join(bad)


def test_importing_the_library_loads_no_recipe_and_no_triton():
    code = (
        "import sys, lotus_kernels\n"
        "loaded = [m for m in sys.modules if m.startswith('lotus_kernels.recipe') or m == 'triton']\n"
        "print(loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


OPS = sorted(p.stem for p in (PACKAGE / "ops").glob("*.py") if not p.stem.startswith("_"))
KERNELS = sorted(p.stem for p in (PACKAGE / "kernels").glob("*.py") if not p.stem.startswith("_"))


def test_one_name_per_op_from_kernel_to_test_and_benchmark():
    # kernels/X.py (with X_ref beside the kernel) -> ops/X.py -> tests/ops/test_X.py -> bench/bench_X.py
    assert KERNELS, "no kernel files found"
    for name in KERNELS:
        assert name in OPS, f"kernels/{name}.py has no ops/{name}.py"
        assert f"def {name}_ref(" in (PACKAGE / "kernels" / f"{name}.py").read_text(), f"kernels/{name}.py has no {name}_ref"
        assert (ROOT / "bench" / f"bench_{name}.py").exists(), f"kernel {name} has no bench/bench_{name}.py"
    for name in OPS:
        assert (ROOT / "tests" / "ops" / f"test_{name}.py").exists(), f"ops/{name}.py has no tests/ops/test_{name}.py"
    # The compaction ops' C++ source carries the family's name too.
    assert (ROOT / "csrc" / "mask_compaction.cpp").exists() and (ROOT / "bench" / "bench_mask_compaction.py").exists()


def test_test_files_have_unique_names():
    # No __init__.py under tests/: pytest imports test files by basename, so a clash breaks collection.
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def old_paths():
    from lotus_kernels import _compat

    return sorted(_compat.MOVED)


@pytest.mark.parametrize("old", old_paths())
def test_each_old_import_path_still_works_and_says_where_it_went(old):
    import importlib

    from lotus_kernels import _compat

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)
    for target in _compat.MOVED[old]:
        real = importlib.import_module(target)
        for name in _compat.public_names(real):
            if not any(name in _compat.public_names(importlib.import_module(t)) for t in _compat.MOVED[old][: _compat.MOVED[old].index(target)]):
                assert getattr(module, name) is getattr(real, name), f"{old}.{name}"
