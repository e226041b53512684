"""The storage layouts of sparse weights and kept tokens, in pure PyTorch: their checks, conversions and ``*_ref``s.

BSR (crow/col/values, its transpose structure), 2:4 (values + metadata:
eight 4-bit group codes per int32 word), packed bit masks and keep indices,
exactly as ``csrc/mask_compaction.h`` defines them. Two roles:
- the ``*_ref`` of each compaction op (``ops.mask_compaction``): any device,
  differentiable where that makes sense, compared with the extension by exact
  equality in the tests;
- production code that needs no kernel: the structure checks every op runs
  before its kernel trusts an index (``check_bsr_structure``,
  ``check_2to4_metadata``), the transposed BSR structure the backward walks,
  and the dense weight the "dense"/"reference" backends rebuild
  (``dense_weight_ref``).
"""

from __future__ import annotations

import torch

GROUPS_PER_META_WORD = 8  # 2:4 metadata: eight 4-bit group codes per int32 word


def normalized_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask whose every byte is 0 or 1: any nonzero byte of ``mask`` is true.

    Torch ops assume bool bytes are 0/1; a uint8 tensor viewed as bool (bytes
    2, 255) gives them undefined results (``~mask`` stays true, sums count 2).
    The C++ ops read masks as bytes the same way, so references and
    Python-side mask work pass masks through this first.
    """
    return mask.view(torch.uint8) != 0


def keep_indices_ref(keep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep_mask [B, N] bool -> (indices [B, N] int32, counts [B] int32).

    Row b's first counts[b] indices are its kept positions in ascending order;
    the rest are -1.
    """
    keep_mask = normalized_mask(keep_mask)
    rows, n = keep_mask.shape
    counts = keep_mask.sum(1)
    # A stable sort on "dropped" puts kept positions first, still ascending.
    order = torch.sort((~keep_mask).to(torch.uint8), dim=1, stable=True).indices
    position = torch.arange(n, device=keep_mask.device).expand(rows, n)
    indices = torch.where(position < counts[:, None], order, -1)
    return indices.to(torch.int32), counts.to(torch.int32)


