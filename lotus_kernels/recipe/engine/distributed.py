"""Data-parallel layout (torchrun's environment or an initialised process group) and the
cross-rank sums the engine needs; a single process is the layout with world_size 1."""

from __future__ import annotations

import dataclasses
import os

import torch


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def distributed_from_env() -> DistInfo:
    """The data-parallel layout: an initialised process group, else torchrun's env vars, else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    return DistInfo(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0))


def init_distributed(info: DistInfo, device: torch.device) -> None:
    import torch.distributed as dist

    if not info.active or dist.is_initialized():
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The group stays up after train() returns: the caller (a torchrun
    # script) may evaluate or train again, and destroys it when done.
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=info.rank, world_size=info.world_size)


def all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    if not info.active:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# ---------------------------------------------------------------------------
# optimisation pieces
