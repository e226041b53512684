"""The LOTUS training recipe, on top of the kernel library (``lotus_kernels``): train a ViT,
find its data lottery tickets, prune it (Essential Sparsity, Instant Soup Pruning), fine-tune
it sparse on tickets and export it. Layers, each importing only the ones above it:

- ``data``: CIFAR-10 sources, the synthetic set, the on-device loader;
- ``engine``: the config base, one train step, the training loop, evaluation, checkpoints;
- ``method``: tickets, Essential Sparsity, Instant Soup Pruning, masks on dense models;
- ``reporting``: report.md of a run, the plots;
- ``stages``: the public building blocks (train dense, train on tickets, Instant Soup from
  the knee, prune / fine-tune a checkpoint, export);
- ``pipeline``, ``ablation``, ``cli``: what composes the stages (the ``lotus`` command).

Importing this package imports none of them (torch stays unloaded until a layer is used).
"""
