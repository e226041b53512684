"""SparseLinear, a drop-in nn.Linear that stores only its kept weights.

Storage per pattern (all of it in state_dict; the trainable tensor is the
compact ``values``, so pruned weights are not parameters at all and stay
exactly zero under any optimizer, weight decay and momentum included):

=============  =====================================  ====================================
pattern        parameters                             buffers
=============  =====================================  ====================================
"block"        values [nnz_blocks, bh, bw]            crow_indices [out/bh+1] int64,
                                                      col_indices [nnz_blocks] int64
"2:4"          values [out, in/2]                     metadata [out, ceil(in/32)] int32
"unstructured" values [nnz] (row-major kept weights)  packed_mask [out, ceil(in/8)] uint8
=============  =====================================  ====================================

Layouts are those of ``lotus_kernels.layouts`` (csrc/mask_compaction.h); the
unstructured mask is packed 8 columns per byte, column j at bit j % 8 of byte
j // 8.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

from .. import backends, ops
from .._shared import ACTIVATIONS
from ..layouts import (
    bsr_row_indices,
    check_2to4_metadata,
    compress_2to4_ref,
    dense_weight_ref,
    pack_mask_bits,
    unpack_2to4_slots,
    unpack_mask_bits,
)
from ..masks import (
    PATTERNS,
    block_mask,
    block_shape,
    check_mask,
    check_sparsity,
    check_tensor,
    expand_block_mask,
    magnitude_mask,
    nm_mask,
    reduce_block_mask,
)

__all__ = ["SparseLinear", "check_layout", "check_pattern", "PRUNABLE_LAYER_NAMES", "SUPPORTED_DTYPES", "INDEX_BUFFERS"]

# Linear layers of a transformer block that pruning targets (timm names).
PRUNABLE_LAYER_NAMES = frozenset({"qkv", "q", "k", "v", "kv", "proj", "fc1", "fc2"})
# What the compaction ops accept (see csrc/mask_compaction.cpp: check_floating).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The index buffers of each layout beside ``values`` (module docstring's table).
INDEX_BUFFERS = {"block": ("crow_indices", "col_indices"), "2:4": ("metadata",), "unstructured": ("packed_mask",)}
_STATE_VERSION = 1


def check_pattern(pattern) -> str:
    """pattern, or ValueError listing the patterns (``masks.PATTERNS``)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    return pattern


