"""The LOTUS methods on timm ViTs: data lottery tickets (``tickets``), and the pruning methods
Essential Sparsity and Instant Soup Pruning with their masks (re-exported here: what
``lotus_kernels.pruning`` exported).

- ``tickets``: CLS-attention patch selection (``TicketSelector``), fixed and random
  tickets, the train / evaluation hooks of a ticket student (``ticket_hooks``).

- ``essential_sparsity``: one-shot global magnitude pruning, the sparsity
  sweep without fine-tuning, and its knee (``essential_sparsity_sweep``).
- ``instant_soup``: ingredient runs on small data subsets vote on the mask,
  round by round, then an exact one-shot prune and fine-tuning with the mask
  held (``instant_soup_prune``).
- ``masking``: masks on a dense model ({layer name: bool [out, in]}, True =
  keep): zero, hold through training, count, project to "2:4" / "block", and
  hand over to ``lotus_kernels.sparsify_`` (``sparsify_masked_``).

Typical use::

    es = essential_sparsity_sweep(model, val_set)             # model untouched
    knee_masks = prune_one_shot_(model, es.knee)
    isp = instant_soup_prune(model, train_set, {"target_sparsity": 0.5},
                             eval_data=val_set, initial_masks=knee_masks)
    sparsify_masked_(model, isp.masks, pattern="unstructured")
"""

from .essential_sparsity import (
    DEFAULT_SPARSITIES,
    EssentialSparsityResult,
    essential_sparsity_sweep,
    find_knee,
    make_eval_fn,
    one_shot_masks,
    plot_essential_sparsity,
    prune_one_shot_,
)
from .instant_soup import (
    InstantSoupConfig,
    InstantSoupResult,
    RoundRecord,
    ingredient_subsets,
    instant_soup_prune,
    make_train_fn,
    merge_masks,
    plot_instant_soup,
    prune_among_kept,
    vote_counts,
)
from .masking import (
    MaskedWeight,
    apply_masks_,
    check_masks,
    count_pruned,
    full_masks,
    global_sparsity,
    held_masks,
    hold_masks_,
    layer_sparsity,
    masks_held,
    project_masks,
    prunable_layers,
    prunable_weights,
    release_masks_,
    sparsify_masked_,
    weight_sparsity,
)

__all__ = [
    "DEFAULT_SPARSITIES",
    "EssentialSparsityResult",
    "essential_sparsity_sweep",
    "find_knee",
    "make_eval_fn",
    "one_shot_masks",
    "plot_essential_sparsity",
    "prune_one_shot_",
    "InstantSoupConfig",
    "InstantSoupResult",
    "RoundRecord",
    "ingredient_subsets",
    "instant_soup_prune",
    "make_train_fn",
    "merge_masks",
    "plot_instant_soup",
    "prune_among_kept",
    "vote_counts",
    "MaskedWeight",
    "apply_masks_",
    "check_masks",
    "count_pruned",
    "full_masks",
    "global_sparsity",
    "held_masks",
    "hold_masks_",
    "layer_sparsity",
    "masks_held",
    "project_masks",
    "prunable_layers",
    "prunable_weights",
    "release_masks_",
    "sparsify_masked_",
    "weight_sparsity",
]
