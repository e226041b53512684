"""Where the recipe modules went (issue 19): old module path -> the new modules that now hold its
public names, in the order to search them. Read by the library's alias mechanism
(``lotus_kernels._compat``) to build the old paths as thin re-exports for one release.
"""

MOVED: dict[str, tuple[str, ...]] = {
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
