"""Mask-compaction ops (csrc/) against the Python references and torch's own BSR: exact equality."""

import pytest
import torch
from conftest import devices
from hypothesis import given, settings
from hypothesis import strategies as st

from lotus_kernels import _extension, masks, ops
from lotus_kernels.layouts import (
    bsr_to_dense_ref,
    bsr_transpose_ref,
    compress_2to4_ref,
    decompress_2to4_ref,
    dense_to_bsr_ref,
    keep_indices_ref,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def assert_same(a, b):
    """Exact equality of tensors or tuples of tensors, dtype and shape included."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
        return
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a.cpu(), b.cpu())


def nonzero_randn(*shape, dtype=torch.float32, seed=0):
    """Random values bounded away from zero (so a kept block always holds a nonzero)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return (x + torch.sign(x) * 0.5).to(dtype)


def awkward_block_mask(br, bc):
    """Block rows: [first+last kept, none, all, random...]."""
    mask = torch.rand(br, bc, generator=torch.Generator().manual_seed(br * 31 + bc)) > 0.5
    mask[0] = False
    mask[0, 0] = mask[0, -1] = True
    if br > 1:
        mask[1] = False
    if br > 2:
        mask[2] = True
    return mask


# ---------------------------------------------------------------------- keep_indices


def test_keep_indices_hand_built_rows():
    mask = torch.zeros(5, 9, dtype=torch.bool)
    mask[1] = True  # full
    mask[2, 0] = True  # first only
    mask[3, 8] = True  # last only
    mask[4, 1::3] = True
    indices, counts = ops.keep_indices(mask)
    assert indices.dtype == counts.dtype == torch.int32
    expected = torch.tensor(
        [[-1] * 9, list(range(9)), [0] + [-1] * 8, [8] + [-1] * 8, [1, 4, 7] + [-1] * 6], dtype=torch.int32
    )
    assert_same(indices, expected)
    assert_same(counts, torch.tensor([0, 9, 1, 1, 3], dtype=torch.int32))


@pytest.mark.parametrize("n", [1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 197, 257, 577])
def test_keep_indices_matches_reference_around_tile_widths(n):
    mask = torch.rand(7, n, generator=torch.Generator().manual_seed(n)) > 0.4
    assert_same(ops.keep_indices(mask), keep_indices_ref(mask))


def test_keep_indices_empty_shapes():
    for shape in [(0, 5), (3, 0), (0, 0)]:
        mask = torch.zeros(shape, dtype=torch.bool)
        assert_same(ops.keep_indices(mask), keep_indices_ref(mask))


def test_keep_indices_non_contiguous_input():
    mask = torch.rand(12, 10, generator=torch.Generator().manual_seed(2)) > 0.5
    assert_same(ops.keep_indices(mask.t()), keep_indices_ref(mask.t().contiguous()))


def test_keep_indices_gathers_patches_like_timm():
    # The patch-dropping use: gather the kept tokens of x [B, N, C] with the first K indices.
    x = torch.randn(3, 10, 4)
    keep = torch.zeros(3, 10, dtype=torch.bool)
    keep[:, 0] = True  # prefix (CLS) token always kept
    keep[0, [2, 5, 9]] = keep[1, [1, 2, 3]] = keep[2, [4, 6, 8]] = True
    indices, counts = ops.keep_indices(keep)
    assert bool((counts == 4).all())
    gathered = torch.gather(x, 1, indices[:, :4].long()[..., None].expand(-1, -1, 4))
    assert torch.equal(gathered, x[keep].reshape(3, 4, 4))


# ---------------------------------------------------------------------- dense_to_bsr


@pytest.mark.parametrize("block_size", [16, 32, 64, (16, 32), (32, 16), (8, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_to_bsr_equals_torch_to_sparse_bsr(block_size, dtype):
    bh, bw = masks.block_shape(block_size)
    block_keep = awkward_block_mask(4, 3)
    weight = nonzero_randn(4 * bh, 3 * bw, dtype=dtype)
    element_mask = masks.expand_block_mask(block_keep, (bh, bw))
    ours = ops.dense_to_bsr(weight, element_mask, block_size)
    torch_bsr = (weight * element_mask).to_sparse_bsr((bh, bw))
    assert_same(ours, (torch_bsr.crow_indices(), torch_bsr.col_indices(), torch_bsr.values()))
    assert_same(ours, dense_to_bsr_ref(weight * element_mask, block_keep, bh, bw))
    # The block-level mask form gives the same triple.
    assert_same(ops.dense_to_bsr(weight * element_mask, block_keep, block_size), ours)


def test_dense_to_bsr_keeps_all_zero_kept_blocks_and_masks_partial_blocks():
    weight = nonzero_randn(8, 8)
    weight[:4, :4] = 0  # a kept block that is all zero: torch drops it, we keep it (the mask decides)
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[5, 6] = False  # partial block: stored, with that entry zeroed
    crow, col, values = ops.dense_to_bsr(weight, mask, 4)
    assert crow.tolist() == [0, 2, 4] and col.tolist() == [0, 1, 0, 1]
    assert torch.equal(bsr_to_dense_ref(crow, col, values, (8, 8)), weight * mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_to_bsr_all_pruned_and_all_kept(dtype):
    weight = nonzero_randn(32, 64, dtype=dtype)
    crow, col, values = ops.dense_to_bsr(weight, torch.zeros(2, 4, dtype=torch.bool), 16)
    assert crow.tolist() == [0, 0, 0] and col.numel() == 0 and values.shape == (0, 16, 16)
    full = ops.dense_to_bsr(weight, torch.ones(2, 4, dtype=torch.bool), 16)
    torch_bsr = weight.to_sparse_bsr((16, 16))
    assert_same(full, (torch_bsr.crow_indices(), torch_bsr.col_indices(), torch_bsr.values()))


@settings(max_examples=40, deadline=None)
@given(
    br=st.integers(1, 6),
    bc=st.integers(1, 6),
    bh=st.sampled_from([1, 2, 4, 16]),
    bw=st.sampled_from([1, 4, 8, 32]),
    density=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_dense_to_bsr_and_transpose_property(br, bc, bh, bw, density, seed):
    g = torch.Generator().manual_seed(seed)
    block_keep = torch.rand(br, bc, generator=g) < density
    weight = nonzero_randn(br * bh, bc * bw, seed=seed) * masks.expand_block_mask(block_keep, (bh, bw))
    triple = ops.dense_to_bsr(weight, block_keep, (bh, bw))
    torch_bsr = weight.to_sparse_bsr((bh, bw))
    assert_same(triple, (torch_bsr.crow_indices(), torch_bsr.col_indices(), torch_bsr.values()))
    transposed = ops.bsr_transpose(*triple, weight.shape)
    torch_t = weight.t().contiguous().to_sparse_bsr((bw, bh))
    assert_same(transposed, (torch_t.crow_indices(), torch_t.col_indices(), torch_t.values()))
    assert_same(transposed, bsr_transpose_ref(*triple, weight.shape))


# ---------------------------------------------------------------------- bsr_transpose


@pytest.mark.parametrize("dtype", DTYPES)
def test_bsr_transpose_round_trip(dtype):
    weight = nonzero_randn(64, 96, dtype=dtype)
    block_keep = awkward_block_mask(4, 3)
    triple = ops.dense_to_bsr(weight, block_keep, (16, 32))
    transposed = ops.bsr_transpose(*triple, (64, 96))
    assert transposed[2].shape[1:] == (32, 16)
    assert torch.equal(bsr_to_dense_ref(*transposed, (96, 64)), bsr_to_dense_ref(*triple, (64, 96)).t())
    assert_same(ops.bsr_transpose(*transposed, (96, 64)), triple)


@pytest.mark.parametrize(
    "corrupt,text",
    [
        (lambda c, k, v: (c.flip(0), k, v), "row pointer"),
        (lambda c, k, v: (c, k + 10, v), "col_indices must lie"),
        (lambda c, k, v: (c[:-1], k, v), "crow_indices must be"),
        (lambda c, k, v: (c, k[:-1], v), "col_indices must be"),
        (lambda c, k, v: (c.int(), k, v), "int64"),
    ],
)
def test_bsr_transpose_rejects_malformed_triples(corrupt, text):
    weight = nonzero_randn(32, 32)
    triple = ops.dense_to_bsr(weight, torch.ones(2, 2, dtype=torch.bool), 16)
    with pytest.raises((ValueError, TypeError), match=text):
        ops.bsr_transpose(*corrupt(*triple), (32, 32))


# ---------------------------------------------------------------------- 2:4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [4, 8, 28, 32, 36, 64, 196])
def test_compress_2to4_matches_reference_and_round_trips(dtype, cols):
    weight = nonzero_randn(7, cols, dtype=dtype)
    mask = masks.nm_mask(weight)
    values, metadata = ops.compress_2to4(weight, mask)
    assert values.shape == (7, cols // 2) and metadata.shape == (7, -(-cols // 32))
    assert metadata.dtype == torch.int32
    assert_same((values, metadata), compress_2to4_ref(weight, mask))
    # Without a mask: the nonzeros of the masked weight decide, same result.
    assert_same(ops.compress_2to4(weight * mask), (values, metadata))
    assert_same(ops.decompress_2to4(values, metadata), weight * mask)
    assert_same(decompress_2to4_ref(values, metadata), weight * mask)


def test_compress_2to4_metadata_layout_by_hand():
    # groups: kept (1, 3); only slot 2 -> padded with 0; nothing -> (0, 1); kept (0, 3) with -0.0 ignored
    w = torch.tensor([[0.0, 5.0, 0.0, -7.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, -0.0, 0.0, 4.0]])
    values, metadata = ops.compress_2to4(w)
    assert values.tolist() == [[5.0, -7.0, 0.0, 2.0, 0.0, 0.0, 1.0, 4.0]]
    codes = [1 | 3 << 2, 0 | 2 << 2, 0 | 1 << 2, 0 | 3 << 2]
    assert metadata.tolist() == [[sum(c << (4 * i) for i, c in enumerate(codes))]]


def test_compress_2to4_top_bit_of_metadata_word():
    # 8 groups all coding (2, 3): the word is 0xEEEEEEEE, negative as int32.
    w = torch.zeros(1, 32)
    w[0, 2::4] = 1.0
    w[0, 3::4] = 2.0
    _, metadata = ops.compress_2to4(w)
    assert metadata.item() == 0xEEEEEEEE - 2**32
    assert torch.equal(ops.decompress_2to4(*ops.compress_2to4(w)), w)


def test_compress_2to4_with_mask_ignores_weights_outside_it():
    weight = nonzero_randn(4, 16)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, 0::4] = mask[:, 2::4] = True
    values, metadata = ops.compress_2to4(weight, mask)
    assert torch.equal(ops.decompress_2to4(values, metadata), weight * mask)


@pytest.mark.parametrize("masked", [False, True])
def test_compress_2to4_rejects_three_kept_and_names_the_first_group(masked):
    weight = nonzero_randn(6, 16) * masks.nm_mask(nonzero_randn(6, 16))
    weight[4, 9] = weight[4, 10] = weight[4, 11] = 1.0  # row 4, group 2 (cols 8..11): >= 3 nonzeros
    weight[5, 0:4] = 1.0
    mask = weight != 0 if masked else None
    with pytest.raises(ValueError, match=r"row 4, columns 8\.\.11 keep [34] .*at most 2"):
        ops.compress_2to4(weight, mask)
    with pytest.raises(ValueError, match=r"row 4, columns 8\.\.11"):
        compress_2to4_ref(weight, mask)


def test_decompress_2to4_rejects_corrupt_metadata():
    values, metadata = ops.compress_2to4(torch.zeros(2, 8))
    metadata[1, 0] = 0b0100 | 0b1111 << 4  # group 0 keeps its valid (0, 1); group 1 codes (3, 3)
    with pytest.raises(ValueError, match=r"row 1 group 1 codes slots \(3, 3\)"):
        ops.decompress_2to4(values, metadata)
    with pytest.raises(ValueError, match=r"row 1 group 1"):
        decompress_2to4_ref(values, metadata)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 20), seed=st.integers(0, 2**16), n=st.integers(0, 2))
def test_2to4_property_at_most_two_kept(rows, groups, seed, n):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, groups, 4, generator=g).argsort(-1) < n  # exactly n kept per group
    weight = nonzero_randn(rows, 4 * groups, seed=seed) * keep.reshape(rows, -1)
    compressed = ops.compress_2to4(weight)
    assert_same(compressed, compress_2to4_ref(weight))
    assert_same(ops.decompress_2to4(*compressed), weight)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,exc,text",
    [
        (lambda: ops.keep_indices(torch.ones(3, 4)), TypeError, "bool"),
        (lambda: ops.keep_indices(torch.ones(3, dtype=torch.bool)), ValueError, "2-D"),
        (lambda: ops.keep_indices([[True]]), TypeError, "torch.Tensor"),
        (lambda: ops.dense_to_bsr(torch.ones(32, 32), torch.ones(2, 2), 16), TypeError, "bool"),
        (lambda: ops.dense_to_bsr(torch.ones(32, 30), torch.ones(2, 2, dtype=torch.bool), 16), ValueError, "divisible"),
        (lambda: ops.dense_to_bsr(torch.ones(32, 32), torch.ones(3, 2, dtype=torch.bool), 16), ValueError, "block-level"),
        (lambda: ops.dense_to_bsr(torch.ones(32, 32, dtype=torch.int32), torch.ones(2, 2, dtype=torch.bool), 16), TypeError, "float16"),
        (lambda: ops.dense_to_bsr(torch.ones(32, 32), torch.ones(2, 2, dtype=torch.bool), 0), ValueError, "positive"),
        (lambda: ops.compress_2to4(torch.zeros(4, 6)), ValueError, "divisible by 4"),
        (lambda: ops.compress_2to4(torch.zeros(4, 8), torch.zeros(4, 4, dtype=torch.bool)), ValueError, "mask shape"),
        (lambda: ops.compress_2to4(torch.zeros(4, 8), torch.zeros(4, 8)), TypeError, "bool"),
        (lambda: ops.compress_2to4(torch.zeros(4, 8, dtype=torch.float8_e4m3fn)), TypeError, "float16"),
        (lambda: ops.decompress_2to4(torch.zeros(4, 4), torch.zeros(4, 2, dtype=torch.int32)), ValueError, "metadata must have shape"),
        (lambda: ops.decompress_2to4(torch.zeros(4, 4), torch.zeros(4, 1, dtype=torch.int64)), TypeError, "int32"),
        (lambda: ops.bsr_transpose(torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 16, 16), 32), TypeError, "pair"),
    ],
)
def test_bad_input_raises_value_or_type_error(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)


def test_ops_say_clearly_when_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(_extension, "_EXT", None)
    monkeypatch.setattr(_extension, "_ERROR", "lotus_kernels._C was not built")
    with pytest.raises(RuntimeError, match="not built.*pip install -e"):
        ops.keep_indices(torch.ones(2, 2, dtype=torch.bool))


def test_ops_say_clearly_when_cuda_was_not_built(monkeypatch):
    class FakeCudaTensor:
        is_cuda = True

    monkeypatch.setattr(_extension, "_WITH_CUDA", False)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _extension.require("keep_indices", FakeCudaTensor())


# ---------------------------------------------------------------------- torch.library


def opcheck_cases():
    weight = nonzero_randn(32, 64)
    block_keep = awkward_block_mask(2, 4)
    triple = ops.dense_to_bsr(weight, block_keep, 16)
    nm_weight = weight * masks.nm_mask(weight)
    compressed = ops.compress_2to4(nm_weight)
    return [
        ("keep_indices", (torch.rand(4, 33) > 0.5,)),
        ("dense_to_bsr", (weight, block_keep, 16, 16)),
        ("bsr_transpose", (*triple, 32, 64)),
        ("compress_2to4", (nm_weight, None)),
        ("compress_2to4", (weight, masks.nm_mask(weight))),
        ("decompress_2to4", compressed),
    ]


@pytest.mark.parametrize("name,args", opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    # Schema, fake (meta) implementation, dispatch and AOT tracing, as torch.library checks them.
    torch.library.opcheck(getattr(torch.ops.lotus_kernels, name).default, args)


def test_ops_trace_under_torch_compile_without_graph_break():
    def f(mask, w):
        indices, counts = ops.keep_indices(mask)
        values, metadata = ops.compress_2to4(w)
        return indices.sum() + counts.sum(), ops.decompress_2to4(values, metadata)

    mask = torch.rand(3, 17) > 0.5
    w = nonzero_randn(8, 16) * masks.nm_mask(nonzero_randn(8, 16))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, expected = compiled(mask, w), f(mask, w)
    assert_same(got[0], expected[0])
    assert_same(got[1], expected[1])


# ---------------------------------------------------------------------- CUDA == CPU


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ops_equal_cpu_ops(dtype):
    weight = nonzero_randn(64, 96, dtype=dtype)
    block_keep = awkward_block_mask(4, 3)
    cpu = ops.dense_to_bsr(weight, block_keep, (16, 32))
    gpu = ops.dense_to_bsr(weight.cuda(), block_keep.cuda(), (16, 32))
    assert_same(gpu, cpu)
    assert_same(ops.bsr_transpose(*gpu, (64, 96)), ops.bsr_transpose(*cpu, (64, 96)))
    mask = masks.nm_mask(weight)
    assert_same(ops.compress_2to4(weight.cuda(), mask.cuda()), ops.compress_2to4(weight, mask))
    assert_same(ops.compress_2to4((weight * mask).cuda()), ops.compress_2to4(weight * mask))
    values, metadata = ops.compress_2to4(weight.cuda(), mask.cuda())
    assert_same(ops.decompress_2to4(values, metadata), weight * mask)
    for n in (1, 31, 32, 33, 197, 257, 577, 4099):
        keep = torch.rand(5, n) > 0.3
        assert_same(ops.keep_indices(keep.cuda()), ops.keep_indices(keep))


@pytest.mark.cuda
def test_cuda_errors_and_empty_inputs():
    bad = torch.ones(3, 8, device="cuda")
    with pytest.raises(ValueError, match=r"row 0, columns 0\.\.3 keep 4"):
        ops.compress_2to4(bad)
    crow, col, values = ops.dense_to_bsr(torch.ones(32, 32, device="cuda"), torch.zeros(2, 2, dtype=torch.bool, device="cuda"), 16)
    assert crow.tolist() == [0, 0, 0] and col.numel() == 0
    assert ops.bsr_transpose(crow, col, values, (32, 32))[0].tolist() == [0, 0, 0]
    assert_same(ops.keep_indices(torch.zeros(0, 4, dtype=torch.bool, device="cuda")), keep_indices_ref(torch.zeros(0, 4, dtype=torch.bool)))


@pytest.mark.parametrize("device", devices())
def test_ops_on_each_device(device):
    weight = nonzero_randn(32, 32).to(device)
    crow, col, values = ops.dense_to_bsr(weight, torch.ones(2, 2, dtype=torch.bool, device=device), 16)
    assert crow.device.type == device and values.device.type == device


# ---------------------------------------------------------------------- hostile input (issue #16)


def bytes_as_bool(raw) -> torch.Tensor:
    """A bool tensor whose bytes are the given uint8 values (2, 255: not 0/1, as foreign memory may hold)."""
    return torch.tensor(raw, dtype=torch.uint8).view(torch.bool)


def test_bool_masks_with_bytes_other_than_0_1_mean_true_everywhere():
    # Before: dense_to_bsr counted byte 2 as two blocks (crow [0, 3, 3]) and left a col entry
    # uninitialised; compress_2to4 read such masks by bit. Every op (and reference) reads any
    # nonzero byte as true, exactly as the mask (raw != 0).
    raw = [[1, 2, 0, 255], [0, 0, 4, 0]]
    weird, clean = bytes_as_bool(raw), torch.tensor(raw) != 0
    weight = nonzero_randn(32, 64)
    assert_same(ops.dense_to_bsr(weight, weird, 16), ops.dense_to_bsr(weight, clean, 16))
    assert_same(dense_to_bsr_ref(weight, weird, 16, 16), ops.dense_to_bsr(weight, clean, 16))
    element = bytes_as_bool(masks.expand_block_mask(torch.tensor(raw, dtype=torch.uint8), 16).tolist())
    assert_same(ops.dense_to_bsr(weight, element, 16), ops.dense_to_bsr(weight, masks.expand_block_mask(clean, 16), 16))
    assert_same(ops.keep_indices(weird), ops.keep_indices(clean))
    assert_same(keep_indices_ref(weird), ops.keep_indices(clean))
    two_of_four = bytes_as_bool([[7, 0, 0, 2, 0, 9, 3, 0]])
    w = nonzero_randn(1, 8)
    expected = ops.compress_2to4(w, torch.tensor([[1, 0, 0, 1, 0, 1, 1, 0]], dtype=torch.bool))
    assert_same(ops.compress_2to4(w, two_of_four), expected)
    assert_same(compress_2to4_ref(w, two_of_four), expected)


@pytest.mark.parametrize(
    "shape,exc,text",
    [
        ((2**63 - 1, 16), ValueError, "at most"),  # br + 1 overflowed: "crow_indices must be [-9223372036854775808]"
        ((16, 2**63 - 1), ValueError, "at most"),
        ((16, 2**50), ValueError, "cols needs a row pointer"),  # an allocator message before
        ((2**64, 16), ValueError, "rows must be an int in [0, 2**63)"),
        ((-16, 16), ValueError, "non-negative"),
        ((16.0, 16), TypeError, "shape must be a (rows, cols) pair of ints, got (16.0, 16)"),  # truncated silently before
        ((1.7, 4), TypeError, "pair of ints"),
        ((True, 16), TypeError, "pair of ints"),
    ],
)
def test_bsr_transpose_huge_negative_and_float_shapes_are_named_errors(shape, exc, text):
    crow, col, values = torch.zeros(17, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 1, 1)
    if shape[0] != 16:
        crow = torch.zeros(2, dtype=torch.int64)  # the check names the shape before crow's length
    with pytest.raises(exc) as info:
        ops.bsr_transpose(crow, col, values, shape)
    assert text in str(info.value)
    assert "-9223372036854775808" not in str(info.value)


def test_bsr_transpose_accepts_numpy_ints_as_shape():
    np = pytest.importorskip("numpy")
    triple = ops.dense_to_bsr(nonzero_randn(32, 32), torch.ones(2, 2, dtype=torch.bool), 16)
    assert_same(ops.bsr_transpose(*triple, (np.int64(32), np.int32(32))), ops.bsr_transpose(*triple, (32, 32)))


@pytest.mark.parametrize("device", devices())
def test_bsr_transpose_rejects_a_column_twice_in_a_row(device):
    values = nonzero_randn(3, 4, 4).to(device)
    crow = torch.tensor([0, 2, 3], device=device)
    for col in ([1, 1, 0], [0, 0, 0]):
        with pytest.raises(ValueError, match="lists block column 1 twice in block row 0|lists block column 0 twice in block row 0"):
            ops.bsr_transpose(crow, torch.tensor(col, device=device), values, (8, 8))
    # Unsorted but distinct columns are a valid structure.
    transposed = ops.bsr_transpose(crow, torch.tensor([1, 0, 0], device=device), values, (8, 8))
    assert torch.equal(bsr_to_dense_ref(*transposed, (8, 8)), bsr_to_dense_ref(crow, torch.tensor([1, 0, 0], device=device), values, (8, 8)).t())


def test_decompress_2to4_ref_of_zero_rows_equals_the_op():
    values, metadata = torch.zeros(0, 4), torch.zeros(0, 1, dtype=torch.int32)
    assert_same(decompress_2to4_ref(values, metadata), ops.decompress_2to4(values, metadata))


def test_dense_to_bsr_row_pointer_of_a_huge_empty_weight_is_a_named_error():
    # [2**62, 0] and [2**40, 0] are valid (empty) tensors, but their row pointers are not.
    for rows, text in ((2**62, "cannot be addressed"), (2**40, "block rows needs a row pointer")):
        with pytest.raises(ValueError, match=text):
            ops.dense_to_bsr(torch.empty(rows, 0), torch.empty(rows, 0, dtype=torch.bool), (1, 1))


def test_ops_under_many_threads_and_concurrent_python_threads():
    # Issue #15: a segfault on a 16-core machine in the malformed-triple test. Every op
    # validates before any parallel region; here 16 intra-op threads and 8 Python threads
    # run valid inputs large enough to split across threads (exact answers) and malformed
    # ones (clean errors) concurrently, in a shuffled order per thread.
    import random
    from concurrent.futures import ThreadPoolExecutor

    weight = nonzero_randn(512, 1024)
    block_keep = awkward_block_mask(64, 128)
    triple = dense_to_bsr_ref(weight * masks.expand_block_mask(block_keep, 8), block_keep, 8, 8)
    nm = masks.nm_mask(weight)
    compressed = compress_2to4_ref(weight, nm)
    keep = torch.rand(512, 1024, generator=torch.Generator().manual_seed(3)) > 0.5
    weird_keep = (keep.to(torch.uint8) * 7).view(torch.bool)  # bytes 0 / 7
    crow, col, values = triple
    bad_meta = compressed[1].clone()
    bad_meta[300, 5] = 0xF  # row 300, group 40 codes (3, 3)
    dup_col = col.clone()
    dup_col[1] = dup_col[0]  # block row 0 (first and last kept) lists its first column twice
    valid = [
        (lambda: ops.keep_indices(keep), keep_indices_ref(keep)),
        (lambda: ops.keep_indices(weird_keep), keep_indices_ref(keep)),
        (lambda: ops.dense_to_bsr(weight * masks.expand_block_mask(block_keep, 8), block_keep, 8), triple),
        (lambda: ops.bsr_transpose(*triple, (512, 1024)), bsr_transpose_ref(*triple, (512, 1024))),
        (lambda: ops.compress_2to4(weight, nm), compressed),
        (lambda: ops.decompress_2to4(*compressed), weight * nm),
    ]
    invalid = [
        (lambda: ops.bsr_transpose(crow, col + 1, values, (512, 1024)), "col_indices must lie"),
        (lambda: ops.bsr_transpose(crow, dup_col, values, (512, 1024)), "twice in block row 0"),
        (lambda: ops.bsr_transpose(crow + torch.arange(65) % 2, col, values, (512, 1024)), "row pointer"),
        (lambda: ops.bsr_transpose(crow, col, values, (2**63 - 1, 1024)), "shape"),
        (lambda: ops.compress_2to4(weight), "at most 2"),
        (lambda: ops.decompress_2to4(compressed[0], bad_meta), "row 300 group 40"),
        (lambda: ops.dense_to_bsr(weight, block_keep[:-1], 8), "block-level"),
        (lambda: ops.keep_indices(keep.float()), "bool"),
    ]

    def worker(seed: int) -> int:
        cases = [(c, True) for c in valid] + [(c, False) for c in invalid]
        random.Random(seed).shuffle(cases)
        for (call, expected), ok in cases * 2:
            if ok:
                assert_same(call(), expected)
            else:
                with pytest.raises((ValueError, TypeError), match=expected):
                    call()
        return len(cases) * 2

    threads = torch.get_num_threads()
    torch.set_num_threads(16)
    try:
        with ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(worker, range(8))) == 8 * 2 * (len(valid) + len(invalid))
    finally:
        torch.set_num_threads(threads)
