"""Fuzz: malformed input at every public op and at SparseLinear (issue #16).

Every example is either valid, and then the op must give the ``*_ref`` answer
(exactly for the index ops, to a tolerance for the matmuls), or invalid, and
then it must raise ValueError / TypeError (RuntimeError from load_state_dict,
which wraps our message, with the layer left untouched). Validity is decided
here by plain Python over lists, independently of the checks under test.
Anything else (a crash, an IndexError, a torch internal RuntimeError, a wrong
answer) fails.

Inputs: bool masks whose bytes are not 0/1, BSR triples with one mutation
(row pointer, a column out of range or twice in a row, lengths, dtypes,
shapes up to 2**63 - 1, floats), block_sparse_matmul with and without
``structure=`` (and structures that do not belong to the triple), corrupt 2:4
metadata, patch-dropping keep_idx rows, SparseLinear state_dicts with a key,
dtype, shape or value changed. Each example runs with 1 or 16 intra-op
threads, and sizes reach the C++ ops' parallel paths.

Deterministic by default (CI); LOTUS_FUZZ_RANDOM=1 explores new examples and
LOTUS_FUZZ_SCALE=10 runs ten times as many per test. Under the sanitizer build
(``make sanitize``) the same module runs against an ASan/UBSan extension.
"""

import contextlib
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_device
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mask_compaction import assert_same

from lotus_kernels import SparseLinear, masks, ops
from lotus_kernels.layouts import (
    bsr_transpose_ref,
    compress_2to4_ref,
    decompress_2to4_ref,
    dense_to_bsr_ref,
    keep_indices_ref,
)
from lotus_kernels.kernels.block_sparse_matmul import block_sparse_matmul_ref
from lotus_kernels.kernels.patch_drop_attention import patch_drop_attention_ref
from lotus_kernels.kernels.semi_structured_matmul import semi_structured_matmul_ref

DEVICE = triton_device()
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="TRITON_INTERPRET=0 needs a CUDA device")

