"""Where and in which precision the engine runs: device names, AMP modes, whether to compile."""

from __future__ import annotations


import torch


AMP_MODES = ("auto", "bf16", "fp16", "none")


def parse_device_name(name: str) -> None:
    if name in ("auto", "cpu", "cuda"):
        return
    if name.startswith("cuda:") and name[5:].isdigit():
        return
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def resolve_device(name: str, local_rank: int | None) -> torch.device:
    parse_device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here (use 'cpu' or 'auto')")
    if name.startswith("cuda:"):
        return torch.device(name)
    # "cuda" / "auto": one GPU per local rank under torchrun.
    return torch.device("cuda", local_rank or 0)


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]



def resolve_compile(compile: bool | str, device: torch.device) -> bool:
    """Whether to compile: "auto" compiles on CUDA only (on a CPU, compiling costs more than it saves in short runs)."""
    return device.type == "cuda" if compile == "auto" else bool(compile)
