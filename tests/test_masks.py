"""Masks: exact counts, the stated rounding, deterministic ties, exact pattern structure."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lotus_kernels import masks


def sorted_prune_ref(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Keep-masks pruning the k lowest scores by a full stable sort (ties: earliest position)."""
    flat = torch.cat([s.float().flatten() for s in scores])
    order = torch.sort(flat, stable=True).indices
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[:k]] = False
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out


def test_num_pruned_rounds_half_up():
    assert masks.num_pruned(10, 0.25) == 3  # 2.5 -> 3 (Python's round() would give 2)
    assert masks.num_pruned(10, 0.349) == 3
    assert masks.num_pruned(10, 0.35) == 4
    assert masks.num_pruned(7, 0.0) == 0
    assert masks.num_pruned(4, 0.999) == 4


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 96), (3, 2, 8)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.9, 0.99])
def test_magnitude_mask_exact_count_and_choice(shape, sparsity):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    mask = masks.magnitude_mask(w, sparsity)
    k = math.floor(sparsity * w.numel() + 0.5)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert int((~mask).sum()) == k
    assert torch.equal(mask, sorted_prune_ref([w.abs()], k)[0])


def test_magnitude_mask_ties_prune_earliest_first():
    w = torch.tensor([[1.0, -1.0, 1.0, 2.0], [1.0, 3.0, -1.0, 0.5]])
    # 0.5 goes first, then the first two of the five tied |w| = 1 in row-major order.
    mask = masks.magnitude_mask(w, 3 / 8)
    expected = torch.tensor([[False, False, True, True], [True, True, True, False]])
    assert torch.equal(mask, expected)


def test_magnitude_mask_all_equal_and_zeros():
    w = torch.zeros(4, 8)
    mask = masks.magnitude_mask(w, 0.5)
    assert torch.equal(mask.flatten(), torch.arange(32) >= 16)
    w = torch.full((3, 3), -2.0)
    assert int((~masks.magnitude_mask(w, 0.3)).sum()) == 3


def test_global_magnitude_masks_one_threshold_across_tensors():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(16, 32, generator=g), "b": 5 * torch.randn(8, 64, generator=g), "c": torch.randn(3, 7, generator=g)}
    result = masks.global_magnitude_masks(weights, 0.6)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in result.values()) == math.floor(0.6 * total + 0.5)
    expected = sorted_prune_ref([w.abs() for w in weights.values()], math.floor(0.6 * total + 0.5))
    for m, e in zip(result.values(), expected):
        assert torch.equal(m, e)
    # "b" is 5x larger: a global threshold prunes it far less than the others.
    assert result["b"].float().mean() > result["a"].float().mean()


def test_global_ties_across_tensors_follow_dict_order():
    weights = {"x": torch.ones(2, 2), "y": torch.ones(2, 2)}
    result = masks.global_magnitude_masks(weights, 0.75)  # 6 of 8 tied: all of x, then 2 of y
    assert not result["x"].any()
    assert torch.equal(result["y"].flatten(), torch.tensor([False, False, True, True]))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 40),
    sparsity=st.floats(0.0, 0.999),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_score_mask_matches_sort_reference_property(rows, cols, sparsity, levels, seed):
    # Few distinct levels (many ties), negative and zero scores included.
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(-levels, levels + 1, (rows, cols), generator=g).float() / 3
    mask = masks.score_mask(score, sparsity)
    k = math.floor(sparsity * score.numel() + 0.5)
    assert torch.equal(mask, sorted_prune_ref([score], k)[0])


def test_score_mask_handles_negative_zero_and_large_range():
    score = torch.tensor([-0.0, 0.0, -1e30, 1e30, -3.0, 2.5, float("1e-40"), -1e-40])
    mask = masks.score_mask(score, 0.5)
    assert torch.equal(mask, sorted_prune_ref([score], 4)[0])
    # -0.0 and +0.0 tie: the earlier one goes first.
    assert torch.equal(masks.score_mask(torch.tensor([0.0, -0.0]), 0.5), torch.tensor([False, True]))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 4)])
def test_nm_mask_keeps_n_largest_per_group(n, m):
    w = torch.randn(9, 4 * m, generator=torch.Generator().manual_seed(3))
    mask = masks.nm_mask(w, n, m)
    groups = mask.reshape(9, -1, m)
    assert bool((groups.sum(-1) == n).all())
    kept_min = torch.where(groups, w.abs().reshape(9, -1, m), float("inf")).amin(-1)
    dropped_max = torch.where(~groups, w.abs().reshape(9, -1, m), float("-inf")).amax(-1)
    assert bool((kept_min >= dropped_max).all())


