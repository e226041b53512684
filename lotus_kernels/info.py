"""What was built and what can run here: ``python -m lotus_kernels.info [--json]``.

Reports versions, how the extension was built (with or without CUDA, for
which arches, against which torch), the devices present, and for every op and
SparseLinear backend whether it can run on each device, and why not.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

import torch

from . import _extension, backends
from .masks import PATTERNS


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _arch_runs_on(arch_list: str, capability: tuple[int, int]) -> bool:
    """SASS built for sm_XY runs on sm_XZ with Z >= Y (same major); no PTX is embedded."""
    for arch in arch_list.replace(",", ";").split(";"):
        arch = arch.strip().split("+")[0]
        if not arch:
            continue
        major, minor = (int(v) for v in arch.split("."))
        if major == capability[0] and minor <= capability[1]:
            return True
    return False


def _compaction_status(device: str, build: dict, cuda_devices: list[dict]) -> str | None:
    """None when the mask-compaction ops run on ``device``, else why not."""
    if not build["built"]:
        return f"extension not built: {build['error']}"
    if device == "cpu":
        return None
    if not build["cuda"]:
        return "extension built without CUDA (LOTUS_CPU_ONLY=1 or no toolkit at build time)"
    if not cuda_devices:
        return "no CUDA device on this machine"
    capability = tuple(cuda_devices[0]["capability"])
    if not _arch_runs_on(build["cuda_arch_list"], capability):
        return f"built for arches {build['cuda_arch_list']}, device is sm_{capability[0]}{capability[1]}; rebuild with TORCH_CUDA_ARCH_LIST"
    return None


def _spec(pattern: str, device: str) -> backends.LayerSpec:
    """The spec info reports on: fp16 on CUDA, fp32 on CPU, 32x32 blocks."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    return backends.LayerSpec(pattern, torch.device(device), dtype, (32, 32) if pattern == "block" else None)


def extension_built() -> bool:
    """Whether the compiled extension (the compaction ops) loaded in this process."""
    return _extension.is_built()


def collect() -> dict:
    """Everything the report prints, as a dict."""
    build = _extension.build_info()
    cuda_devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cuda_devices.append(
                {"index": i, "name": props.name, "capability": [props.major, props.minor], "memory_gb": round(props.total_memory / 2**30, 1)}
            )
    device_types = ["cpu"] + (["cuda"] if cuda_devices else [])
    notes = []
    if build["built"] and build["torch_version"] and build["torch_version"] != torch.__version__:
        notes.append(f"extension was built against torch {build['torch_version']} but torch {torch.__version__} is running: rebuild")
    return {
        "versions": {
            "python": platform.python_version(),
            "lotus_kernels": _version("lotus-kernels"),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": _version("triton"),
            "timm": _version("timm"),
            "numpy": _version("numpy"),
        },
        "extension": build,
        "cuda_devices": cuda_devices,
        "compaction_ops": {device: _compaction_status(device, build, cuda_devices) for device in ("cpu", "cuda")},
        "backends": {
            device: {pattern: dict(backends.explain(_spec(pattern, device))) for pattern in PATTERNS}
            for device in device_types
        },
        "auto_candidates": {
            device: {pattern: [b.name for b in backends.auto_candidates(_spec(pattern, device))] for pattern in PATTERNS}
            for device in device_types
        },
        "auto_cache": str(backends.auto_cache_path()) if backends.auto_cache_path() else None,
        # What "auto" measured and chose on this GPU model with these versions (persisted across processes).
        "auto_decisions": next(iter(backends.saved_auto_choices("cuda").values())) if cuda_devices else {},
        "notes": notes,
    }


def environment(device: torch.device | str) -> dict:
    """{"date", "device", "versions"}: what a recorded result names about where it was measured.

    device: the CUDA device's name for a CUDA device, else "CPU (N threads)".
    """
    import time

    device = torch.device(device)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
        "versions": collect()["versions"],
    }


def format_report(info: dict) -> str:
    lines = ["lotus_kernels info", ""]
    lines += [f"  {name:<14} {value if value is not None else 'not installed'}" for name, value in info["versions"].items()]
    build = info["extension"]
    lines += ["", "extension lotus_kernels._C"]
    if build["built"]:
        cuda = f"yes (CUDA {build['cuda_version']}, arches {build['cuda_arch_list']})" if build["cuda"] else "no (CPU ops only)"
        lines += [f"  built          yes, against torch {build['torch_version']}", f"  with CUDA      {cuda}", f"  path           {build['path']}"]
    else:
        lines += [f"  built          no: {build['error']}"]
    lines += ["", "devices"]
    lines += ["  cpu"] + [
        f"  cuda:{d['index']}         {d['name']} (sm_{d['capability'][0]}{d['capability'][1]}, {d['memory_gb']} GiB)" for d in info["cuda_devices"]
    ]
    if not info["cuda_devices"]:
        lines += ["  cuda           none available"]
    lines += ["", "mask-compaction ops (dense_to_bsr, bsr_transpose, compress_2to4, decompress_2to4, keep_indices)"]
    lines += [f"  {device:<14} {'usable' if reason is None else 'not usable: ' + reason}" for device, reason in info["compaction_ops"].items()]
    lines += [
        "",
        "SparseLinear backends (fp32 on cpu, fp16 on cuda, 32x32 blocks); auto runs the only candidate,",
        "or on CUDA times the candidates once per shape and keeps the fastest",
    ]
    for device, per_pattern in info["backends"].items():
        for pattern, per_backend in per_pattern.items():
            listed = ", ".join(f"{name}: {'usable' if reason is None else reason}" for name, reason in per_backend.items())
            candidates = " | ".join(info["auto_candidates"][device][pattern])
            lines.append(f"  {device:<5} {pattern:<13} auto: {candidates:<20} [{listed}]")
    decisions = info.get("auto_decisions") or {}
    lines += ["", f"auto decisions on this GPU (cache: {info.get('auto_cache') or 'off'})"]
    if not decisions:
        lines += ["  none yet (decided on first use per layer shape and batch-rows bucket)"]
    for key, entry in sorted(decisions.items()):
        times = ", ".join(f"{name} {ms:.3f} ms" for name, ms in sorted(entry["times_ms"].items(), key=lambda kv: kv[1]))
        lines.append(f"  {key}: {entry['choice']}  [{times}]")
    for note in info["notes"]:
        lines += ["", f"NOTE: {note}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lotus_kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
