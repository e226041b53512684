"""Keep-masks for pruning: unstructured, N:M and block patterns. Pure torch, any device.

A mask is a bool tensor shaped like the weight it masks ([out_features,
in_features] for a linear layer); True keeps the weight.

Two layers of functions:
- scores -> mask (``score_mask``, ``global_score_masks``, ``nm_score_mask``,
  ``block_score_mask``, ``project_mask``): keep the highest importance scores
  under a pattern. Pruning methods score however they like, then project.
- magnitude masks (``magnitude_mask``, ``global_magnitude_masks``, ``nm_mask``,
  ``block_mask``): the same with |w| (or the block norm) as the score.

Counting and ties, the same everywhere:
- exactly ``num_pruned(n, sparsity) = floor(sparsity * n + 0.5)`` of the n
  candidates (weights, or blocks) are pruned: round half up;
- the lowest scores go first; among equal scores the earliest position goes
  first (flattened row-major order; across tensors, the dict's order). N:M
  groups keep their n highest, the earlier position winning a tie;
- scores are compared in their own precision: float32 for fp32 and the 16-bit
  formats (exact for both), float64 when any score is float64 (1e300 and 1e200
  differ there and are both inf in float32); -0.0 equals +0.0.

Global selection never sorts all weights: it finds the exact threshold with a
radix select over 8-bit histograms (4 passes for float32 keys, 8 for float64;
O(numel) time, one tensor's worth of temporary memory), so it scales to large
models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .layouts import normalized_mask

PATTERNS = ("unstructured", "2:4", "block")


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """A float in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(sparsity).__name__} {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def block_shape(block_size, name: str = "block_size") -> tuple[int, int]:
    """block_size as an int (square) or a (rows, cols) pair -> (bh, bw), positive ints."""
    pair = (block_size, block_size) if isinstance(block_size, int) else block_size
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    ):
        raise TypeError(f"{name} must be an int or a (rows, cols) pair of ints, got {block_size!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{name} must be positive, got {block_size!r}")
    return int(pair[0]), int(pair[1])


def parse_nm(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4); needs 0 < n <= m."""
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except (AttributeError, ValueError):
        raise ValueError(f"pattern must look like 'n:m' (e.g. '2:4'), got {pattern!r}") from None
    if not 0 < n <= m:
        raise ValueError(f"pattern {pattern!r} needs 0 < n <= m")
    return n, m


def check_tensor(t, name: str, *, dim: int | None = None, finite: bool = True) -> torch.Tensor:
    """A floating-point tensor (optionally of a given rank) with no NaN/Inf."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if finite and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf; masks need finite values")
    return t


def check_mask(mask, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A bool tensor with the shape of ``like``, moved to its device, every byte 0 or 1.

    Any nonzero byte counts as true (``mask_compaction.normalized_mask``): a
    uint8 tensor viewed as bool would otherwise pack and select inconsistently.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(mask.shape)}")
    return normalized_mask(mask.to(like.device))


