"""Patch dropping for timm VisionTransformer models: run the blocks on the kept patch tokens only.

    enable_patch_dropping_(model, keep_ratio=0.5)                      # random patches at the input
    enable_patch_dropping_(model, 0.5, selector="given")               # data lottery tickets
    with use_tickets(model, tickets): logits = model(images)           #   tickets [B, k] patch indices
    enable_patch_dropping_(model, 0.7, drop_at=(3, 6, 9))              # EViT-style, CLS attention top-k
    disable_patch_dropping_(model)                                     # back to the plain timm model

Every block's attention becomes a ``PatchDropAttention`` that runs
``ops.patch_drop_attention`` (the fused Triton kernel on CUDA) on timm's fused
qkv projection; it adopts the original attention's submodules under the same
names, so parameters, state_dict keys and ``sparsify_`` see the same model.

Where tokens are dropped (semantics follow timm's PatchDropout: the prefix
tokens, CLS and registers, are always kept; ``ceil(keep_ratio * patches)``
patches are kept, sorted by position):
- ``drop_at="input"``: after the position embedding, by ``selector`` "random"
  (a fresh random subset per image and forward) or "given" (tickets set with
  ``use_tickets``). All blocks then run on the kept tokens.
- ``drop_at=(3, 6, 9)`` (block indices): at each of these blocks, the CLS
  row's attention over the current tokens (averaged over heads) picks the top
  ``ceil(keep_ratio * patches)`` patches (selector "cls_attention", or
  "random"); that block's attention runs on the kept tokens only, reading
  them straight out of its qkv projection (the kernel's fused gather), and the
  residual stream is gathered to them. Later stages keep a ratio of what is
  left, as EViT does. Unlike EViT the kept tokens attend to the kept tokens
  only at the dropping block, and the dropped ones are discarded, not fused.

Dropping is active in training and evaluation alike (a sparse ViT is meant to
be *run* on fewer tokens); ``keep_ratio=1.0`` keeps every token and
reproduces the timm model's output.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
from torch import nn

from .. import ops
from ..backends import ATTENTION

SELECTORS = ("cls_attention", "random", "given")
_STATE = "_lotus_patch_dropping"


# ---------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------


def num_kept(keep_ratio: float, num_patches: int) -> int:
    """Patches kept: ceil(keep_ratio * num_patches), at least one when there are any (exact integer rule)."""
    if num_patches == 0:
        return 0
    # Round the product first so that e.g. 0.7 * 10 = 7.000000000000001 keeps 7, not 8.
    return max(1, math.ceil(round(keep_ratio * num_patches, 9)))


def cls_attention(qkv: torch.Tensor, num_heads: int, scale: float, num_prefix_tokens: int = 1) -> torch.Tensor:
    """qkv [B, N, 3*H*D] -> the CLS row's attention over the N - num_prefix patches, averaged over heads [B, N - P] fp32.

    One query row (O(N * H * D) per image): the selection statistic for
    dropping at a block, computed before that block's attention so the
    dropped tokens never enter it. It is what ``ops.patch_drop_attention``
    returns with ``return_cls_attention=True``, but the kernel gives it only
    as a by-product of attending over all N tokens (O(N^2)); taking it from
    there would mean either a full attention pass thrown away, or EViT's
    order (kept tokens attend to every token, then the dropped ones go).
    """
    b, n = qkv.shape[:2]
    q, k, _ = qkv.detach().unflatten(2, (3, num_heads, -1)).unbind(2)  # [B, N, H, D]
    scores = torch.einsum("bhd,bnhd->bhn", q[:, 0].float(), k.float()) * scale
    return scores.softmax(-1)[:, :, num_prefix_tokens:].mean(1)


def top_patches(score: torch.Tensor, k: int) -> torch.Tensor:
    """score [B, P] -> the k highest-scoring patch indices per row, ascending [B, k] int64."""
    return score.topk(k, dim=1, sorted=False).indices.sort(1).values


def random_patches(batch: int, num_patches: int, k: int, device) -> torch.Tensor:
    """A uniformly random k-subset of the patches per row, ascending [B, k] int64."""
    return top_patches(torch.rand(batch, num_patches, device=device), k)


def with_prefix(patches: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """patch indices [B, k] -> token indices [B, P + k]: the prefix tokens first, patches shifted by P."""
    prefix = torch.arange(num_prefix_tokens, device=patches.device, dtype=patches.dtype).expand(patches.shape[0], -1)
    return torch.cat([prefix, patches + num_prefix_tokens], dim=1)


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], keep [B, K] token indices -> x's kept rows [B, K, C]."""
    return x.gather(1, keep.long()[:, :, None].expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------


class PatchDropAttention(nn.Module):
    """timm ``Attention`` running ``ops.patch_drop_attention``; same submodules under the same names.

    forward(x [B, N, C], keep=None) -> [B, K, C]: with keep [B, K] token
    indices the output holds the kept tokens only (the qkv projection still
    sees all N: the kernel gathers the kept rows inside its loads). With
    ``record_cls_attention`` set, the CLS attention over the kept patches of
    the last forward is left in ``last_cls_attention`` [B, K - P] (no grad).
    """

    _ADOPTED = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")

    def __init__(self, attn: nn.Module, num_prefix_tokens: int, backend: str = "auto"):
        super().__init__()
        for name in self._ADOPTED:
            setattr(self, name, getattr(attn, name, None))
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.num_prefix_tokens = num_prefix_tokens
        self.backend = backend
        self.record_cls_attention = False
        self.last_cls_attention: torch.Tensor | None = None
        self._original = (attn,)  # a tuple: not registered as a submodule, so no duplicate parameters

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"

    def restore(self) -> nn.Module:
        """The original timm Attention, holding this module's current submodules (e.g. SparseLinear after sparsify_)."""
        attn = self._original[0]
        for name in self._ADOPTED:
            if getattr(attn, name, None) is not None or getattr(self, name, None) is not None:
                setattr(attn, name, getattr(self, name))
        return attn

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] -> qkv [B, N, 3, H, D] with timm's q/k norms applied."""
        qkv = self.qkv(x).unflatten(2, (3, self.num_heads, self.head_dim))
        if not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
            q, k, v = qkv.unbind(2)
            qkv = torch.stack([self.q_norm(q), self.k_norm(k), v], dim=2)
        return qkv

    def attend(self, x: torch.Tensor, qkv: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The rest of timm's forward, on the kept tokens: x [B, N, C] (the block's normed input), qkv from project_qkv."""
        result = ops.patch_drop_attention(
            qkv, keep, self.num_heads, self.scale, return_cls_attention=self.record_cls_attention,
            num_prefix_tokens=self.num_prefix_tokens, backend=self.backend, validate=False, padded=False,
        )
        if self.record_cls_attention:
            result, self.last_cls_attention = result
        out = self.norm(result)
        if self.gate is not None:
            out = out * self.gate(x if keep is None else gather_tokens(x, keep)).sigmoid()
        return self.proj_drop(self.proj(out))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("PatchDropAttention: attn_mask and is_causal are not supported with patch dropping")
        return self.attend(x, self.project_qkv(x), keep)


class PatchDropBlock(nn.Module):
    """timm ``Block`` whose attention runs on kept tokens; with ``keep_ratio`` set it drops patches itself.

    forward(x [B, N, C]) -> [B, N', C]: N' = N, or P + ceil(keep_ratio * (N - P))
    at a dropping block, where the CLS attention over the current tokens (or
    a random draw) picks the patches.
    """

    _ADOPTED = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")

    def __init__(self, block: nn.Module, attn: PatchDropAttention, keep_ratio: float | None, selector: str):
        super().__init__()
        for name in self._ADOPTED:
            setattr(self, name, attn if name == "attn" else getattr(block, name))
        self.keep_ratio, self.selector = keep_ratio, selector
        self._original = (block,)

    def extra_repr(self) -> str:
        return "" if self.keep_ratio is None else f"keep_ratio={self.keep_ratio}, selector={self.selector!r}"

    def restore(self) -> nn.Module:
        block = self._original[0]
        for name in self._ADOPTED:
            setattr(block, name, self.attn.restore() if name == "attn" else getattr(self, name))
        return block

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("PatchDropBlock: attn_mask and is_causal are not supported with patch dropping")
        h = self.norm1(x)
        if self.keep_ratio is None:
            x = x + self.drop_path1(self.ls1(self.attn(h)))
        else:
            qkv = self.attn.project_qkv(h)
            p = self.attn.num_prefix_tokens
            k = num_kept(self.keep_ratio, x.shape[1] - p)
            if self.selector == "cls_attention":
                patches = top_patches(cls_attention(qkv.flatten(2), self.attn.num_heads, self.attn.scale, p), k)
            else:
                patches = random_patches(x.shape[0], x.shape[1] - p, k, x.device)
            keep = with_prefix(patches, p).to(torch.int32)
            x = gather_tokens(x, keep) + self.drop_path1(self.ls1(self.attn.attend(h, qkv, keep)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class TicketDropout(nn.Module):
    """Drops patches at the input (in place of timm's ``patch_drop``): x [B, P + n, C] -> [B, P + k, C].

    selector "random": a fresh random k-subset per image; "given": the tickets
    set by ``use_tickets`` ([B, k] patch indices in [0, n), k = ceil(keep_ratio * n)).
    """

    def __init__(self, keep_ratio: float, num_prefix_tokens: int, selector: str, original: nn.Module):
        super().__init__()
        self.keep_ratio, self.num_prefix_tokens, self.selector = keep_ratio, num_prefix_tokens, selector
        self.tickets: torch.Tensor | None = None
        self.bypass = False  # True: keep every patch (evaluation with all patches)
        self._original = (original,)

    def extra_repr(self) -> str:
        return f"keep_ratio={self.keep_ratio}, selector={self.selector!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        n = x.shape[1] - p
        k = num_kept(self.keep_ratio, n)
        if k == n or self.bypass:
            return x
        if self.selector == "given":
            if self.tickets is None:
                raise RuntimeError("selector='given' needs tickets: run the model inside `with use_tickets(model, tickets):`")
            patches = self.tickets
            if patches.shape != (x.shape[0], k):
                raise ValueError(
                    f"tickets must be [B={x.shape[0]}, k={k}] (keep_ratio {self.keep_ratio} of {n} patches), got {tuple(patches.shape)}"
                )
            patches = patches.to(x.device)
        else:
            patches = random_patches(x.shape[0], n, k, x.device)
        return gather_tokens(x, with_prefix(patches, p))


# ---------------------------------------------------------------------------
# enable / disable
# ---------------------------------------------------------------------------


def _check_vit(model) -> None:
    missing = [name for name in ("patch_embed", "blocks", "patch_drop", "num_prefix_tokens") if not hasattr(model, name)]
    if not isinstance(model, nn.Module) or missing:
        raise TypeError(
            f"patch dropping needs a timm VisionTransformer (patch_embed, blocks, patch_drop, num_prefix_tokens), "
            f"got {type(model).__name__}" + (f" without {missing}" if isinstance(model, nn.Module) else "")
        )
    for i, block in enumerate(model.blocks):
        if isinstance(block, PatchDropBlock):
            continue
        attn = getattr(block, "attn", None)
        if not all(hasattr(block, name) for name in PatchDropBlock._ADOPTED) or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
            raise TypeError(f"patch dropping supports timm's Block with a fused-qkv Attention; block {i} is {type(block).__name__}")
        if getattr(getattr(attn, "attn_drop", None), "p", 0.0) > 0:
            raise ValueError(f"block {i}: attention dropout (p={attn.attn_drop.p}) is not supported by the fused kernel")


def _check_drop_at(drop_at, depth: int) -> tuple[int, ...] | str:
    if drop_at == "input":
        return "input"
    if isinstance(drop_at, int) and not isinstance(drop_at, bool):
        drop_at = (drop_at,)
    if not isinstance(drop_at, Iterable) or isinstance(drop_at, str):
        raise ValueError(f"drop_at must be 'input' or block indices like (3, 6, 9), got {drop_at!r}")
    layers = tuple(drop_at)
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth for i in layers):
        raise ValueError(f"drop_at block indices must be ints in [0, {depth}) (the model has {depth} blocks), got {drop_at!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"drop_at lists a block twice: {drop_at!r}")
    return tuple(sorted(layers))


def enable_patch_dropping_(
    model: nn.Module,
    keep_ratio: float,
    drop_at="input",
    selector: str | None = None,
    *,
    backend: str = "auto",
) -> nn.Module:
    """Make a timm VisionTransformer run on kept patch tokens (in place; returns the model).

    keep_ratio in (0, 1]; drop_at "input" or block indices; selector
    "random" or "given" at the input (default "random"), "cls_attention" or
    "random" at blocks (default "cls_attention"); backend for
    ``ops.patch_drop_attention``. Calling it again reconfigures the model.
    """
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    ATTENTION.check_name(backend)
    _check_vit(model)
    where = _check_drop_at(drop_at, len(model.blocks))
    if selector is None:
        selector = "random" if where == "input" else "cls_attention"
    if selector not in SELECTORS:
        raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
    if where == "input" and selector == "cls_attention":
        raise ValueError(
            "selector='cls_attention' at drop_at='input' needs attention that has not run yet: drop at blocks "
            "(drop_at=(3, 6, 9)), or compute tickets with a selector model (lotus_kernels.recipe.method.tickets) and use selector='given'"
        )
    if where != "input" and selector == "given":
        raise ValueError("selector='given' (tickets) drops at the input: use drop_at='input'")
    prefix = int(model.num_prefix_tokens)
    if selector == "cls_attention" and prefix < 1:
        raise ValueError("selector='cls_attention' needs a CLS token; this model has no prefix tokens")
    disable_patch_dropping_(model)
    state = {"patch_drop": model.patch_drop}
    if where == "input":
        model.patch_drop = TicketDropout(float(keep_ratio), prefix, selector, model.patch_drop)
    for i, block in enumerate(model.blocks):
        attn = PatchDropAttention(block.attn, prefix, backend)
        drops = where != "input" and i in where
        model.blocks[i] = PatchDropBlock(block, attn, float(keep_ratio) if drops else None, selector)
    setattr(model, _STATE, state)
    return model


def disable_patch_dropping_(model: nn.Module) -> nn.Module:
    """Undo ``enable_patch_dropping_``: the original timm modules, with any submodules swapped since (e.g. by sparsify_)."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    model.patch_drop = state["patch_drop"]
    for i, block in enumerate(model.blocks):
        if isinstance(block, PatchDropBlock):
            model.blocks[i] = block.restore()
    delattr(model, _STATE)
    return model


def is_patch_dropping(model: nn.Module) -> bool:
    return getattr(model, _STATE, None) is not None


@contextlib.contextmanager
def use_tickets(model: nn.Module, tickets: torch.Tensor, validate: bool = True):
    """Within the block, the model (enabled with selector="given") keeps the patches tickets [B, k] (indices in [0, patches)).

    validate checks the values (a host sync); skip it for tickets from a TicketSelector.
    """
    dropout = getattr(model, "patch_drop", None)
    if not isinstance(dropout, TicketDropout) or dropout.selector != "given":
        raise ValueError("use_tickets needs a model prepared with enable_patch_dropping_(model, keep_ratio, selector='given')")
    if not isinstance(tickets, torch.Tensor) or tickets.dim() != 2 or tickets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tickets must be an int32/int64 tensor [B, k], got {getattr(tickets, 'shape', type(tickets).__name__)}")
    n = model.patch_embed.num_patches
    if validate and not torch.compiler.is_compiling() and tickets.numel():
        if int(tickets.min()) < 0 or int(tickets.max()) >= n:
            raise ValueError(f"tickets must be patch indices in [0, {n}), got values in [{int(tickets.min())}, {int(tickets.max())}]")
        s = tickets.sort(1).values
        if bool((s[:, 1:] == s[:, :-1]).any()):
            raise ValueError("tickets: a row lists a patch twice")
    dropout.tickets = tickets
    try:
        yield model
    finally:
        dropout.tickets = None
