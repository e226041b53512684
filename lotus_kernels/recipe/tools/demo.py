"""The main job for now (`make demo`): sparsify a timm ViT with each pattern and check it.

For each pattern: sparsify_ a copy of the model, build the "fake-sparse"
dense model independently (weights * masks from lotus_kernels.masks), compare
outputs, and measure bytes and CPU latency. Prints a table; --json writes
the measurements with device, versions, date and command.

    python -m lotus_kernels.recipe.tools.demo [--model vit_tiny_patch16_224] [--batch 8] [--repeats 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import platform
import shlex
import statistics
import sys
import time

import torch
from tqdm import tqdm

from lotus_kernels import masks
from lotus_kernels.info import collect
from lotus_kernels.nn import SparsityConfig, default_filter, sparsify_, sparsity_summary

CONFIGS = [
    ("unstructured 50%", SparsityConfig("unstructured", 0.5)),
    ("2:4", SparsityConfig("2:4")),
    ("block 32x32 50%", SparsityConfig("block", 0.5, block_size=32)),
    ("block 32x32 90%", SparsityConfig("block", 0.9, block_size=32)),
]


def independent_mask(weight: torch.Tensor, config: SparsityConfig) -> torch.Tensor:
    if config.pattern == "unstructured":
        return masks.magnitude_mask(weight, config.sparsity)
    if config.pattern == "2:4":
        return masks.nm_mask(weight)
    return masks.block_mask(weight, config.sparsity, config.block_size)


def fake_sparse(model: torch.nn.Module, config: SparsityConfig) -> torch.nn.Module:
    """Dense copy with every prunable weight multiplied by its mask."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if default_filter(module, name):
                module.weight.mul_(independent_mask(module.weight, config))
    return model


def state_dict_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@torch.inference_mode()
def latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    for _ in range(2):  # warm-up
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(model_name: str, batch: int, repeats: int, seed: int = 0) -> dict:
    import timm

    torch.manual_seed(seed)
    dense = timm.create_model(model_name, pretrained=False).eval()
    image_size = dense.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(batch, *image_size, generator=torch.Generator().manual_seed(seed))
    rows = []
    dense_ms = latency_ms(dense, x, repeats)
    prunable_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in dense.named_modules() if default_filter(m, n))
    rows.append(
        {
            "pattern": "dense (timm)",
            "density": 1.0,
            "layers": 0,
            "weight_bytes_dense": prunable_bytes,
            "weight_bytes_compact": prunable_bytes,
            "state_dict_bytes": state_dict_bytes(dense),
            "max_abs_error": 0.0,
            "latency_ms": dense_ms,
        }
    )
    for label, config in tqdm(CONFIGS, desc=f"sparsifying {model_name}", unit="pattern", file=sys.stderr):
        sparse = sparsify_(copy.deepcopy(dense), config)
        summary = sparsity_summary(sparse)
        with torch.inference_mode():
            error = (sparse(x) - fake_sparse(dense, config)(x)).abs().max().item()
        rows.append(
            {
                "pattern": label,
                "density": summary.density,
                "layers": len(summary),
                "weight_bytes_dense": summary.dense_bytes,
                "weight_bytes_compact": summary.compact_bytes,
                "state_dict_bytes": state_dict_bytes(sparse),
                "max_abs_error": error,
                "latency_ms": latency_ms(sparse, x, repeats),
            }
        )
    return {"model": model_name, "batch": batch, "input": list(image_size), "repeats": repeats, "rows": rows}


def format_table(result: dict) -> str:
    header = (
        f"{'pattern':<18} {'density':>7} {'layers':>6} {'weights dense':>14} {'weights compact':>16} "
        f"{'state_dict':>11} {'max|err|':>9} {'CPU ms':>8}"
    )
    lines = [
        f"{result['model']}, batch {result['batch']} x {tuple(result['input'])}, CPU latency = median of {result['repeats']}",
        header,
        "-" * len(header),
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['pattern']:<18} {row['density']:>7.3f} {row['layers']:>6} {row['weight_bytes_dense'] / 2**20:>11.2f} MiB "
            f"{row['weight_bytes_compact'] / 2**20:>12.2f} MiB {row['state_dict_bytes'] / 2**20:>7.2f} MiB "
            f"{row['max_abs_error']:>9.1e} {row['latency_ms']:>8.1f}"
        )
    lines.append(
        "max|err|: sparse model vs the dense model with weights * masks (computed independently). "
        "On CPU 'auto' runs the 'dense' backend (the masked dense weight, built once and cached): "
        "exact, dense speed, no sparse speedup (the GPU kernels are the fast path)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lotus_kernels.recipe.tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name (built with pretrained=False)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be at least 1")
    result = run(args.model, args.batch, args.repeats)
    print(format_table(result))
    if args.json:
        info = collect()
        result.update(
            device=f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            versions=info["versions"],
            extension=info["extension"],
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command="python -m lotus_kernels.recipe.tools.demo " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        )
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    worst = max(row["max_abs_error"] for row in result["rows"])
    return 0 if worst == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
