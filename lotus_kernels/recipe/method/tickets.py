"""Data lottery tickets: the image patches a trained ViT attends to, and training a student on them.

A ticket is, per image, the ``ceil(keep_ratio * num_patches)`` patch indices
(ascending, in [0, num_patches)) with the highest score, where the score is
the selector ViT's CLS-row attention over the patches, averaged over heads,
from one block (``layer``), or rolled out over all blocks (``layer="rollout"``:
Abnar & Zuidema's attention rollout, each block's head-averaged attention
mixed half-and-half with the identity and renormalised, multiplied through).

Modes of training on tickets (``ticket_hooks``):
- "online": the frozen selector scores every augmented (mixed) batch without
  gradient and the student runs on that batch's tickets, as the data-level
  lottery-ticket paper (Shen et al., IJCAI 2023) does;
- "fixed": the selector scores every training image once, un-augmented
  (``fixed_ticket_scores``); each batch then maps its images' scores through
  that batch's crops and flips (``map_scores``, from the engine's
  ``BatchDraws``) and keeps the top patches: no selector forward per step;
- "random": the control, a random subset of the same size per image.
The student drops the other patches right after the position embedding
(``enable_patch_dropping_(student, keep_ratio, selector="given")``).
Evaluation "on tickets" runs the selector on the (un-augmented) test images.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from lotus_kernels.nn.patch_dropping import (
    TicketDropout,
    enable_patch_dropping_,
    is_patch_dropping,
    num_kept,
    random_patches,
    top_patches,
    use_tickets,
)

MODES = ("online", "fixed", "random")


def _check_keep_ratio(keep_ratio) -> float:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    return float(keep_ratio)


def _check_selector(model: nn.Module, layer) -> None:
    depth = len(model.blocks)
    if layer != "rollout" and (isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer < depth):
        raise ValueError(f"layer must be a block index in [-{depth}, {depth}) or 'rollout', got {layer!r}")
    if is_patch_dropping(model):
        raise ValueError("the selector must be a plain timm ViT (patch dropping disabled)")
    if int(model.num_prefix_tokens) < 1:
        raise ValueError("CLS-attention tickets need a model with a CLS token")


def cls_attention_scores(model: nn.Module, images: torch.Tensor, layer: int | str = -1) -> torch.Tensor:
    """images [B, 3, H, W] -> patch scores [B, num_patches] fp32 from a timm ViT (no grad, eval mode restored).

    layer: block index (negative counts from the end) whose CLS-row attention
    (averaged over heads) scores the patches, or "rollout".
    """
    _check_selector(model, layer)
    depth = len(model.blocks)
    prefix = int(model.num_prefix_tokens)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
            last = depth - 1 if layer == "rollout" else layer % depth
            rollout = None
            for i, block in enumerate(model.blocks[: last + 1]):
                attn = block.attn
                h = block.norm1(x)
                q, k, _ = attn.qkv(h).unflatten(2, (3, attn.num_heads, attn.head_dim)).unbind(2)
                q, k = attn.q_norm(q), attn.k_norm(k)
                if layer == "rollout":
                    a = (torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * attn.scale).softmax(-1).mean(1)
                    a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
                    a = a / a.sum(-1, keepdim=True)
                    rollout = a if rollout is None else a @ rollout
                elif i == last:
                    # One query row: the CLS token's attention over every token.
                    s = torch.einsum("bhd,bkhd->bhk", q[:, 0].float(), k.float()) * attn.scale
                    return s.softmax(-1)[:, :, prefix:].mean(1)
                if i < last:
                    x = block(x)
            return rollout[:, 0, prefix:]
    finally:
        model.train(was_training)


class TicketSelector:
    """A frozen trained ViT choosing each image's ticket: ``selector(images) -> [B, k]`` int64 ascending patch indices.

    model: a timm VisionTransformer (copied; the copy is frozen, in eval mode).
    keep_ratio in (0, 1]: k = ceil(keep_ratio * num_patches). layer: as in
    ``cls_attention_scores``.
    """

    def __init__(self, model: nn.Module, keep_ratio: float, layer: int | str = -1):
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise TypeError(f"the selector must be a timm VisionTransformer, got {type(model).__name__}")
        self.keep_ratio = _check_keep_ratio(keep_ratio)
        _check_selector(model, layer)  # before any training relies on it
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.layer = layer
        self.num_patches = self.model.patch_embed.num_patches
        self.k = num_kept(self.keep_ratio, self.num_patches)

    def to(self, device) -> "TicketSelector":
        self.model.to(device)
        return self

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        return cls_attention_scores(self.model, images, self.layer)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return top_patches(self.scores(images), self.k)


def random_tickets(batch: int, num_patches: int, keep_ratio: float, device=None) -> torch.Tensor:
    """The random control: a uniformly random ceil(keep_ratio * num_patches)-subset per image, [B, k] ascending."""
    return random_patches(batch, num_patches, num_kept(_check_keep_ratio(keep_ratio), num_patches), device)


def map_tickets(tickets: torch.Tensor, grid: tuple[int, int], patch: int, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Map tickets of un-augmented images through ``data.crop_flip``'s crops and flips (the "fixed" tickets).

    tickets [B, k] patch indices on a grid (rows, cols) of patch x patch
    pixels; offsets [B, 2] crop offsets (dy, dx) into the image padded by
    ``padding``; flips [B] bool. A ticket patch moves with the image content:
    the crop shifts it by (padding - dy, padding - dx) pixels, the flip
    mirrors its column. Returns a bool keep mask [B, rows * cols] of the
    augmented image's patches that cover a ticket patch's centre (patches
    shifted out of the image are lost, so a row may keep fewer than k).
    """
    rows, cols = grid
    b = tickets.shape[0]
    r, c = tickets // cols, tickets % cols
    # Centre of each ticket patch in pixels, moved by the crop.
    y = r * patch + patch // 2 + (padding - offsets[:, :1])
    x = c * patch + patch // 2 + (padding - offsets[:, 1:])
    x = torch.where(flips[:, None], cols * patch - 1 - x, x)
    inside = (y >= 0) & (y < rows * patch) & (x >= 0) & (x < cols * patch)
    index = (y.clamp(0, rows * patch - 1) // patch) * cols + x.clamp(0, cols * patch - 1) // patch
    keep = torch.zeros(b, rows * cols, dtype=torch.bool, device=tickets.device)
    keep.scatter_(1, torch.where(inside, index, 0), inside)
    return keep


def map_scores(scores: torch.Tensor, grid: tuple[int, int], patch: int, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Patch scores of un-augmented images carried through ``data.crop_flip``'s crops and flips.

    scores [B, rows * cols] float; offsets [B, 2] crop offsets (dy, dx) into
    the image padded by ``padding``; flips [B] bool. Each patch of the
    augmented image gets the score of the original patch under its centre
    pixel, or -inf when that pixel is padding (such patches are chosen last).
    The inverse of ``map_tickets``' mapping: the top patches of the mapped
    scores are the mapped tickets, topped up to k when some moved out (at a
    shift of exactly half a patch a ticket straddles two patches, and the
    two mappings may pick different ones of the pair).
    Returns [B, rows * cols] float.
    """
    rows, cols = grid
    index = torch.arange(rows * cols, device=scores.device)
    y = (index // cols * patch + patch // 2)[None, :]  # centre of each augmented patch
    x = (index % cols * patch + patch // 2)[None, :]
    x = torch.where(flips[:, None], cols * patch - 1 - x, x)  # undo the flip, then the crop
    y = y + offsets[:, :1] - padding
    x = x + offsets[:, 1:] - padding
    inside = (y >= 0) & (y < rows * patch) & (x >= 0) & (x < cols * patch)
    source = (y.clamp(0, rows * patch - 1) // patch) * cols + x.clamp(0, cols * patch - 1) // patch
    mapped = scores.gather(1, source)
    return mapped.masked_fill(~inside, float("-inf"))


@torch.no_grad()
def fixed_ticket_scores(selector: "TicketSelector", dataset, batch_size: int = 256, device=None) -> torch.Tensor:
    """The selector's patch scores of every image of ``dataset`` (an ImageSet), un-augmented: float32 [N, num_patches].

    Normalised as the training loader normalises (the dataset's mean/std), in
    dataset order, on ``device`` (default: the selector's).
    """
    from ..data import DeviceLoader

    device = torch.device(device) if device is not None else next(selector.model.parameters()).device
    loader = DeviceLoader(dataset, batch_size, shuffle=False, augment=False, device=device)
    return torch.cat([selector.scores(x).float() for x, _ in loader])


class FixedTickets:
    """The "fixed" training hook: hook(student, x, draws) runs the student on each image's mapped tickets.

    scores [N, num_patches]: ``fixed_ticket_scores`` of the training set
    (indexed by ``draws.indices``); grid / patch: the student's patch grid
    (rows, cols) and patch size in pixels; keep_ratio: as the selector's.
    """

    needs_draws = True  # the training engine then passes the batch's BatchDraws

    def __init__(self, scores: torch.Tensor, grid: tuple[int, int], patch: int, keep_ratio: float):
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"scores must be a [N, {grid[0] * grid[1]}] tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
        self.scores, self.grid, self.patch = scores, tuple(grid), int(patch)
        self.k = num_kept(_check_keep_ratio(keep_ratio), scores.shape[1])

    @classmethod
    def from_selector(cls, selector: "TicketSelector", dataset, batch_size: int = 256) -> "FixedTickets":
        """Score ``dataset`` (the training ImageSet, in the engine's order) once with ``selector``."""
        embed = selector.model.patch_embed
        patch = embed.patch_size[0] if isinstance(embed.patch_size, (tuple, list)) else embed.patch_size
        return cls(fixed_ticket_scores(selector, dataset, batch_size), tuple(embed.grid_size), patch, selector.keep_ratio)

    def tickets(self, draws) -> torch.Tensor:
        """The batch's tickets [B, k] (ascending patch indices) after its crops and flips."""
        scores = self.scores[draws.indices.to(self.scores.device)].to(draws.offsets.device)
        mapped = map_scores(scores, self.grid, self.patch, draws.offsets, draws.flips, draws.padding)
        return top_patches(mapped, self.k)

    def __call__(self, student: nn.Module, x: torch.Tensor, draws) -> torch.Tensor:
        if draws is None or draws.indices is None:
            raise ValueError("fixed tickets need the batch's draws: use them as train(token_hook=...) of lotus_kernels.recipe.engine")
        with use_tickets(student, self.tickets(draws), validate=False):
            return student(x)


def prepare_student_(student: nn.Module, keep_ratio: float, mode: str = "online", backend: str = "auto") -> nn.Module:
    """Make ``student`` drop patches at the input: selector "given" for online and fixed tickets, "random" for the control."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return enable_patch_dropping_(student, _check_keep_ratio(keep_ratio), selector="random" if mode == "random" else "given", backend=backend)


def _dropout(model: nn.Module) -> TicketDropout:
    dropout = getattr(model, "patch_drop", None)
    if not isinstance(dropout, TicketDropout):
        raise ValueError("the student must be prepared with prepare_student_ (patch dropping at the input)")
    return dropout


def ticket_hooks(selector: TicketSelector | None, mode: str = "online", fixed: FixedTickets | None = None, train_set=None):
    """(train_hook, all_patches_hook, tickets_hook) for ``engine.train``/``engine.evaluate`` token_hook arguments.

    train_hook(student, x): the student on x's tickets (online: the selector's
    choice on this very batch; fixed: ``fixed``, the precomputed tickets
    mapped through the batch's augmentation, or, without it, tickets scored
    now on ``train_set``, the engine's training ImageSet (ignored by the
    other modes); random: a fresh random subset). all_patches_hook: the student on every patch.
    tickets_hook: on the selector's tickets (random mode: on random ones),
    for evaluation.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode in ("online", "fixed") and not isinstance(selector, TicketSelector):
        raise TypeError(f"{mode} tickets need a TicketSelector, got {type(selector).__name__}")
    if mode == "fixed" and fixed is None and train_set is not None:
        fixed = FixedTickets.from_selector(selector, train_set)
    if mode == "fixed" and not isinstance(fixed, FixedTickets):
        raise TypeError(
            f"fixed tickets need fixed=FixedTickets.from_selector(selector, train_set) or train_set, got {type(fixed).__name__}"
        )

    def on_tickets(student, x):
        if mode == "random":
            return student(x)  # TicketDropout draws the random subset itself
        tickets = selector(x)
        with use_tickets(student, tickets, validate=False):
            return student(x)

    def all_patches(student, x):
        dropout = _dropout(student)
        saved = dropout.bypass
        dropout.bypass = True
        try:
            return student(x)
        finally:
            dropout.bypass = saved

    return (fixed if mode == "fixed" else on_tickets), all_patches, on_tickets


def ticket_overlap(a: torch.Tensor, b: torch.Tensor, num_patches: int) -> float:
    """Mean fraction of a's ticket patches also in b's (both [B, k]): how similar two selections are."""
    ma = torch.zeros(a.shape[0], num_patches, dtype=torch.bool, device=a.device).scatter_(1, a, True)
    mb = torch.zeros(b.shape[0], num_patches, dtype=torch.bool, device=b.device).scatter_(1, b.to(a.device), True)
    return float((ma & mb).sum() / max(1, ma.sum()))


def expected_random_overlap(keep_ratio: float, num_patches: int) -> float:
    """E[overlap] of two independent random tickets of the same size: k / n."""
    return num_kept(keep_ratio, num_patches) / num_patches if num_patches else math.nan