def dense_to_bsr_ref(
    weight: torch.Tensor, block_mask: torch.Tensor, block_rows: int, block_cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [R, C], block_mask [R/bh, C/bw] bool -> (crow [R/bh+1], col [nnz], values [nnz, bh, bw]).

    Kept blocks are copied verbatim (pass the masked weight); indices are int64.
    """
    block_mask = normalized_mask(block_mask)
    rows, cols = weight.shape
    br, bc = rows // block_rows, cols // block_cols
    blocks = weight.reshape(br, block_rows, bc, block_cols).transpose(1, 2)  # [br, bc, bh, bw]
    block_row, block_col = block_mask.nonzero(as_tuple=True)  # row-major order
    crow = torch.zeros(br + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = block_mask.sum(1).cumsum(0)
    return crow, block_col, blocks[block_row, block_col].contiguous()


def bsr_row_indices(crow_indices: torch.Tensor, nnz: int) -> torch.Tensor:
    """Block row of every stored block: [nnz] int64 (the inverse of the row pointer)."""
    block_rows = torch.arange(crow_indices.numel() - 1, device=crow_indices.device)
    return torch.repeat_interleave(block_rows, crow_indices.diff(), output_size=nnz)


def check_bsr_structure(
    crow_indices: torch.Tensor, col_indices: torch.Tensor, block_rows: int, block_cols: int, *, op: str, cols_hint: str = ""
) -> None:
    """Raises unless (crow_indices, col_indices) is a valid BSR structure of block_rows x block_cols blocks.

    Valid (csrc/mask_compaction.h): int32/int64 1-D tensors (else TypeError),
    crow_indices [block_rows + 1] starting at 0, never decreasing, ending at
    nnz = col_indices.numel(); every column in [0, block_cols); no column
    twice in one block row (any order within a row). ValueError names what
    is wrong. A host sync: for when a structure is made, loaded or first
    used, never per call. cols_hint: what fixes block_cols, for the message.
    """
    for t, name in ((crow_indices, "crow_indices"), (col_indices, "col_indices")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if crow_indices.shape[0] != block_rows + 1:
        raise ValueError(f"{op}: crow_indices must be [{block_rows + 1}] ({block_rows} block rows), got {tuple(crow_indices.shape)}")
    crow, col = crow_indices.long(), col_indices.long()
    nnz = col.numel()
    in_range = ((col >= 0) & (col < block_cols)).all() if nnz else torch.ones((), dtype=torch.bool, device=col.device)
    crow_ok, ends_ok, monotone, cols_ok = torch.stack(
        [crow[0] == 0, crow[-1] == nnz, (crow.diff() >= 0).all(), in_range]
    ).tolist()  # one sync for the common checks
    if not (crow_ok and ends_ok and monotone):
        raise ValueError(
            f"{op}: crow_indices is not a valid BSR row pointer (must start at 0, never decrease and end at "
            f"nnz={nnz}), got {crow.tolist() if crow.numel() <= 16 else f'first {int(crow[0])}, last {int(crow[-1])}'}"
        )
    if not cols_ok:
        hint = f" ({cols_hint})" if cols_hint else ""
        raise ValueError(
            f"{op}: col_indices must lie in [0, {block_cols}){hint}, got block columns from {int(col.min())} to {int(col.max())}"
        )
    if nnz > 1:
        # Sorted by (row, column) with two stable sorts (no row * block_cols key to overflow).
        row = bsr_row_indices(crow, nnz)
        order = torch.argsort(col, stable=True)
        order = order[torch.argsort(row[order], stable=True)]
        r, c = row[order], col[order]
        dup = (r[1:] == r[:-1]) & (c[1:] == c[:-1])
        if bool(dup.any()):
            i = int(dup.nonzero()[0])
            raise ValueError(
                f"{op}: col_indices lists block column {int(c[i])} twice in block row {int(r[i])}; "
                "a BSR row holds each column at most once"
            )


def bsr_transpose_structure(
    crow_indices: torch.Tensor, col_indices: torch.Tensor, block_rows: int, block_cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Structure of W^T for a BSR W of block_rows x block_cols blocks (index work only).

    Returns (crow_t [block_cols + 1], col_t [nnz], source [nnz]) int64:
    transposed block row c lists the blocks of W's block column c, sorted by
    W's block row; source[i] is the index of that block in W's values. A
    kernel that reads values[source[i]] transposed needs no transposed copy.
    """
    nnz = col_indices.numel()
    block_row = bsr_row_indices(crow_indices, nnz)
    source = torch.argsort(col_indices * block_rows + block_row)  # keys are unique: order is deterministic
    crow_t = torch.zeros(block_cols + 1, dtype=torch.int64, device=col_indices.device)
    crow_t[1:] = torch.bincount(col_indices, minlength=block_cols).cumsum(0)
    return crow_t, block_row[source], source


def bsr_transpose_ref(
    crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BSR of W [R, C] -> BSR of W^T [C, R]: blocks [bw, bh], each transposed, column-sorted."""
    rows, cols = shape
    _, bh, bw = values.shape
    crow_t, col_t, source = bsr_transpose_structure(crow_indices, col_indices, rows // bh, cols // bw)
    return crow_t, col_t, values[source].transpose(1, 2).contiguous()


def bsr_to_dense_ref(
    crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """BSR triple -> dense [R, C]; differentiable w.r.t. ``values`` (gradient only at stored blocks)."""
    rows, cols = shape
    nnz, bh, bw = values.shape
    block_row = bsr_row_indices(crow_indices, nnz)
    dense = values.new_zeros(rows // bh, cols // bw, bh, bw)
    dense = dense.index_put((block_row, col_indices), values)
    return dense.transpose(1, 2).reshape(rows, cols)


def compress_2to4_ref(
    weight: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [R, C] (C % 4 == 0), optional keep-mask -> (values [R, C/2], metadata [R, ceil(C/32)] int32).

    Kept slots per group of 4: the mask's true entries, or the nonzero weights
    without a mask. More than two raises ValueError; fewer are padded with the
    lowest free slots, stored as +0.
    """
    rows, cols = weight.shape
    groups = cols // 4
    w = weight.reshape(rows, groups, 4)
    keep = (w != 0) if mask is None else normalized_mask(mask).reshape(rows, groups, 4)
    kept = keep.sum(-1)
    if bool((kept > 2).any()):
        r, g = (kept > 2).nonzero()[0].tolist()
        what = "nonzero weights" if mask is None else "entries in mask"
        raise ValueError(
            f"compress_2to4: row {r}, columns {4 * g}..{4 * g + 3} keep {int(kept[r, g])} {what}; "
            "2:4 allows at most 2 in every group of 4 along in_features"
        )
    slot = torch.arange(4, device=weight.device)
    # Kept slots rank first, then free slots by position; take two, ascending.
    rank = (~keep).to(torch.int64) * 4 + slot
    slots = rank.argsort(-1)[..., :2].sort(-1).values  # [R, G, 2]
    real = keep.gather(-1, slots)
    values = torch.where(real, w.gather(-1, slots), torch.zeros((), dtype=weight.dtype, device=weight.device))
    codes = slots[..., 0] | (slots[..., 1] << 2)  # [R, G]
    words = -(-groups // GROUPS_PER_META_WORD)
    codes = torch.nn.functional.pad(codes, (0, words * GROUPS_PER_META_WORD - groups))
    shifts = 4 * torch.arange(GROUPS_PER_META_WORD, device=weight.device)
    packed = (codes.reshape(rows, words, GROUPS_PER_META_WORD) << shifts).sum(-1)
    # uint32 bit pattern stored as int32 (two's complement wrap of the top bit).
    metadata = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return values.reshape(rows, cols // 2), metadata


def unpack_2to4_slots(metadata: torch.Tensor, cols: int) -> torch.Tensor:
    """metadata [R, ceil(C/32)] int32 -> kept slots [R, C/4, 2] int64 (0..3, ascending per group)."""
    rows, words_per_row = metadata.shape
    groups = cols // 4
    shifts = 4 * torch.arange(GROUPS_PER_META_WORD, device=metadata.device)
    words = metadata.to(torch.int64) & 0xFFFFFFFF
    # The width is spelled out: reshape(rows, -1) is ambiguous for 0 rows.
    codes = ((words[..., None] >> shifts) & 0xF).reshape(rows, words_per_row * GROUPS_PER_META_WORD)[:, :groups]
    return torch.stack([codes & 3, codes >> 2], dim=-1)


def check_2to4_metadata(metadata: torch.Tensor, cols: int, *, op: str = "decompress_2to4") -> None:
    """Raises ValueError naming the first group whose code is not two ascending slots (one host sync)."""
    slots = unpack_2to4_slots(metadata, cols)
    bad = slots[..., 0] >= slots[..., 1]
    if bool(bad.any()):
        r, g = bad.nonzero()[0].tolist()
        i0, i1 = slots[r, g].tolist()
        raise ValueError(
            f"{op}: metadata row {r} group {g} codes slots ({i0}, {i1}); "
            "a valid code holds two ascending slots"
        )


def decompress_2to4_ref(values: torch.Tensor, metadata: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """values [R, C/2], metadata [R, ceil(C/32)] int32 -> weight [R, C]; differentiable w.r.t. values.

    validate=False skips the metadata check (a host sync and a data-dependent
    branch): for callers that checked the metadata once already, such as
    SparseLinear's forward, which must trace under torch.compile.
    """
    rows, half = values.shape
    cols = 2 * half
    if validate:
        check_2to4_metadata(metadata, cols)
    slots = unpack_2to4_slots(metadata, cols)
    dense = values.new_zeros(rows, cols // 4, 4)
    dense = dense.scatter(-1, slots, values.reshape(rows, cols // 4, 2))
    return dense.reshape(rows, cols)


def pack_mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [R, C] -> uint8 [R, ceil(C/8)], column j at bit j % 8 of byte j // 8."""
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -cols % 8))
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (padded.reshape(rows, -1, 8) << shifts).sum(-1, dtype=torch.uint8)


def unpack_mask_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [R, ceil(C/8)] -> bool [R, C]."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 1).bool().reshape(packed.shape[0], -1)[:, :cols]


def dense_weight_ref(
    pattern: str, values: torch.Tensor, indices: tuple[torch.Tensor, ...], shape: tuple[int, int]
) -> torch.Tensor:
    """The masked dense weight [out, in] of a stored SparseLinear layout; differentiable w.r.t. values.

    indices per pattern: "block" (crow_indices, col_indices), "2:4"
    (metadata,), "unstructured" (packed_mask,). Layouts checked when they were
    made or loaded are not checked again (no host sync: this runs under
    torch.compile and in every training step).
    """
    if pattern == "block":
        crow_indices, col_indices = indices
        return bsr_to_dense_ref(crow_indices, col_indices, values, shape)
    if pattern == "2:4":
        (metadata,) = indices
        return decompress_2to4_ref(values, metadata, validate=False)
    if pattern == "unstructured":
        (packed_mask,) = indices
        return values.new_zeros(shape).masked_scatter(unpack_mask_bits(packed_mask, shape[1]), values)
    raise ValueError(f"dense_weight_ref: pattern must be 'block', '2:4' or 'unstructured', got {pattern!r}")