def _check_features(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_layout(pattern: str, in_features: int, out_features: int, block_size: tuple[int, int]) -> None:
    """ValueError when a [out_features, in_features] weight cannot take the pattern (2:4: in % 4; block: divisible)."""
    if pattern == "2:4" and in_features % 4:
        raise ValueError(f"pattern '2:4' needs in_features divisible by 4, got in_features={in_features}")
    if pattern == "block" and (out_features % block_size[0] or in_features % block_size[1]):
        raise ValueError(
            f"pattern 'block' needs (out_features, in_features) = ({out_features}, {in_features}) "
            f"divisible by block_size {block_size}"
        )


class SparseLinear(nn.Module):
    """y = x @ W^T + b with W [out_features, in_features] stored compactly (see module docstring).

    Build one with ``SparseLinear.from_dense(linear, pattern, ...)``. The
    constructor makes an all-zero weight of the right layout (block and
    unstructured: nothing kept; 2:4: slots 0 and 1 of every group kept, zero),
    sized later by ``load_state_dict``.

    x: [..., in_features] of the weight's dtype (or any dtype under autocast)
    -> [..., out_features]. activation "none" | "gelu" (exact GELU, applied
    after the bias; kernel backends fuse it into the matmul's epilogue).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        pattern: str = "unstructured",
        block_size=32,
        backend: str = "auto",
        activation: str = "none",
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.in_features = _check_features(in_features, "in_features")
        self.out_features = _check_features(out_features, "out_features")
        self.pattern = check_pattern(pattern)
        self.block_size = block_shape(block_size)
        check_layout(self.pattern, in_features, out_features, self.block_size)
        self.backend = backends.check_backend_name(backend)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
        factory = {"device": device, "dtype": dtype}
        index = {"device": device, "dtype": torch.int64}
        out, inp = out_features, in_features
        if pattern == "block":
            bh, bw = self.block_size
            self.values = nn.Parameter(torch.empty(0, bh, bw, **factory))
            self.register_buffer("crow_indices", torch.zeros(out // bh + 1, **index))
            self.register_buffer("col_indices", torch.zeros(0, **index))
            self._refresh_block_structure()
        elif pattern == "2:4":
            values, metadata = compress_2to4_ref(torch.zeros(out, inp, **factory))
            self.values = nn.Parameter(values)
            self.register_buffer("metadata", metadata)
        else:
            self.values = nn.Parameter(torch.empty(0, **factory))
            self.register_buffer(
                "packed_mask", torch.zeros(out, math.ceil(inp / 8), device=device, dtype=torch.uint8)
            )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out, **factory))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ build

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        pattern: str = "2:4",
        sparsity: float | None = None,
        block_size=32,
        mask: torch.Tensor | None = None,
        backend: str = "auto",
        activation: str = "none",
    ) -> "SparseLinear":
        """Prune ``linear`` and store it compactly; the bias is kept as is.

        pattern "unstructured" | "block": give ``sparsity`` (magnitude pruning,
        by |w| or block L2 norm, exact counts; see lotus_kernels.masks) or a
        ``mask``. pattern "2:4": ``sparsity`` must be None or 0.5; the mask is
        ``nm_mask(w)`` unless given, and a given mask must keep exactly 2 of
        every 4. A block mask must be constant on every block.
        mask: bool [out_features, in_features], True = keep.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        check_pattern(pattern)
        weight = check_tensor(linear.weight.detach(), "linear.weight", dim=2)
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            pattern=pattern,
            block_size=block_size,
            backend=backend,
            activation=activation,
            device=weight.device,
            dtype=weight.dtype,
        )
        module.set_weight_(weight, module._resolve_mask(weight, sparsity, mask))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def _resolve_mask(self, weight: torch.Tensor, sparsity, mask) -> torch.Tensor:
        if self.pattern == "2:4":
            if sparsity is not None and check_sparsity(sparsity) != 0.5:
                raise ValueError(f"pattern '2:4' has sparsity 0.5, got sparsity={sparsity!r}")
            if mask is None:
                return nm_mask(weight, 2, 4)
            mask = check_mask(mask, weight)
            kept = mask.reshape(mask.shape[0], -1, 4).sum(-1)
            if bool((kept != 2).any()):
                r, g = (kept != 2).nonzero()[0].tolist()
                raise ValueError(
                    f"mask must keep exactly 2 of every 4 for pattern '2:4'; row {r}, columns "
                    f"{4 * g}..{4 * g + 3} keep {int(kept[r, g])} (use pattern 'unstructured' for other masks)"
                )
            return mask
        if (sparsity is None) == (mask is None):
            raise ValueError(f"pattern {self.pattern!r} needs exactly one of sparsity or mask")
        if mask is not None:
            mask = check_mask(mask, weight)
            if self.pattern == "block":
                reduce_block_mask(mask, self.block_size, strict=True)  # raises if not block-structured
            return mask
        if self.pattern == "block":
            return block_mask(weight, sparsity, self.block_size)
        return magnitude_mask(weight, sparsity)

    @torch.no_grad()
    def set_weight_(self, weight: torch.Tensor, mask: torch.Tensor) -> "SparseLinear":
        """Replace the stored weight by ``weight * mask`` (weight [out, in], mask bool [out, in]).

        The mask must fit the pattern (see from_dense). Creates new
        parameters: build optimizers after calling this.
        """
        check_tensor(weight, "weight", dim=2)
        mask = check_mask(mask, weight)
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"weight must have shape {(self.out_features, self.in_features)}, got {tuple(weight.shape)}"
            )
        weight = weight.to(self.values.dtype)
        if self.pattern == "block":
            crow, col, values = ops.dense_to_bsr(weight, mask, self.block_size)
            structure = ops.block_sparse_structure(crow, col, self.out_features, self.in_features, self.block_size)
            self.crow_indices, self.col_indices = crow, col
            self._set_block_structure(structure)
        elif self.pattern == "2:4":
            values, self.metadata = ops.compress_2to4(weight, mask)
        else:
            values = weight.masked_select(mask)
            self.packed_mask = pack_mask_bits(mask)
        self.values = nn.Parameter(values)
        return self

    # ----------------------------------------------------------------- views

    def to_dense(self) -> torch.Tensor:
        """The masked dense weight [out, in]; differentiable w.r.t. ``values``."""
        return dense_weight_ref(self.pattern, self.values, self.index_tensors(), (self.out_features, self.in_features))

    def index_tensors(self) -> tuple[torch.Tensor, ...]:
        """The layout's index buffers: (crow_indices, col_indices), (metadata,) or (packed_mask,)."""
        return tuple(getattr(self, n) for n in INDEX_BUFFERS[self.pattern])

    def mask(self) -> torch.Tensor:
        """The keep-mask bool [out, in] (for 2:4: the coded slots)."""
        if self.pattern == "block":
            bh, bw = self.block_size
            keep = torch.zeros(
                self.out_features // bh, self.in_features // bw, dtype=torch.bool, device=self.values.device
            )
            keep[bsr_row_indices(self.crow_indices, self.col_indices.numel()), self.col_indices] = True
            return expand_block_mask(keep, self.block_size)
        if self.pattern == "2:4":
            slots = unpack_2to4_slots(self.metadata, self.in_features)
            keep = torch.zeros(self.out_features, self.in_features // 4, 4, dtype=torch.bool, device=slots.device)
            return keep.scatter(-1, slots, True).reshape(self.out_features, self.in_features)
        return unpack_mask_bits(self.packed_mask, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The masked dense weight [out_features, in_features], for code written against nn.Linear
        (timm's EVA and BEiT attention call ``F.linear(x, self.qkv.weight, bias)`` themselves).

        A copy, made on every access: writing to it changes nothing (there is
        no setter; change the layer with ``set_weight_``). Differentiable
        w.r.t. ``values``, so such code still trains the kept weights; it runs
        at dense speed, since the caller does the matmul.
        """
        return self.to_dense()

    @property
    def density(self) -> float:
        """Fraction of the weight's entries that are stored (kept)."""
        return self.values.numel() / (self.out_features * self.in_features)

    def compact_nbytes(self) -> int:
        """Bytes of the stored weight: values plus index structures (bias excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.values, *self.index_tensors()))

    def dense_nbytes(self) -> int:
        """Bytes the same weight takes as a dense nn.Linear (bias excluded)."""
        return self.out_features * self.in_features * self.values.element_size()

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.pattern == "block" else ""
        activation = f", activation={self.activation!r}" if self.activation != "none" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pattern={self.pattern!r}{block}, density={self.density:.3f}, backend={self.backend!r}{activation}"
        )

    # --------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SparseLinear: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"SparseLinear: input must have last dim in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        if x.device != self.values.device:
            raise ValueError(f"SparseLinear: input is on {x.device} but the weight is on {self.values.device}")
        if x.dtype != self.values.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"SparseLinear: input dtype {x.dtype} does not match weight dtype {self.values.dtype} "
                "(cast the input or the module, or use torch.autocast)"
            )
        return backends.select_for(self, x, self.spec(x)).forward(self, x)

    def spec(self, x: torch.Tensor | None = None) -> backends.LayerSpec:
        """What a backend needs to know to say whether it can run this layer (on x's device and dtype)."""
        like = self.values if x is None else x
        dtype = like.dtype
        if x is not None and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        return backends.LayerSpec(
            self.pattern, like.device, dtype, self.block_size if self.pattern == "block" else None,
            (self.out_features, self.in_features),
        )

    def block_structure(self) -> ops.BlockSparseStructure:
        """Block pattern: the index structure the kernel backends walk besides the BSR triple.

        Derived from (crow_indices, col_indices); kept as non-persistent
        buffers (they follow .to(device)), rebuilt whenever the structure
        changes (set_weight_, load_state_dict), never per call.
        """
        if self.pattern != "block":
            raise ValueError(f"block_structure is for pattern 'block', this layer is {self.pattern!r}")
        return ops.BlockSparseStructure(*(getattr(self, f"_bs_{name}") for name in ops.BlockSparseStructure._fields))

    def _refresh_block_structure(self) -> None:
        self._set_block_structure(
            ops.block_sparse_structure(self.crow_indices, self.col_indices, self.out_features, self.in_features, self.block_size)
        )

    def _set_block_structure(self, structure: ops.BlockSparseStructure) -> None:
        for name, tensor in structure._asdict().items():
            self.register_buffer(f"_bs_{name}", tensor, persistent=False)

    # ------------------------------------------------------------ state_dict

    def get_extra_state(self):
        return {
            "version": _STATE_VERSION,
            "pattern": self.pattern,
            "block_size": self.block_size,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "activation": self.activation,
        }

    def set_extra_state(self, state) -> None:
        # Layout compatibility was checked in _load_from_state_dict, before any
        # tensor was resized or copied; nothing else to restore.
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # All or nothing: every saved tensor of the layout is checked (keys, types, dtypes,
        # shapes, index values) before anything is resized or copied. A layer that loaded
        # half a layout (new values and col_indices over old crow_indices) read out of
        # bounds on its next forward. An incomplete layout is refused even with
        # strict=False: missing metadata would leave the old codes under new values.
        problem, structure = self._check_saved_state(state_dict, prefix)
        if problem:
            error_msgs.append(f"{prefix or 'SparseLinear'}: {problem}")
            return
        # The compact tensors' sizes depend on the mask (nnz), so a fresh module
        # adopts the saved sizes instead of reporting a size mismatch.
        for name in ("values", "col_indices"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name, None)
            if saved is None or current is None or saved.shape == current.shape:
                continue
            fresh = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
            if isinstance(current, nn.Parameter):
                setattr(self, name, nn.Parameter(fresh, requires_grad=current.requires_grad))
            else:
                setattr(self, name, fresh)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if structure is not None:
            # Built from the checked saved triple before anything changed (it cannot fail here).
            self._set_block_structure(structure)

    def _check_saved_state(self, state_dict, prefix) -> tuple[str | None, ops.BlockSparseStructure | None]:
        """(problem, block structure to install): problem is None when the saved layer loads cleanly.

        The structure is that of the saved block triple (None for other
        patterns, or when the state holds no layout for this layer). What is
        all or nothing is the layout (values and its index buffers, which only
        make sense together). torch passes strict=True to every module here
        whatever the caller asked, and reports missing or unexpected keys
        (a missing bias) only after loading the rest, as for any module.
        """
        saved = state_dict.get(prefix + "_extra_state")
        if isinstance(saved, Mapping):
            mine = self.get_extra_state()
            keys = ("pattern", "in_features", "out_features", "activation") + (("block_size",) if self.pattern == "block" else ())
            theirs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in {"activation": "none", **saved}.items()}
            diff = [f"{k} saved {theirs.get(k)!r} vs module {mine[k]!r}" for k in keys if theirs.get(k) != mine[k]]
            if diff:
                return "the saved layer does not match this module: " + ", ".join(diff), None
        layout = ("values", *INDEX_BUFFERS[self.pattern])
        present = [name for name in layout if prefix + name in state_dict]
        missing = [name for name in layout if name not in present]
        if present and missing:
            return (
                f"the saved {self.pattern!r} layout is incomplete: it has {present} but not {missing}; "
                f"values and {list(INDEX_BUFFERS[self.pattern])} load together or not at all"
            ), None
        if not present:
            # The layer is not in the state (strict=False loads the rest; strict=True reports the missing keys).
            return None, None
        tensors = {name: state_dict[prefix + name] for name in layout}
        if self.bias is not None and prefix + "bias" in state_dict:
            tensors["bias"] = state_dict[prefix + "bias"]
        index_dtypes = {"crow_indices": torch.int64, "col_indices": torch.int64, "metadata": torch.int32, "packed_mask": torch.uint8}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                return f"saved {name} is a {type(t).__name__}, not a tensor", None
            if t.layout != torch.strided or t.device.type == "meta":
                return f"saved {name} must be a dense tensor with data, got layout {t.layout} on {t.device}", None
            want = index_dtypes.get(name)
            if want is not None and t.dtype != want:
                # A float col_indices passed the range check and was truncated by the copy.
                return f"saved {name} must be {want}, got {t.dtype}", None
            if want is None and not t.is_floating_point():
                # int64 values were truncated silently into the float parameter.
                return f"saved {name} must be a floating-point tensor, got {t.dtype}", None
        if "bias" in tensors and tensors["bias"].shape != self.bias.shape:
            return f"saved bias has shape {tuple(tensors['bias'].shape)}, expected {tuple(self.bias.shape)}", None
        values = tensors["values"]
        if self.pattern == "2:4":
            metadata = tensors["metadata"]
            if metadata.shape != self.metadata.shape:
                return f"saved metadata has shape {tuple(metadata.shape)}, expected {tuple(self.metadata.shape)} int32", None
            if values.shape != self.values.shape:
                return f"saved values have shape {tuple(values.shape)}, expected {tuple(self.values.shape)}", None
            try:
                check_2to4_metadata(metadata, self.in_features)
            except ValueError as e:
                return str(e), None
            return None, None
        if self.pattern == "block":
            crow, col = tensors["crow_indices"], tensors["col_indices"]
            bh, bw = self.block_size
            if values.dim() != 3 or tuple(values.shape[1:]) != (bh, bw) or col.shape != values.shape[:1]:
                return (
                    f"saved BSR triple is inconsistent with this layer's shape and block size: values "
                    f"{tuple(values.shape)} must be [nnz, {bh}, {bw}] with col_indices [nnz], got col_indices {tuple(col.shape)}"
                ), None
            device = self.crow_indices.device
            try:
                structure = ops.block_sparse_structure(crow.to(device), col.to(device), self.out_features, self.in_features, self.block_size)
            except (ValueError, TypeError) as e:
                return f"saved BSR triple is inconsistent with this layer's shape and block size: {e}", None
            return None, structure
        packed = tensors["packed_mask"]
        if packed.shape != self.packed_mask.shape:
            return f"saved packed_mask has shape {tuple(packed.shape)}, expected {tuple(self.packed_mask.shape)}", None
        kept = int(unpack_mask_bits(packed, self.in_features).sum())
        if values.shape != (kept,):
            return f"saved values hold {tuple(values.shape)} entries but the saved mask keeps {kept}", None
        return None, None