def test_nm_mask_ties_keep_earliest_and_zero_rows():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, -3.0, 3.0]])
    mask = masks.nm_mask(w)
    expected = torch.tensor([[True, True, False, False, True, True, False, False, False, True, True, False]])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("block_size", [16, (16, 32), (32, 16), (4, 8)])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_block_mask_exact_block_count_and_structure(block_size, norm):
    bh, bw = masks.block_shape(block_size)
    w = torch.randn(4 * bh, 6 * bw, generator=torch.Generator().manual_seed(4))
    mask = masks.block_mask(w, 0.5, block_size, norm=norm)
    blocks = masks.reduce_block_mask(mask, block_size, strict=True)  # raises if not block-structured
    assert int((~blocks).sum()) == 12
    scores = w.reshape(4, bh, 6, bw).abs().pow(1 if norm == "l1" else 2).sum((1, 3))
    assert torch.equal(blocks, sorted_prune_ref([scores], 12)[0])


def test_block_mask_l1_and_l2_can_differ():
    # Block 0: one big entry (large L2, small L1); block 1: many medium ones.
    w = torch.zeros(2, 8)
    w[0, 0] = 2.5  # L1 = 2.5 and L2^2 = 6.25, both below block 1's 8
    w[:, 4:] = 1.0
    assert torch.equal(masks.block_mask(w, 0.5, (2, 4), norm="l2")[0], torch.tensor([False] * 4 + [True] * 4))
    assert torch.equal(masks.block_mask(w, 0.5, (2, 4), norm="l2"), masks.block_mask(w, 0.5, (2, 4), norm="l1"))
    w[0, 0] = 5.0  # now L1 = 5 < 8 but L2^2 = 25 > 8
    assert masks.block_mask(w, 0.5, (2, 4), norm="l2")[0, 0]
    assert not masks.block_mask(w, 0.5, (2, 4), norm="l1")[0, 0]


def test_project_mask_dispatches_patterns():
    score = torch.rand(32, 64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(masks.project_mask(score, "unstructured", 0.3), masks.score_mask(score, 0.3))
    assert torch.equal(masks.project_mask(score, "2:4"), masks.nm_score_mask(score, 2, 4))
    assert torch.equal(masks.project_mask(score, "1:4", 0.75), masks.nm_score_mask(score, 1, 4))
    assert torch.equal(masks.project_mask(score, "block", 0.5, 16), masks.block_score_mask(score, 0.5, 16))


def test_project_mask_is_how_pruning_methods_use_any_score():
    # e.g. a movement/Taylor score that is not |w|: projection keeps its highest entries.
    score = torch.arange(64.0).reshape(4, 16)
    mask = masks.project_mask(score, "2:4")
    assert torch.equal(mask.reshape(4, 4, 4), torch.tensor([False, False, True, True]).expand(4, 4, 4))


def test_masks_work_in_half_and_bfloat16():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(6))
    for dtype in (torch.float16, torch.bfloat16):
        wd = w.to(dtype)
        assert torch.equal(masks.magnitude_mask(wd, 0.5), sorted_prune_ref([wd.float().abs()], 256)[0])
        assert int((~masks.block_mask(wd, 0.25, 8)).sum()) == 2 * 64