def num_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` candidates a sparsity prunes: round half up."""
    return min(numel, math.floor(sparsity * numel + 0.5))


# ---------------------------------------------------------------------------
# exact lowest-k selection (radix select)
# ---------------------------------------------------------------------------


def _ranks_in_float64(scores) -> bool:
    """Whether scores are ranked as float64 (any of them is), else as float32 (exact for fp32/fp16/bf16)."""
    return any(s.dtype == torch.float64 for s in scores)


def _rank_dtype(score: torch.Tensor) -> torch.dtype:
    return torch.float64 if score.dtype == torch.float64 else torch.float32


def _sortable_keys(score: torch.Tensor, wide: bool) -> torch.Tensor:
    """Order-preserving map of scores to int64 keys: float32 values to [0, 2**32), or (wide) float64 to all of int64."""
    if wide:
        # "+ 0.0" turns -0.0 into +0.0 so that the two compare equal.
        bits = (score.detach().double() + 0.0).contiguous().view(torch.int64)
        # As signed integers, non-negative doubles already order like their values;
        # negative ones order in reverse, and flipping all but the sign bit fixes that.
        return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits).flatten()
    bits = (score.detach().float() + 0.0).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    negative = bits >= 2**31
    # Negative floats order in reverse of their bits; flipping them all and
    # setting the sign bit of the positives gives one ascending unsigned order.
    return torch.where(negative, 0xFFFFFFFF - bits, bits + 2**31).flatten()


def _kth_smallest_key(keys: list[torch.Tensor], k: int, wide: bool) -> int:
    """The k-th smallest (1-based) of all keys, one byte at a time from the top.

    Narrow keys are non-negative 32-bit values; wide keys are signed 64-bit, so
    their top byte is read with the sign bit flipped (0x80: the most negative
    keys first) and the prefix is kept as the signed value it spells.
    """
    top = 56 if wide else 24
    prefix = 0
    for shift in range(top, -1, -8):
        hist = torch.zeros(256, dtype=torch.int64, device=keys[0].device)
        for key in keys:
            if shift != top:  # only keys that share the bytes chosen so far
                key = key[(key >> (shift + 8)) == (prefix >> (shift + 8))]
            byte_of = (key >> shift) & 0xFF
            hist += torch.bincount(byte_of ^ 0x80 if wide and shift == top else byte_of, minlength=256)
        cumulative = hist.cumsum(0)
        byte = int(torch.searchsorted(cumulative, torch.tensor(k, device=cumulative.device)))
        if byte > 0:
            k -= int(cumulative[byte - 1])
        if wide and shift == top:
            byte ^= 0x80
            prefix = (byte - 256 if byte >= 128 else byte) << shift  # the sign lives in the top byte
        else:
            prefix |= byte << shift
    return prefix


def _prune_lowest(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Keep-masks that prune exactly the k lowest scores over all tensors, ties by position."""
    if k == 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    wide = _ranks_in_float64(scores)
    keys = [_sortable_keys(s, wide) for s in scores]
    threshold = _kth_smallest_key(keys, k, wide)
    ties_to_prune = k - sum(int((key < threshold).sum()) for key in keys)
    masks = []
    for score, key in zip(scores, keys):
        tie = key == threshold
        tie_rank = tie.cumsum(0)  # 1-based position among this tensor's ties
        pruned = (key < threshold) | (tie & (tie_rank <= ties_to_prune))
        ties_to_prune = max(0, ties_to_prune - int(tie.sum()))
        masks.append((~pruned).reshape(score.shape))
    return masks


# ---------------------------------------------------------------------------
# scores -> masks
# ---------------------------------------------------------------------------


def global_score_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Prune the lowest ``num_pruned(total, sparsity)`` scores over all tensors together.

    scores: {name: tensor of any shape, floating}. Returns {name: bool mask, same shape}.
    """
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty mapping {name: tensor}")
    sparsity = check_sparsity(sparsity)
    for name, s in scores.items():
        check_tensor(s, f"scores[{name!r}]")
    devices = {s.device for s in scores.values()}
    if len(devices) > 1:
        raise ValueError(f"scores must all be on one device, got {sorted(map(str, devices))}")
    total = sum(s.numel() for s in scores.values())
    masks = _prune_lowest(list(scores.values()), num_pruned(total, sparsity))
    return dict(zip(scores.keys(), masks))


def score_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest ``num_pruned(score.numel(), sparsity)`` scores of one tensor."""
    return global_score_masks({"score": score}, sparsity)["score"]


def nm_score_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n highest scores of every group of m consecutive entries along the last dim."""
    check_tensor(score, "score")
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"n:m needs ints 0 < n <= m, got n={n!r}, m={m!r}")
    if score.dim() == 0 or score.shape[-1] % m:
        raise ValueError(
            f"in_features (last dim of shape {tuple(score.shape)}) must be divisible by m={m} for {n}:{m} sparsity"
        )
    groups = score.detach().to(_rank_dtype(score)).reshape(-1, m)
    # A stable descending sort keeps the earlier position first among ties.
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter(-1, top, True)
    return mask.reshape(score.shape)


def block_score_mask(score: torch.Tensor, sparsity: float, block_size=32) -> torch.Tensor:
    """Prune whole (bh, bw) blocks of a 2-D score: the ``num_pruned(blocks, sparsity)`` lowest block sums."""
    check_tensor(score, "score", dim=2)
    bh, bw = block_shape(block_size)
    rows, cols = score.shape
    if rows % bh or cols % bw:
        raise ValueError(f"shape {tuple(score.shape)} is not divisible by block_size {(bh, bw)}")
    block_scores = score.detach().to(_rank_dtype(score)).reshape(rows // bh, bh, cols // bw, bw).sum((1, 3))
    return expand_block_mask(score_mask(block_scores, sparsity), (bh, bw))


def project_mask(score: torch.Tensor, pattern: str, sparsity: float | None = None, block_size=32) -> torch.Tensor:
    """Project an importance score (higher = more important) onto a pattern.

    pattern: "unstructured" (needs sparsity), "n:m" such as "2:4" (sparsity
    must be None or 1 - n/m), or "block" (needs sparsity; block score = sum).
    """
    if pattern == "unstructured" or pattern == "block":
        if sparsity is None:
            raise ValueError(f"pattern {pattern!r} needs a sparsity")
        if pattern == "unstructured":
            return score_mask(score, sparsity)
        return block_score_mask(score, sparsity, block_size)
    if not isinstance(pattern, str) or ":" not in pattern:
        raise ValueError(f"pattern must be 'unstructured', 'block' or 'n:m' (e.g. '2:4'), got {pattern!r}")
    n, m = parse_nm(pattern)
    if sparsity is not None and not math.isclose(sparsity, 1 - n / m):
        raise ValueError(f"pattern {pattern!r} has sparsity {1 - n / m}, got sparsity={sparsity!r}")
    return nm_score_mask(score, n, m)


# ---------------------------------------------------------------------------
# magnitude masks
# ---------------------------------------------------------------------------


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``num_pruned(w.numel(), sparsity)`` smallest |w|. w: floating, finite; returns bool like w."""
    check_tensor(w, "w")
    return score_mask(w.abs(), sparsity)


def global_magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One global |w| threshold over all tensors: exactly ``num_pruned(total, sparsity)`` pruned in all."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty mapping {name: tensor}")
    for name, w in weights.items():
        check_tensor(w, f"weights[{name!r}]")
    return global_score_masks({name: w.abs() for name, w in weights.items()}, sparsity)


def nm_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M along in_features (last dim): each group of m keeps its n largest |w|."""
    check_tensor(w, "w")
    return nm_score_mask(w.abs(), n, m)


def block_mask(w: torch.Tensor, sparsity: float, block_size=32, norm: str = "l2") -> torch.Tensor:
    """Prune whole blocks of w [R, C] by block norm ("l2" or "l1"): exactly ``num_pruned(blocks, sparsity)`` blocks."""
    check_tensor(w, "w", dim=2)
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    # Block sums in float64, of |w| scaled by a power of two (exact) so that its
    # largest entry is below 1: squares and sums of finite weights never
    # overflow (1e20 squared was inf in float32, then "NaN or Inf"). The
    # squared L2 norm orders blocks exactly like the L2 norm.
    a = w.detach().double().abs()
    exponent = int(torch.frexp(a.max()).exponent) if a.numel() else 0
    if exponent > 0:  # below 1 already: nothing to overflow (and 2**-e of a tiny peak would)
        # fp64 weights ~150 orders of magnitude below the largest square to 0 and tie.
        a = a * 2.0**-exponent
    score = a if norm == "l1" else a.square()
    return block_score_mask(score, sparsity, block_size)


# ---------------------------------------------------------------------------
# block structure
# ---------------------------------------------------------------------------


def expand_block_mask(block_keep: torch.Tensor, block_size) -> torch.Tensor:
    """block_keep [R/bh, C/bw] bool -> element mask [R, C]."""
    bh, bw = block_shape(block_size)
    br, bc = block_keep.shape
    return block_keep[:, None, :, None].expand(br, bh, bc, bw).reshape(br * bh, bc * bw)


def reduce_block_mask(mask: torch.Tensor, block_size, *, strict: bool = True) -> torch.Tensor:
    """Element mask [R, C] -> block mask [R/bh, C/bw] (a block is kept if any entry is).

    strict: raise ValueError unless every block is entirely kept or entirely pruned.
    """
    bh, bw = block_shape(block_size)
    rows, cols = mask.shape
    if rows % bh or cols % bw:
        raise ValueError(f"mask shape {tuple(mask.shape)} is not divisible by block_size {(bh, bw)}")
    blocks = mask.reshape(rows // bh, bh, cols // bw, bw)
    any_kept = blocks.any(dim=3).any(dim=1)
    if strict:
        all_kept = blocks.all(dim=3).all(dim=1)
        mixed = any_kept & ~all_kept
        if bool(mixed.any()):
            r, c = mixed.nonzero()[0].tolist()
            raise ValueError(
                f"mask is not block-structured for block_size {(bh, bw)}: block ({r}, {c}) "
                f"(rows {r * bh}..{r * bh + bh - 1}, cols {c * bw}..{c * bw + bw - 1}) is partly kept"
            )
    return any_kept