def fuzz(examples: int):
    """Hypothesis settings: `examples` per test (per parametrized case), times LOTUS_FUZZ_SCALE."""
    return settings(
        max_examples=max(1, round(examples * float(os.environ.get("LOTUS_FUZZ_SCALE", "1")))),
        deadline=None,
        derandomize=os.environ.get("LOTUS_FUZZ_RANDOM") != "1",
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


# What a triple may suffer (bsr_cases): each is its own parametrized case, so every one is
# exercised on every run (a derandomized search over one big space skips most of them).
MUTATIONS = [
    "none", "crow_entry", "crow_last", "col_entry", "col_duplicate", "col_swap_rows", "crow_short", "col_short",
    "crow_int32", "col_float", "values_shape", "shape_huge", "shape_float", "shape_indivisible",
]
THREADS = st.sampled_from([1, 16])
HUGE = [2**63 - 1, 2**62, 2**40, -1, -(2**63)]


@contextlib.contextmanager
def intra_op_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def outcome(call):
    """("ok", result) or ("error", exception) for ValueError / TypeError; anything else propagates (and fails)."""
    try:
        return "ok", call()
    except (ValueError, TypeError) as e:
        return "error", e


def assert_valid_gives(call, expected, equal=None):
    kind, got = outcome(call)
    assert kind == "ok", f"valid input refused: {got!r}"
    if equal is not None:
        equal(got, expected)
        return
    assert_same(got, expected)


def assert_refused(call):
    kind, got = outcome(call)
    assert kind == "error", f"invalid input accepted, returned {got!r}"
    assert str(got), "an error must say what is wrong"


def byte_mask(seed: int, shape, weird: bool, density: float = 0.5) -> torch.Tensor:
    """A bool tensor of `shape` whose true bytes are 1, or (weird) any of 1, 2, 7, 255."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) < density
    if not weird:
        return keep
    values = torch.tensor([1, 2, 7, 255], dtype=torch.uint8)[torch.randint(4, shape, generator=g)]
    return (keep.to(torch.uint8) * values).view(torch.bool)


def clean(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) != 0


# ---------------------------------------------------------------------- BSR validity, in plain Python


def bsr_problem(crow, col, nnz_values, br, bc, index_dtypes=(torch.int64,)):
    """None when (crow, col) is a valid BSR structure of br x bc blocks for nnz_values blocks, else why not."""
    for t in (crow, col):
        if t.dtype not in index_dtypes or t.dim() != 1:
            return "dtype/dim"
    c, k = crow.tolist(), col.tolist()
    if len(c) != br + 1 or len(k) != nnz_values:
        return "length"
    if c[0] != 0 or c[-1] != len(k) or any(b < a for a, b in zip(c, c[1:])):
        return "row pointer"
    if any(not 0 <= v < bc for v in k):
        return "column range"
    for r in range(br):
        row = k[c[r] : c[r + 1]]
        if len(set(row)) != len(row):
            return "duplicate"
    return None


@st.composite
def bsr_cases(draw, mutation, block_sizes=(1, 2, 4), max_grid=5):
    """(crow, col, values, (rows, cols), mutation): a random valid triple, then `mutation` (MUTATIONS) applied."""
    bh, bw = draw(st.sampled_from(block_sizes)), draw(st.sampled_from(block_sizes))
    br, bc = draw(st.integers(1, max_grid)), draw(st.integers(1, max_grid))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(br, bc, generator=g) < draw(st.floats(0.2, 1.0))
    crow = torch.zeros(br + 1, dtype=torch.int64)
    crow[1:] = keep.sum(1).cumsum(0)
    col = keep.nonzero()[:, 1].contiguous()
    values = torch.randn(col.numel(), bh, bw, generator=g)
    shape = [br * bh, bc * bw]
    nnz = col.numel()
    if mutation == "crow_entry":
        i = draw(st.integers(0, br))
        crow[i] += draw(st.sampled_from([-2, -1, 1, 2, 10**8, -(10**8)]))
    elif mutation == "crow_last":
        crow[-1] += 1
    elif mutation == "col_entry" and nnz:
        col[draw(st.integers(0, nnz - 1))] = draw(st.sampled_from([-3, -1, bc, bc + 1, 10**8, -(10**8), 2**62]))
    elif mutation == "col_duplicate" and nnz > 1:
        rows_of = torch.repeat_interleave(torch.arange(br), crow.diff())
        shared = (rows_of[1:] == rows_of[:-1]).nonzero()
        # Prefer two blocks of one row (a duplicate); else any neighbours (which may stay valid).
        i = int(shared[draw(st.integers(0, len(shared) - 1))]) + 1 if len(shared) else draw(st.integers(1, nnz - 1))
        col[i] = col[i - 1]
    elif mutation == "col_swap_rows" and nnz > 1:
        col = col.flip(0).contiguous()  # columns reordered: valid when no row gets one twice
    elif mutation == "crow_short":
        crow = crow[:-1]
    elif mutation == "col_short" and nnz:
        col = col[:-1]
    elif mutation == "crow_int32":
        crow = crow.int()
    elif mutation == "col_float":
        col = col.float()
    elif mutation == "values_shape":
        values = values[:, :, :-1] if bw > 1 else values[:-1] if nnz else torch.zeros(1, bh, bw)
    elif mutation == "shape_huge":
        shape[draw(st.integers(0, 1))] = draw(st.sampled_from(HUGE))
    elif mutation == "shape_float":
        shape[draw(st.integers(0, 1))] = float(shape[0]) + draw(st.sampled_from([0.0, 0.5]))
    elif mutation == "shape_indivisible":
        shape[1] += 1 if bw > 1 else 0
    return crow, col, values, tuple(shape), mutation


def bsr_case_problem(crow, col, values, shape, index_dtypes=(torch.int64,)):
    rows, cols = shape
    if not all(isinstance(v, int) for v in shape):
        return "shape type"
    if values.dim() != 3:
        return "values"
    _, bh, bw = values.shape
    if rows < 0 or cols < 0 or rows % bh or cols % bw:
        return "shape"
    if cols // bw >= 2**36:
        return "W^T's row pointer does not fit in memory"  # valid as a structure, refused as a size
    return bsr_problem(crow, col, values.shape[0], rows // bh, cols // bw, index_dtypes)


# ---------------------------------------------------------------------- the C++ compaction ops


@pytest.mark.parametrize("weird", [False, True])
@pytest.mark.parametrize("form", ["bool", "transposed", "float", "uint8", "1d", "3d"])
@fuzz(6)
@given(rows=st.integers(0, 40), n=st.sampled_from([0, 1, 7, 31, 33, 257, 2049]), seed=st.integers(0, 2**31), threads=THREADS)
def test_keep_indices(rows, n, weird, form, seed, threads):
    mask = byte_mask(seed, (rows, n), weird)
    if form == "transposed":
        mask = byte_mask(seed, (n, rows), weird).t()
    elif form == "float":
        mask = clean(mask).float()
    elif form == "uint8":
        mask = mask.view(torch.uint8)
    elif form == "1d":
        mask = mask.reshape(-1)
    elif form == "3d":
        mask = mask[None]
    with intra_op_threads(threads):
        if form in ("bool", "transposed"):
            assert_valid_gives(lambda: ops.keep_indices(mask), keep_indices_ref(clean(mask)))
        else:
            assert_refused(lambda: ops.keep_indices(mask))


@pytest.mark.parametrize("weird", [False, True])
@pytest.mark.parametrize("level", ["block", "element", "wrong"])
@fuzz(8)
@given(
    br=st.integers(0, 12),
    bc=st.integers(0, 12),
    block=st.tuples(st.sampled_from([1, 2, 4, 8, 0, -2]), st.sampled_from([1, 4, 16, 0])),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32]),
    seed=st.integers(0, 2**31),
    threads=THREADS,
)
def test_dense_to_bsr(br, bc, block, level, dtype, weird, seed, threads):
    bh, bw = block
    rows, cols = br * max(bh, 1), bc * max(bw, 1)
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=g) + 3).to(dtype)
    if level == "element":
        mask = byte_mask(seed, (rows, cols), weird)
    elif level == "block":
        mask = byte_mask(seed, (br, bc), weird)
    else:
        mask = byte_mask(seed, (rows + 1, cols + 1), weird)  # neither element- nor block-level
    valid = dtype.is_floating_point and bh > 0 and bw > 0 and level != "wrong"
    with intra_op_threads(threads):
        if not valid:
            assert_refused(lambda: ops.dense_to_bsr(weight, mask, (bh, bw)))
            return
        m = clean(mask)
        if level == "element":
            block_keep = masks.reduce_block_mask(m, (bh, bw), strict=False)
            expected = dense_to_bsr_ref(weight.masked_fill(~m, 0), block_keep, bh, bw)
        else:
            expected = dense_to_bsr_ref(weight, m, bh, bw)
        assert_valid_gives(lambda: ops.dense_to_bsr(weight, mask, (bh, bw)), expected)


@pytest.mark.parametrize("mutation", MUTATIONS)
@fuzz(6)
@given(data=st.data(), threads=THREADS, large=st.booleans())
def test_bsr_transpose(mutation, data, threads, large):
    crow, col, values, shape, _ = data.draw(bsr_cases(mutation))
    if large and values.shape[1:] == (1, 1) and bsr_case_problem(crow, col, values, shape) is None:
        # Enough blocks for the parallel copy to split across threads.
        values = values.expand(-1, 64, 64).contiguous()
        shape = (shape[0] * 64, shape[1] * 64)
    problem = bsr_case_problem(crow, col, values, shape)
    with intra_op_threads(threads):
        if problem is None:
            expected = bsr_transpose_ref(crow, col, values, shape)
            assert_valid_gives(lambda: ops.bsr_transpose(crow, col, values, shape), expected)
            assert_valid_gives(lambda: torch.ops.lotus_kernels.bsr_transpose(crow, col, values, *shape), expected)
        else:
            assert_refused(lambda: ops.bsr_transpose(crow, col, values, shape))
            if all(isinstance(v, int) and -(2**63) <= v < 2**63 for v in shape):
                # The C++ op on its own (no Python checks in front of it).
                assert_refused(lambda: torch.ops.lotus_kernels.bsr_transpose(crow, col, values, *shape))


@pytest.mark.parametrize("with_mask,weird", [(False, False), (True, False), (True, True)])
@fuzz(12)
@given(
    rows=st.integers(0, 70),
    groups=st.sampled_from([0, 1, 7, 8, 9, 40, 512]),
    kept=st.sampled_from([(0, 2), (0, 1, 2), (2, 2), (3, 3), (0, 4)]),
    seed=st.integers(0, 2**31),
    threads=THREADS,
)
def test_compress_2to4(rows, groups, kept, with_mask, weird, seed, threads):
    g = torch.Generator().manual_seed(seed)
    per_group = torch.tensor(kept)[torch.randint(len(kept), (rows, groups), generator=g)]
    keep = torch.rand(rows, groups, 4, generator=g).argsort(-1) < per_group[..., None]
    weight = (torch.randn(rows, groups, 4, generator=g) + 3).reshape(rows, 4 * groups)
    keep = keep.reshape(rows, 4 * groups)
    if with_mask:
        mask = keep if not weird else (keep.to(torch.uint8) * 5).view(torch.bool)
    else:
        mask, weight = None, weight * keep
    too_many = bool((keep.reshape(rows, groups, 4).sum(-1) > 2).any())
    with intra_op_threads(threads):
        if too_many:
            assert_refused(lambda: ops.compress_2to4(weight, mask))
        else:
            assert_valid_gives(lambda: ops.compress_2to4(weight, mask), compress_2to4_ref(weight, mask))


@fuzz(30)
@given(
    rows=st.integers(0, 70),
    cols=st.sampled_from([4, 28, 32, 36, 160]),
    corrupt=st.lists(st.tuples(st.integers(0, 2**31), st.integers(-(2**31), 2**31 - 1)), max_size=3),
    threads=THREADS,
)
def test_decompress_2to4(rows, cols, corrupt, threads):
    weight = torch.randn(rows, cols)
    values, metadata = compress_2to4_ref(weight, masks.nm_mask(weight) if rows else torch.zeros(0, cols, dtype=torch.bool))
    for where, word in corrupt:
        if metadata.numel():
            metadata.view(-1)[where % metadata.numel()] = word
    kind, expected = outcome(lambda: decompress_2to4_ref(values, metadata))
    with intra_op_threads(threads):
        if kind == "ok":
            assert_valid_gives(lambda: ops.decompress_2to4(values, metadata), expected)
        else:
            assert_refused(lambda: ops.decompress_2to4(values, metadata))


# ---------------------------------------------------------------------- kernel ops


def close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("structure_kind", ["none", "own", "of_valid", "field"])
@pytest.mark.parametrize("mutation", [m for m in MUTATIONS if m not in ("shape_huge", "shape_float", "values_shape")])
@fuzz(2)
@given(
    data=st.data(),
    field=st.sampled_from(["row_order", "crow_t", "col_t", "source_t", "row_order_t", "block_row"]),
    m=st.sampled_from([1, 3]),
    threads=THREADS,
)
def test_block_sparse_matmul(mutation, structure_kind, data, field, m, threads):
    # The matmul takes out_features and x rather than a shape, and checks block sizes apart.
    crow, col, values, shape, _ = data.draw(bsr_cases(mutation, block_sizes=(16,), max_grid=3))
    out_features, in_features = shape
    x = torch.randn(m, in_features, device=DEVICE)
    crow, col, values = crow.to(DEVICE), col.to(DEVICE), values.to(DEVICE)
    problem = bsr_case_problem(crow, col, values, shape, index_dtypes=(torch.int32, torch.int64))
    structure = None
    if structure_kind == "own" and problem is None:
        structure = ops.block_sparse_structure(crow, col, out_features, in_features, (16, 16))
    elif structure_kind in ("of_valid", "field") and values.shape[0] >= 1:
        # A structure that does not belong to this triple: of another triple, or one field changed.
        br, bc = out_features // 16, max(in_features // 16, 1)
        ok_crow = torch.arange(br + 1, device=DEVICE).clamp_max(values.shape[0])
        ok_crow[-1] = values.shape[0]
        ok_col = torch.zeros(values.shape[0], dtype=torch.int64, device=DEVICE)
        ok_col[ok_crow[-2]:] = torch.arange(values.shape[0] - int(ok_crow[-2]), device=DEVICE) % bc
        if bsr_problem(ok_crow, ok_col, values.shape[0], br, bc) is None:
            structure = ops.block_sparse_structure(ok_crow, ok_col, out_features, bc * 16, (16, 16))
            if structure_kind == "field":
                t = getattr(structure, field)
                structure = structure._replace(**{field: (t.flip(0) + 1) if t.numel() else t + 1})
    matches = structure is None or (
        problem is None
        and all(
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            for a, b in zip(structure, ops.block_sparse_structure(crow, col, out_features, in_features, (16, 16)))
        )
    )
    kwargs = {} if structure is None else {"structure": structure}
    with intra_op_threads(threads):
        if problem is None and matches:
            expected = block_sparse_matmul_ref(x, crow, col, values, out_features)
            assert_valid_gives(lambda: ops.block_sparse_matmul(x, values, crow, col, out_features, **kwargs), expected, close)
        else:
            assert_refused(lambda: ops.block_sparse_matmul(x, values, crow, col, out_features, **kwargs))


@fuzz(20)
@given(
    corrupt=st.lists(st.tuples(st.integers(0, 2**31), st.integers(-(2**31), 2**31 - 1)), max_size=2),
    m=st.sampled_from([1, 5]),
    threads=THREADS,
)
def test_semi_structured_matmul(corrupt, m, threads):
    w = torch.randn(32, 64)
    values, metadata = ops.compress_2to4(w, masks.nm_mask(w))
    for where, word in corrupt:
        metadata.view(-1)[where % metadata.numel()] = word
    x = torch.randn(m, 64)
    kind, expected = outcome(lambda: semi_structured_matmul_ref(x, values, metadata))
    x, values, metadata = x.to(DEVICE), values.to(DEVICE), metadata.to(DEVICE)
    with intra_op_threads(threads):
        if kind == "ok":
            assert_valid_gives(lambda: ops.semi_structured_matmul(x, values, metadata), expected.to(DEVICE), close)
        else:
            assert_refused(lambda: ops.semi_structured_matmul(x, values, metadata))


def keep_idx_problem(rows, n, num_prefix):
    """None when keep_idx rows (lists) are valid for N = n tokens (ops.patch_drop_attention's rules), else why."""
    k = len(rows[0])
    p = min(num_prefix, k)
    for row in rows:
        if any(v < -1 or v >= n for v in row):
            return "range"
        count = sum(v >= 0 for v in row)
        if any(v < 0 for v in row[:count]):
            return "padding"
        if row[:p] != list(range(p)) or count < max(1, p):
            return "prefix"
        kept = row[:count]
        if len(set(kept)) != len(kept):
            return "duplicate"
    return None


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("mess", ["none", "random"])
@fuzz(8)
@given(b=st.integers(1, 3), n=st.integers(2, 9), k=st.integers(1, 9), num_prefix=st.integers(0, 2), seed=st.integers(0, 2**31))
def test_patch_drop_attention(b, n, k, num_prefix, backend, seed, mess):
    k = min(k, n)
    num_prefix = min(num_prefix, n)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        patches = (torch.randperm(n - num_prefix, generator=g) + num_prefix).tolist()
        row = list(range(num_prefix)) + patches
        count = int(torch.randint(max(1, min(num_prefix, k)), k + 1, (1,), generator=g))
        row = row[:count] + [-1] * (k - count)
        if mess == "random":
            i = int(torch.randint(k, (1,), generator=g))
            row[i] = int(torch.randint(-3, n + 2, (1,), generator=g))
        rows.append(row)
    keep_idx = torch.tensor(rows, dtype=torch.int32)
    qkv = torch.randn(b, n, 3 * 2 * 16, generator=g)
    problem = keep_idx_problem(rows, n, num_prefix)
    call = lambda: ops.patch_drop_attention(qkv.to(DEVICE), keep_idx.to(DEVICE), 2, num_prefix_tokens=num_prefix, backend=backend)  # noqa: E731
    if problem is None:
        assert_valid_gives(call, patch_drop_attention_ref(qkv, keep_idx, 2, num_prefix_tokens=num_prefix).to(DEVICE), close)
    else:
        assert_refused(call)


# ---------------------------------------------------------------------- SparseLinear state_dicts


def _index_names(pattern):
    return {"block": ("crow_indices", "col_indices"), "2:4": ("metadata",), "unstructured": ("packed_mask",)}[pattern]


@st.composite
def corrupted_states(draw, pattern, mutation):
    seed = draw(st.integers(0, 2**31))
    torch.manual_seed(seed)
    source = SparseLinear.from_dense(torch.nn.Linear(64, 32), pattern, sparsity=None if pattern == "2:4" else draw(st.floats(0, 0.9)), block_size=16)
    state = dict(source.state_dict())
    names = ["values", *_index_names(pattern), "bias"]
    name = draw(st.sampled_from(names))
    t = state[name]
    if mutation == "drop":
        del state[name]
    elif mutation == "dtype":
        state[name] = t.to(draw(st.sampled_from([torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8])))
    elif mutation == "truncate" and t.numel():
        state[name] = t.reshape(-1)[:-1] if t.dim() == 1 else t[:-1]
    elif mutation == "entry" and t.numel():
        t = t.clone()
        flat = t.view(-1)
        i = draw(st.integers(0, flat.numel() - 1))
        if t.is_floating_point():
            flat[i] = draw(st.sampled_from([float("nan"), 1e30, -0.0]))
        elif t.dtype == torch.uint8:
            flat[i] = draw(st.integers(0, 255))
        elif t.dtype == torch.int32:
            flat[i] = draw(st.integers(-(2**31), 2**31 - 1))
        else:
            flat[i] = draw(st.sampled_from([-3, -1, 0, 1, 2, 3, 10**8, 2**62]))
        state[name] = t
    elif mutation == "list":
        state[name] = t.tolist()
    elif mutation == "meta":
        state[name] = t.to("meta")
    return pattern, state, (name, mutation)


def state_is_loadable(pattern, state, strict):
    """The dense weight a SparseLinear(64, 32, pattern) holds after loading ``state``, or None when it must refuse it.

    Plain-Python rules: all of the layout's keys or none (the test drops at most
    one, so: all); each a dense tensor of the layout's index dtype (floating
    for values and bias) and shape; a valid layout. A missing bias is torch's
    business (strict=True raises after loading the rest, as for any module).
    """
    names = ["values", *_index_names(pattern)]
    if any(n not in state for n in names):
        return None
    tensors = {n: state[n] for n in [*names, "bias"] if n in state}
    if not all(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in tensors.values()):
        return None
    want = {"crow_indices": torch.int64, "col_indices": torch.int64, "metadata": torch.int32, "packed_mask": torch.uint8}
    for n, t in tensors.items():
        if (n in want and t.dtype != want[n]) or (n not in want and not t.is_floating_point()):
            return None
    if "bias" in tensors and tensors["bias"].shape != (32,):
        return None
    values = tensors["values"]
    if pattern == "block":
        if values.dim() != 3 or values.shape[1:] != (16, 16):
            return None
        if bsr_problem(tensors["crow_indices"], tensors["col_indices"], values.shape[0], 2, 4) is not None:
            return None
        dense = torch.zeros(2, 4, 16, 16)
        crow = tensors["crow_indices"].tolist()
        for r in range(2):
            for b in range(crow[r], crow[r + 1]):
                dense[r, int(tensors["col_indices"][b])] = values[b].float()
        return dense.transpose(1, 2).reshape(32, 64)
    if pattern == "2:4":
        metadata = tensors["metadata"]
        if metadata.shape != (32, 2) or values.shape != (32, 32):
            return None
        kind, dense = outcome(lambda: decompress_2to4_ref(values.float(), metadata))
        return dense if kind == "ok" else None
    packed = tensors["packed_mask"]
    if packed.shape != (32, 8):
        return None
    keep = ((packed[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).bool().reshape(32, 64)
    if values.shape != (int(keep.sum()),):
        return None
    return torch.zeros(32, 64).masked_scatter(keep, values.float())


@pytest.mark.parametrize("mutation", ["none", "drop", "dtype", "truncate", "entry", "list", "meta"])
@pytest.mark.parametrize("pattern", ["block", "2:4", "unstructured"])
@fuzz(4)
@given(data=st.data(), strict=st.booleans(), threads=THREADS)
def test_sparse_linear_load_state_dict(pattern, mutation, data, strict, threads):
    case = data.draw(corrupted_states(pattern, mutation))
    _, state, _ = case
    backend = "triton" if pattern != "unstructured" else "reference"
    torch.manual_seed(1)
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 32), pattern, sparsity=None if pattern == "2:4" else 0.5, block_size=16, backend=backend)
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(3, 64)
    y_before = layer(x)
    expected_weight = state_is_loadable(pattern, state, strict)
    with intra_op_threads(threads):
        try:
            layer.load_state_dict(state, strict=strict)
            loaded = True
        except RuntimeError as e:
            assert "Error(s) in loading state_dict" in str(e), e
            loaded = False
        if expected_weight is None:
            assert not loaded, f"an unloadable state loaded ({case[2]})"
            after = layer.state_dict()
            for key, t in before.items():
                if isinstance(t, torch.Tensor):
                    assert after[key].shape == t.shape and torch.equal(after[key], t), key
            assert torch.equal(layer(x), y_before)
            return
        # The one key whose absence torch itself reports after loading the rest: strict=True and no bias.
        assert loaded or (strict and "bias" not in state), f"a loadable state was refused ({case[2]})"
        torch.testing.assert_close(layer.to_dense(), expected_weight.to(layer.values.dtype), equal_nan=True)
        bias = state["bias"] if "bias" in state else before["bias"]
        torch.testing.assert_close(layer.bias.detach(), bias.to(layer.bias.dtype), rtol=0, atol=0, equal_nan=True)
        y = layer(x)
        if bool(torch.isfinite(expected_weight).all()):
            close(y, F.linear(x, expected_weight, layer.bias.detach()))
