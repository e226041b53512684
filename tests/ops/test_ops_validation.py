"""The kernel ops check the indices they are given (issue #16): a malformed triple, structure or
2:4 metadata is a ValueError naming what is wrong, never a segfault or a silent wrong answer.

The Triton kernels trust every index they read, so ops.py checks a triple once per index state
(remembered in weight_cache against identity and version counters) and trusts it afterwards.
Runs under TRITON_INTERPRET=1 on CPU (or on CUDA with TRITON_INTERPRET=0), small sizes.
"""

import sys

import pytest
import torch
from conftest import triton_device

from lotus_kernels import SparseLinear, layouts, masks, ops
from lotus_kernels.ops import weight_cache
from lotus_kernels.kernels.block_sparse_matmul import block_sparse_matmul_ref
from lotus_kernels.kernels.semi_structured_matmul import semi_structured_matmul_ref

DEVICE = triton_device()
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="TRITON_INTERPRET=0 needs a CUDA device")


@pytest.fixture
def cache(monkeypatch):
    monkeypatch.setattr(weight_cache, "_CACHE", {})


def block_case(seed=0):
    """W [64, 64] in 16x16 blocks, 4x4 grid with row 0 holding blocks 0 and 3 (so it has two), x [5, 64]."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(4, 4, generator=g) > 0.4
    keep[0] = torch.tensor([True, False, False, True])
    w = torch.randn(64, 64, generator=g)
    crow, col, values = ops.dense_to_bsr(w.to(DEVICE), keep.to(DEVICE), 16)
    x = torch.randn(5, 64, generator=g).to(DEVICE)
    return x, crow, col, values


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


# (name, (crow, col) -> corrupted (crow, col), text); each one segfaulted, raised a torch internal
# error or returned garbage before (issue #16's list).
CORRUPT_TRIPLES = [
    ("crow[-1] + 1", lambda c, k: (_set(c, -1, c[-1] + 1), k), "valid BSR row pointer"),
    ("crow decreasing", lambda c, k: (c.flip(0), k), "valid BSR row pointer"),
    ("col = 10**8", lambda c, k: (c, _set(k, 0, 10**8)), "must lie in [0, 4)"),
    ("col = -10**8", lambda c, k: (c, _set(k, 0, -(10**8))), "must lie in [0, 4)"),
    ("col = -3", lambda c, k: (c, _set(k, 0, -3)), "must lie in [0, 4)"),
    ("col = n_block_cols", lambda c, k: (c, _set(k, 0, 4)), "must lie in [0, 4)"),
    ("duplicate column", lambda c, k: (c, _set(k, 1, k[0])), "lists block column 0 twice in block row 0"),
]


@pytest.mark.parametrize("with_structure", [False, True])
@pytest.mark.parametrize("name,corrupt,text", CORRUPT_TRIPLES, ids=[c[0] for c in CORRUPT_TRIPLES])
def test_block_sparse_matmul_rejects_a_malformed_triple(cache, name, corrupt, text, with_structure):
    x, crow, col, values = block_case()
    bad_crow, bad_col = corrupt(crow, col)
    kwargs = {}
    if with_structure:
        # A structure made from the good triple, handed over with the bad one (or made from the
        # bad one bypassing the check): either way the call must refuse it.
        kwargs["structure"] = ops.build_block_sparse_structure(crow, col, 64, 64, (16, 16))
    with pytest.raises(ValueError) as info:
        ops.block_sparse_matmul(x, values, bad_crow, bad_col, 64, **kwargs)
    assert text in str(info.value) or "does not belong" in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="block_sparse_structure"):
        ops.block_sparse_structure(bad_crow, bad_col, 64, 64, (16, 16))


@pytest.mark.parametrize(
    "field,corrupt",
    [
        ("row_order", lambda t: t + 100),  # segfaulted the interpreter before
        ("row_order", lambda t: t.flip(0)[:3]),
        ("crow_t", lambda t: t.clone().fill_(0)),
        ("source_t", lambda t: t.flip(0)),
        ("block_row", lambda t: t.to(torch.int32)),
    ],
)
def test_block_sparse_matmul_rejects_a_structure_that_is_not_the_triples(cache, field, corrupt):
    x, crow, col, values = block_case()
    structure = ops.block_sparse_structure(crow, col, 64, 64, (16, 16))
    bad = structure._replace(**{field: corrupt(getattr(structure, field))})
    with pytest.raises(ValueError, match=f"structure.{field} does not belong to crow_indices/col_indices"):
        ops.block_sparse_matmul(x, values, crow, col, 64, structure=bad)
    # A structure of another (valid) triple is refused too.
    _, crow2, col2, values2 = block_case(seed=3)
    if col2.shape == col.shape:
        other = ops.block_sparse_structure(crow2, col2, 64, 64, (16, 16))
        if not all(torch.equal(a, b) for a, b in zip(other, structure)):
            with pytest.raises(ValueError, match="does not belong"):
                ops.block_sparse_matmul(x, values, crow, col, 64, structure=other)


def test_the_check_runs_once_per_index_state(cache, monkeypatch):
    x, crow, col, values = block_case()
    structure = ops.block_sparse_structure(crow, col, 64, 64, (16, 16))
    calls = []
    check = layouts.check_bsr_structure
    monkeypatch.setattr(sys.modules["lotus_kernels.ops.block_sparse_matmul"], "check_bsr_structure", lambda *a, **k: (calls.append(1), check(*a, **k))[1])
    expected = block_sparse_matmul_ref(x, crow, col, values, 64)
    for _ in range(3):
        torch.testing.assert_close(ops.block_sparse_matmul(x, values, crow, col, 64, structure=structure), expected)
    assert len(calls) == 1  # later calls with the same tensors cost no host sync
    with torch.no_grad():
        col[1] = col[0]  # in place: the version moves, the next call checks again
    with pytest.raises(ValueError, match="twice in block row 0"):
        ops.block_sparse_matmul(x, values, crow, col, 64, structure=structure)
    assert len(calls) == 2


def test_sparse_linear_whose_buffers_were_corrupted_in_place_raises_instead_of_crashing(cache):
    keep = torch.ones(4, 4, dtype=torch.bool)
    layer = SparseLinear.from_dense(
        torch.nn.Linear(64, 64, device=DEVICE), "block", mask=masks.expand_block_mask(keep, 16).to(DEVICE), block_size=16, backend="triton"
    )
    x = torch.randn(3, 64, device=DEVICE)
    layer(x)
    with torch.no_grad():
        layer.col_indices[0] = 10**8
    with pytest.raises(ValueError, match="must lie in"):
        layer(x)


# ---------------------------------------------------------------------- 2:4


def two_four_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 64, generator=g)
    values, metadata = ops.compress_2to4(w, masks.nm_mask(w))
    x = torch.randn(5, 64, generator=g)
    return x.to(DEVICE), values.to(DEVICE), metadata.to(DEVICE)


def test_semi_structured_matmul_rejects_corrupt_metadata(cache):
    # Before: every corrupt word was accepted; a (3, 3) code changed y by 3.8 while
    # decompress_2to4 rejected the same metadata.
    x, values, metadata = two_four_case()
    torch.testing.assert_close(ops.semi_structured_matmul(x, values, metadata), semi_structured_matmul_ref(x, values, metadata))
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        bad = metadata.clone()
        r, w = int(torch.randint(32, (1,), generator=g)), int(torch.randint(2, (1,), generator=g))
        slot = int(torch.randint(8, (1,), generator=g))
        code = [0b0000, 0b0101, 0b1010, 0b1111, 0b0001, 0b0110, 0b1011, 0b0010][trial % 8]  # i0 >= i1
        word = (int(bad[r, w]) & 0xFFFFFFFF) & ~(0xF << (4 * slot)) | (code << (4 * slot))
        bad[r, w] = word - 2**32 if word >= 2**31 else word
        group = 8 * w + slot
        with pytest.raises(ValueError, match=rf"semi_structured_matmul: metadata row {r} group {group} codes slots"):
            ops.semi_structured_matmul(x, values, bad)


def test_semi_structured_matmul_checks_metadata_once_per_state(cache, monkeypatch):
    x, values, metadata = two_four_case()
    calls = []
    check = layouts.check_2to4_metadata
    monkeypatch.setattr(sys.modules["lotus_kernels.ops.semi_structured_matmul"], "check_2to4_metadata", lambda *a, **k: (calls.append(1), check(*a, **k))[1])
    for _ in range(3):
        ops.semi_structured_matmul(x, values, metadata)
    assert len(calls) == 1
    with torch.no_grad():
        metadata[0, 0] = 0  # codes (0, 0): corrupt, written in place
    with pytest.raises(ValueError, match="row 0 group 0"):
        ops.semi_structured_matmul(x, values, metadata)