@pytest.mark.parametrize(
    "call,exc,text",
    [
        (lambda w: masks.magnitude_mask(w, 1.0), ValueError, "[0, 1)"),
        (lambda w: masks.magnitude_mask(w, -0.1), ValueError, "[0, 1)"),
        (lambda w: masks.magnitude_mask(w, float("nan")), ValueError, "[0, 1)"),
        (lambda w: masks.magnitude_mask(w, True), TypeError, "sparsity"),
        (lambda w: masks.magnitude_mask(w, "0.5"), TypeError, "sparsity"),
        (lambda w: masks.magnitude_mask(w.int(), 0.5), TypeError, "floating"),
        (lambda w: masks.magnitude_mask(w.numpy(), 0.5), TypeError, "torch.Tensor"),
        (lambda w: masks.nm_mask(w[:, :6]), ValueError, "divisible by m=4"),
        (lambda w: masks.nm_mask(w, 3, 2), ValueError, "0 < n <= m"),
        (lambda w: masks.block_mask(w, 0.5, 5), ValueError, "not divisible"),
        (lambda w: masks.block_mask(w, 0.5, 0), ValueError, "positive"),
        (lambda w: masks.block_mask(w, 0.5, (4, 4, 4)), TypeError, "block_size"),
        (lambda w: masks.block_mask(w, 0.5, 4, norm="linf"), ValueError, "norm"),
        (lambda w: masks.global_magnitude_masks({}, 0.5), ValueError, "non-empty"),
        (lambda w: masks.project_mask(w, "3:x"), ValueError, "n:m"),
        (lambda w: masks.project_mask(w, "unstructured"), ValueError, "needs a sparsity"),
        (lambda w: masks.project_mask(w, "2:4", 0.3), ValueError, "sparsity 0.5"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, text):
    w = torch.randn(8, 16)
    with pytest.raises(exc, match=None) as info:
        call(w)
    assert text in str(info.value)


def test_nan_and_inf_weights_are_rejected():
    for bad in (float("nan"), float("inf")):
        w = torch.randn(4, 8)
        w[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            masks.magnitude_mask(w, 0.5)
        with pytest.raises(ValueError, match="NaN or Inf"):
            masks.nm_mask(w)


def test_reduce_block_mask_names_the_mixed_block():
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[5, 6] = False
    with pytest.raises(ValueError, match=r"block \(1, 1\)"):
        masks.reduce_block_mask(mask, 4)
    assert masks.reduce_block_mask(mask, 4, strict=False).all()


# ---------------------------------------------------------------------- precision (issue #16)


def test_float64_weights_are_ranked_in_float64():
    # Before: ranked as float32, where 1e300 and 1e200 are both inf, so 0.5 pruned the largest.
    w = torch.tensor([[1e300, 1e200, 1e100, 1.0]], dtype=torch.float64)
    assert masks.magnitude_mask(w, 0.5).tolist() == [[True, True, False, False]]
    assert masks.nm_mask(w).tolist() == [[True, True, False, False]]
    assert masks.score_mask(-w, 0.5).tolist() == [[False, False, True, True]]
    both = masks.global_magnitude_masks({"a": w, "b": torch.tensor([5.0, -3.0])}, 0.5)
    assert both["a"].tolist() == [[True, True, True, False]] and both["b"].tolist() == [False, False]
    # Differences below float32's resolution count too.
    close = torch.tensor([1.0 + 2**-40, 1.0, 1.0 + 2**-41, 1.0 + 2**-42], dtype=torch.float64)
    assert masks.score_mask(close, 0.5).tolist() == [True, False, True, False]
    assert masks.block_mask(close.reshape(2, 2), 0.5, (1, 2)).tolist() == [[True, True], [False, False]]


@settings(max_examples=60, deadline=None)
@given(
    # Any finite double, and often ones that float32 would round to +-inf or to 0 (ties there).
    values=st.lists(
        st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.floats(1e39, 1e300), st.floats(-1e300, -1e39), st.floats(-1e-46, 1e-46)),
        min_size=1, max_size=40,
    ),
    sparsity=st.floats(0, 0.99),
)
def test_float64_ranking_matches_a_full_sort(values, sparsity):
    score = torch.tensor(values, dtype=torch.float64) + 0.0  # -0.0 ties +0.0, as the masks compare them
    k = masks.num_pruned(score.numel(), sparsity)
    order = torch.sort(score, stable=True).indices
    expected = torch.ones_like(score, dtype=torch.bool)
    expected[order[:k]] = False
    assert torch.equal(masks.score_mask(score, sparsity), expected)


def test_block_mask_of_large_finite_weights():
    # Before: 1e20 squared overflowed float32 and the check said "NaN or Inf".
    w = torch.full((4, 4), 1e20)
    w[0, 0] = 3e20
    mask = masks.block_mask(w, 0.5, 2)
    assert int((~mask).sum()) == 8 and bool(mask[0, 0])
    big = torch.tensor([[1e300, 1e300], [1e299, 1e301]], dtype=torch.float64)
    assert masks.block_mask(big, 0.5, (1, 2)).tolist() == [[False, False], [True, True]]
    assert masks.block_mask(big, 0.5, (1, 2), norm="l1").tolist() == [[False, False], [True, True]]
