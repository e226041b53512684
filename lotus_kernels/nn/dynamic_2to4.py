"""Dynamic 2:4: re-prune the 2:4 SparseLinear layers of a model every k optimizer steps (off by default).

A 2:4 ``SparseLinear`` stores only its kept weights (``values`` [out, in/2],
``metadata`` [out, ceil(in/32)] int32; see ``lotus_kernels.nn``), so plain
training keeps its mask fixed. ``Dynamic2to4`` lets the mask move, in the
spirit of SR-STE (Zhou et al. 2021, "Learning N:M fine-grained structured
sparse neural networks from scratch"): the pruned weights keep learning from
a straight-through gradient, and every ``every`` steps each group of 4 keeps
its 2 largest weights again. Nothing in the package builds one: a training
loop opts in by creating it and calling it after every optimizer step.

What is learned where, per 2:4 layer:

- ``values`` (the kept weights) are trained by the user's optimizer exactly as
  without the hook (weight decay, momentum, clipping, AMP scaling: whatever
  the loop does). The hook never writes them except at a re-prune that
  changes the mask.
- A dense "shadow" weight [out, in] (fp32, fp64 for fp64 layers; a plain
  tensor on the layer's device, not a Parameter, not in the model's
  state_dict) holds, at kept positions, a copy of ``values`` and, at pruned
  positions, weights that keep learning: each step they take a plain SGD step
  ``shadow -= lr * pruned_lr_scale * dL/dW`` with the dense weight gradient
  dL/dW = grad_out^T @ x (the straight-through estimate: the gradient the
  weight would have if it were not pruned), and lr the current lr of the
  optimizer param group that holds the layer's ``values``. No weight decay,
  momentum or gradient clipping applies to them. Initially they hold 0 (the
  sparse model's view) or, when given, the dense model's weights.
- Every ``every`` steps (``step % every == 0``) each group of 4 along
  in_features keeps the 2 largest |shadow| (the order of
  ``masks.nm_mask``, except that exact ties keep the current slots: no churn).
  A layer whose mask changes gets new ``values`` and ``metadata`` written in
  place (same Parameter object: optimizer references stay valid; the shapes
  never change for 2:4). A weight that leaves the mask keeps its last value in
  the shadow and goes on learning there; one that enters starts from its
  shadow value. The optimizer's per-parameter state tensors of the shape of
  ``values`` (AdamW exp_avg / exp_avg_sq, SGD momentum_buffer, ...) and
  ``values.grad`` follow their column: a slot that now holds a column that was
  kept before gets that column's state from its old slot; a slot that holds a
  newly kept column starts from zero.

Cost, per 2:4 layer: one extra dense dW matmul (grad_out^T @ x in fp32,
[out, N] x [N, in] for N = rows of x) per forward call that is backpropagated
(for an activation="gelu" layer also the recomputed pre-activation, one more
matmul of the forward's size); memory 2 x 4 bytes per dense weight entry
(shadow and gradient accumulator) and the layer input kept alive until the
backward (autograd usually keeps it anyway). No host synchronisation except
on re-prune steps (the changed-group count, the finiteness check).

Hooks and torch.compile: the dW comes from Python hooks, a forward hook on
each layer that registers a gradient hook on that call's output (which pairs
every call's input with its own output gradient, also for a layer called
several times per step). Under ``torch.no_grad()`` / ``inference_mode``
(evaluation) they do nothing and keep nothing. Dynamo traces hooks that exist
when it compiles (torch 2.15: the compiled model accumulates the same dW as
the eager one, with a graph break), but a graph compiled *before* the hooks
were registered can keep running without them (torch 2.15 does, unless its
cache holds a graph traced with hooks). Whenever no backward pass reached
any 2:4 layer since the last call, ``__call__`` warns once and does nothing:
the masks stay fixed (static 2:4 training), never re-pruned from stale data.
Create the hook before the first compiled call. The in-place rewrite at a
re-prune keeps tensor shapes, so it does not trigger a recompilation.

Distributed (torch.distributed initialised, world size > 1): each rank
accumulates its local gradient; just before a re-prune the pruned shadow
positions are averaged over the ranks (SGD is linear, so this is SGD on the
averaged gradient, as DDP does for ``values``) and every rank computes the
same mask. All ranks must call ``__call__`` with the same steps.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layouts import compress_2to4_ref, decompress_2to4_ref, unpack_2to4_slots
from .sparse_linear import SparseLinear

__all__ = ["Dynamic2to4", "RepruneResult"]

_STATE_VERSION = 1
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class RepruneResult:
    """What one ``Dynamic2to4.__call__`` did.

    repruned: a re-prune ran (step % every == 0 and the call was not
    skipped); changed_groups: groups of 4 whose kept slots changed (0 unless
    repruned); total_groups: groups of 4 over all 2:4 layers (0 when
    skipped); layers: changed groups per layer name (re-prune steps only);
    skipped: why nothing was done ("eval mode", "no backward"), else None.
    """

    step: int
    repruned: bool = False
    changed_groups: int = 0
    total_groups: int = 0
    layers: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None

    @property
    def changed_fraction(self) -> float:
        return self.changed_groups / self.total_groups if self.total_groups else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "changed_fraction": self.changed_fraction}


class _Layer:
    """Per-layer state: the shadow weight and the dW accumulated since the last call."""

    __slots__ = ("name", "module", "shadow", "grad", "handle")

    def __init__(self, name: str, module: SparseLinear, shadow: torch.Tensor):
        self.name = name
        self.module = module
        self.shadow = shadow  # [out, in], fp32 (fp64 for fp64 layers)
        self.grad: torch.Tensor | None = None  # [out, in] like shadow; None: no backward since the last call
        self.handle = None


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d/dz of the exact (erf) GELU: Phi(z) + z * phi(z)."""
    return 0.5 * (1.0 + torch.erf(z * _SQRT_HALF)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int (optimizer steps done so far, 1-based), got {type(step).__name__} {step!r}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (optimizer steps done so far, 1-based), got {step}")
    return step


def _top2_slots(shadow: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """shadow [R, C] float, keep [R, C] bool (current mask) -> kept slots [R, C/4, 2] int64, ascending.

    The 2 largest |shadow| per group of 4. Ties: a currently kept slot first,
    then the lower slot (so without ties this is exactly ``masks.nm_mask``).
    """
    rows, cols = shadow.shape
    kept = keep.reshape(rows, cols // 4, 4)
    # Positions reordered kept-first (ascending within each class); a stable
    # descending sort of |w| in that order breaks ties by it.
    order = torch.sort((~kept).to(torch.uint8), dim=-1, stable=True).indices
    score = shadow.abs().reshape(rows, cols // 4, 4).gather(-1, order)
    top = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :2]
    return order.gather(-1, top).sort(-1).values


def _slots_to_mask(slots: torch.Tensor, cols: int) -> torch.Tensor:
    """slots [R, C/4, 2] -> bool [R, C]."""
    rows = slots.shape[0]
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=slots.device)
    return mask.scatter(-1, slots, True).reshape(rows, cols)


def _remap_slots(t: torch.Tensor, old_slots: torch.Tensor, new_slots: torch.Tensor) -> torch.Tensor:
    """Per-slot tensor t [R, C/2] (values' layout) -> the same columns' entries in the new slots, 0 for new columns."""
    rows = t.shape[0]
    t = t.reshape(rows, -1, 2)
    same = new_slots[..., :, None] == old_slots[..., None, :]  # [R, G, new slot, old slot]
    source = same.to(torch.uint8).argmax(-1)  # old slot holding the column (any, when none does)
    moved = t.gather(-1, source)
    return torch.where(same.any(-1), moved, torch.zeros((), dtype=t.dtype, device=t.device)).reshape(rows, -1)


class Dynamic2to4:
    """Re-prune every 2:4 ``SparseLinear`` of ``model`` every ``every`` optimizer steps (see the module docstring).

    model: an nn.Module holding at least one SparseLinear(pattern="2:4")
    (found by ``named_modules``; names are those of that walk). every: int >= 1.
    dense_weights: optional {layer name: dense weight [out, in]} (e.g. the
    dense model's weights before ``sparsify_``) that start the pruned
    positions of the shadow (default 0). pruned_lr_scale: float >= 0, the
    pruned weights' SGD lr as a multiple of the param group's lr (with AdamW,
    whose steps do not scale with the gradient, a plain-SGD step at AdamW's lr
    is tiny: scale it up). grad_scaler: the ``torch.amp.GradScaler`` the loop
    scales its loss with, if any: the accumulated dW is unscaled with the
    scale used in the backward, and a step the scaler skipped (inf/NaN
    gradients) is skipped for the shadow too.

    Use: ``hook = Dynamic2to4(model, every=100)``, build the optimizer, then
    after each ``optimizer.step()`` call ``hook(step, model, optimizer)``
    (step = optimizer steps done so far, 1-based). ``hook.remove()`` detaches it.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int,
        *,
        dense_weights: Mapping[str, torch.Tensor] | None = None,
        pruned_lr_scale: float = 1.0,
        grad_scaler=None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError(f"every must be an int >= 1 (optimizer steps between re-prunes), got {type(every).__name__} {every!r}")
        if every < 1:
            raise ValueError(f"every must be an int >= 1 (optimizer steps between re-prunes), got {every}")
        if isinstance(pruned_lr_scale, bool) or not isinstance(pruned_lr_scale, numbers.Real):
            raise TypeError(f"pruned_lr_scale must be a real number >= 0, got {type(pruned_lr_scale).__name__} {pruned_lr_scale!r}")
        if not (math.isfinite(pruned_lr_scale) and pruned_lr_scale >= 0):
            raise ValueError(f"pruned_lr_scale must be a finite number >= 0, got {pruned_lr_scale!r}")
        if grad_scaler is not None and not (hasattr(grad_scaler, "is_enabled") and hasattr(grad_scaler, "get_scale")):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler or None, got {type(grad_scaler).__name__}")
        if dense_weights is not None and not isinstance(dense_weights, Mapping):
            raise TypeError(f"dense_weights must be a mapping {{layer name: tensor [out, in]}}, got {type(dense_weights).__name__}")

        self.every = every
        self.pruned_lr_scale = float(pruned_lr_scale)
        self.grad_scaler = grad_scaler
        self.history: list[RepruneResult] = []  # one entry per re-prune
        self.num_updates = 0  # calls that applied a backward's gradient
        self.last_step = 0
        self._removed = False
        self._warned_no_backward = False
        # The loss scale of the backward being accumulated (GradScaler only), to tell a skipped step.
        self._scale_used: torch.Tensor | None = None

        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear) and m.pattern == "2:4"]
        if not layers:
            other = sorted({m.pattern for m in model.modules() if isinstance(m, SparseLinear)})
            found = f"SparseLinear patterns found: {other}" if other else "no SparseLinear at all"
            raise ValueError(f"model has no SparseLinear layer with pattern '2:4' to re-prune ({found})")
        dense_weights = dict(dense_weights or {})
        unknown = set(dense_weights) - {n for n, _ in layers}
        if unknown:
            raise ValueError(f"dense_weights names layers that are not 2:4 SparseLinear layers of model: {sorted(unknown)}")

        self._layers: dict[str, _Layer] = {}
        for name, module in layers:
            with torch.no_grad():
                shadow = module.to_dense().detach().to(self._acc_dtype(module))
                if name in dense_weights:
                    dense = dense_weights[name]
                    if not isinstance(dense, torch.Tensor) or not dense.is_floating_point():
                        raise TypeError(f"dense_weights[{name!r}] must be a floating-point tensor, got {type(dense).__name__}")
                    if dense.shape != shadow.shape:
                        raise ValueError(
                            f"dense_weights[{name!r}] must have the layer's shape (out, in) = {tuple(shadow.shape)}, "
                            f"got {tuple(dense.shape)}"
                        )
                    dense = dense.detach().to(device=shadow.device, dtype=shadow.dtype)
                    shadow = torch.where(module.mask(), shadow, dense)
            state = _Layer(name, module, shadow)
            state.handle = module.register_forward_hook(partial(self._forward_hook, state), with_kwargs=True)
            self._layers[name] = state

    # ------------------------------------------------------------ accessors

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    @property
    def shadows(self) -> dict[str, torch.Tensor]:
        """{layer name: shadow weight [out, in]} (the live tensors: read, do not modify)."""
        return {name: s.shadow for name, s in self._layers.items()}

    @property
    def pending_grads(self) -> dict[str, torch.Tensor]:
        """{layer name: dL/dW [out, in]} accumulated since the last call (layers with a backward only)."""
        return {name: s.grad for name, s in self._layers.items() if s.grad is not None}

    @property
    def changed_fraction(self) -> float:
        """Fraction of groups that changed at the last re-prune (0.0 before any)."""
        return self.history[-1].changed_fraction if self.history else 0.0

    @staticmethod
    def _acc_dtype(module: SparseLinear) -> torch.dtype:
        return torch.promote_types(module.values.dtype, torch.float32)

    # ----------------------------------------------------------------- hooks

    def _forward_hook(self, state: _Layer, module: SparseLinear, args, kwargs, output):
        # Nothing to learn without a graph (evaluation under no_grad / inference_mode): keep no reference.
        if self._removed or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        x = args[0] if args else kwargs.get("x")
        # A gradient hook on this call's output pairs the gradient with this call's input, also when
        # the layer runs several times per step; if the graph is freed without a backward, x goes with it.
        output.register_hook(partial(self._accumulate, state, x, x._version))
        return None

    def _accumulate(self, state: _Layer, x: torch.Tensor, version: int, grad_out: torch.Tensor):
        if self._removed:
            return None
        if x._version != version:
            raise RuntimeError(
                f"Dynamic2to4: the input of layer {state.name!r} was modified in place after its forward; "
                "its weight gradient cannot be computed"
            )
        module = state.module
        dtype = state.shadow.dtype
        with torch.no_grad():
            g = grad_out.to(dtype).reshape(-1, module.out_features)
            x2 = x.detach().to(dtype).reshape(-1, module.in_features)
            if module.activation == "gelu":
                # The output is GELU(pre): dL/dpre = dL/dout * GELU'(pre), pre recomputed from x.
                bias = None if module.bias is None else module.bias.detach().to(dtype)
                pre = F.linear(x2, module.to_dense().detach().to(dtype), bias)
                g = g * _gelu_grad(pre)
            dw = g.t() @ x2
            if self.grad_scaler is not None and self.grad_scaler.is_enabled():
                scale = self._current_scale(dw.device)
                if self._scale_used is None:
                    self._scale_used = scale.clone()  # update() changes the scale in place after the step
                dw = dw / scale.to(dtype)
            if state.grad is None:
                state.grad = dw
            else:
                state.grad.add_(dw.to(state.grad.device))
        return None

    def _current_scale(self, device: torch.device) -> torch.Tensor:
        # GradScaler keeps its scale in a device tensor; reading it as a tensor avoids a host sync per backward.
        scale = getattr(self.grad_scaler, "_get_scale_async", lambda: None)()
        if scale is None:
            scale = torch.tensor(self.grad_scaler.get_scale())
        return scale.to(device=device, dtype=torch.float32)

    def remove(self) -> None:
        """Detach the hooks (gradient hooks already on live outputs become no-ops) and drop pending gradients."""
        self._removed = True
        for state in self._layers.values():
            if state.handle is not None:
                state.handle.remove()
                state.handle = None
            state.grad = None
        self._scale_used = None

    # ------------------------------------------------------------------ step

    def __call__(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> RepruneResult:
        """After optimizer step ``step`` (1-based): update the shadows, and re-prune when step % every == 0.

        model: the model (or its DDP wrapper) being trained: a call while it is
        in eval mode does nothing. optimizer: the optimizer holding every
        layer's ``values`` (its lr is read from their param group; its state
        is remapped at a re-prune).
        """
        step = _check_step(step)
        if self._removed:
            raise RuntimeError("Dynamic2to4 was removed; create a new one to re-prune again")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "state"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not model.training:
            return RepruneResult(step, skipped="eval mode")
        if all(s.grad is None for s in self._layers.values()):
            if not self._warned_no_backward:
                self._warned_no_backward = True
                warnings.warn(
                    "Dynamic2to4: no backward pass reached the 2:4 layers since the last call (a torch.compile'd "
                    "model runs without the Python hooks?); the shadows are not updated and the masks stay fixed",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return RepruneResult(step, skipped="no backward")

        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        # Under a GradScaler, a step it skipped (inf/NaN gradient) lowered the scale: skip it here too.
        step_ok = None
        if self._scale_used is not None:
            step_ok = self._current_scale(self._scale_used.device) >= self._scale_used
            self._scale_used = None
        reprune = step % self.every == 0
        world = _world_size()
        changed: dict[str, int] = {}
        total_groups = 0
        for state in self._layers.values():
            module = state.module
            values = module.values
            self._follow_device(state)
            keep = module.mask()
            with torch.no_grad():
                if state.grad is not None:
                    group = group_of.get(id(values))
                    if group is None:
                        raise ValueError(
                            f"Dynamic2to4: the values of layer {state.name!r} are not in the optimizer's param groups; "
                            "build the optimizer from model.parameters() (after creating the hook is fine)"
                        )
                    grad, state.grad = state.grad, None
                    apply = ~keep if step_ok is None else ~keep & step_ok.to(keep.device)
                    update = grad.mul_(group["lr"] * self.pruned_lr_scale)
                    state.shadow.sub_(torch.where(apply, update, torch.zeros((), dtype=update.dtype, device=update.device)))
                # The kept positions follow what the optimizer did to values (exact: the shadow dtype holds values').
                kept_now = decompress_2to4_ref(values.detach(), module.metadata, validate=False).to(state.shadow.dtype)
                state.shadow.copy_(torch.where(keep, kept_now, state.shadow))
                if reprune:
                    if world > 1:
                        self._average_pruned(state, keep, world)
                    changed[state.name] = self._reprune(state, keep, optimizer)
            total_groups += keep.numel() // 4
        self.num_updates += 1
        self.last_step = step
        if not reprune:
            return RepruneResult(step, total_groups=total_groups)
        result = RepruneResult(step, True, sum(changed.values()), total_groups, changed)
        self.history.append(result)
        return result

    def _follow_device(self, state: _Layer) -> None:
        # The model may have moved (model.to(device)) since the hook was built.
        device = state.module.values.device
        if state.shadow.device != device:
            state.shadow = state.shadow.to(device)
            if state.grad is not None:
                state.grad = state.grad.to(device)

    @staticmethod
    def _average_pruned(state: _Layer, keep: torch.Tensor, world: int) -> None:
        # Kept positions are identical on every rank (DDP syncs values); pruned ones drifted with local gradients.
        import torch.distributed as dist

        pruned = torch.where(keep, torch.zeros((), dtype=state.shadow.dtype, device=state.shadow.device), state.shadow)
        dist.all_reduce(pruned)
        state.shadow.copy_(torch.where(keep, state.shadow, pruned / world))

    @staticmethod
    def _reprune(state: _Layer, keep: torch.Tensor, optimizer) -> int:
        """New mask from the shadow; rewrites values/metadata/optimizer state in place. Returns changed groups."""
        module = state.module
        shadow = state.shadow
        if not bool(torch.isfinite(shadow).all()):
            raise ValueError(
                f"Dynamic2to4: the shadow weight of layer {state.name!r} holds NaN or Inf "
                "(diverged values or pruned updates); cannot re-prune"
            )
        old_slots = unpack_2to4_slots(module.metadata, module.in_features)
        new_slots = _top2_slots(shadow, keep)
        changed = int((new_slots != old_slots).any(-1).sum())
        if not changed:
            return 0
        new_values, new_metadata = compress_2to4_ref(shadow, _slots_to_mask(new_slots, module.in_features))
        values = module.values
        # In place: the Parameter object (and the optimizer's reference to it) stays the same.
        # Not through .data: the version counter must move so derived copies (weight_cache) are rebuilt.
        values.copy_(new_values.to(values.dtype))
        module.metadata.copy_(new_metadata)
        per_slot = [t for t in optimizer.state.get(values, {}).values() if isinstance(t, torch.Tensor) and t.shape == values.shape]
        if values.grad is not None:
            per_slot.append(values.grad)
        for t in per_slot:
            t.copy_(_remap_slots(t, old_slots, new_slots))
        return changed

    # ------------------------------------------------------------ state_dict

    def state_dict(self) -> dict:
        """Shadows, pending gradients and counters: with the model's and optimizer's state, a resumed run re-prunes identically."""
        return {
            "version": _STATE_VERSION,
            "every": self.every,
            "pruned_lr_scale": self.pruned_lr_scale,
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "history": [r.as_dict() for r in self.history],
            "shadows": {name: s.shadow.detach().clone() for name, s in self._layers.items()},
            "pending_grads": {name: g.detach().clone() for name, g in self.pending_grads.items()},
            "scale_used": None if self._scale_used is None else self._scale_used.clone(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore ``state_dict()``'s output; the layer names and shapes must match this hook's."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            got = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"state must be a Dynamic2to4.state_dict() of version {_STATE_VERSION}, got {got!r}")
        shadows, pending = state["shadows"], state.get("pending_grads", {})
        if set(shadows) != set(self._layers):
            raise ValueError(
                f"state holds shadows for layers {sorted(shadows)}, this hook has {sorted(self._layers)}"
            )
        for name, tensor in {**shadows, **pending}.items():
            if name not in self._layers:
                raise ValueError(f"state holds a pending gradient for unknown layer {name!r}")
            expected = tuple(self._layers[name].shadow.shape)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"state for layer {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
        for name, s in self._layers.items():
            s.shadow = shadows[name].detach().to(device=s.module.values.device, dtype=s.shadow.dtype).clone()
            g = pending.get(name)
            s.grad = None if g is None else g.detach().to(device=s.shadow.device, dtype=s.shadow.dtype).clone()
        self.num_updates = int(state["num_updates"])
        self.last_step = int(state["last_step"])
        self.history = [
            RepruneResult(**{k: v for k, v in r.items() if k != "changed_fraction"}) for r in state.get("history", [])
        ]
        self._scale_used = None if state.get("scale_used") is None else state["scale_used"].clone()

    def __repr__(self) -> str:
        return (
            f"Dynamic2to4(every={self.every}, pruned_lr_scale={self.pruned_lr_scale}, layers={len(self._layers)}, "
            f"reprunes={len(self.history)}, last_changed_fraction={self.changed_fraction:.4f})"
        )
