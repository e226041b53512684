"""What each gpu-check step runs (``STEPS``, in priority order), and the bodies of the steps that are not pytest.

Each step is a command for ``runner.run_isolated``. The speed steps are the
benchmarks of bench/ (one implementation of each benchmark) on their
headline grid (``LOTUS_BENCH_GRID=headline``), every measured case appended
to cases.jsonl as it is measured (``LOTUS_BENCH_JSONL``); the correctness and
test steps are pytest with ``pytest_progress`` (one line per test in
tests.jsonl, the step's deadline respected, resumable). Kernels autotune
over a few configs (``LOTUS_AUTOTUNE=quick``) unless the environment says
otherwise: a lease cannot spend 10-25 s compiling every config of every kernel.

Bodies run here (``python -m lotus_kernels.recipe.tools.gpu_check.steps NAME OUT``):
- ``env``: environment and measured peaks: a bf16 8192^3 matmul and a 1 GiB
  device copy on CUDA (an fp32 512^3 matmul and a 64 MiB copy on CPU);
- ``cusparselt``: each cuSPARSELt call configuration (``cusparselt.CONFIGS``)
  probed in a process of its own (``cusparselt-config NAME``): fp16 and bf16,
  rows not a multiple of 8, 16 and 64 and several row counts of one power-of-two
  bucket, each case written before the next starts (so a device fault names
  the case it hit), then timed at ViT-B MLP shape against dense. The step
  fails only if the proven configuration fails; later steps then run with
  ``LOTUS_CUSPARSELT=off``;
- ``cifar10``: the fast training profile on CIFAR-10 (``lotus train --profile fast``);
- ``lotus-table``: the LOTUS pipeline on CIFAR-10 with the fast profile's dense
  run (``lotus pipeline --profile fast``, patterns unstructured and 2:4): the
  issue-17 table of dense, tickets vs random patches, the Essential Sparsity
  curve, Instant Soup to 50 % and 2:4.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .runner import Command, Context, Step, StepResult, append_jsonl, output_path, read_jsonl

PLUGIN = "lotus_kernels.recipe.tools.gpu_check.pytest_progress"
DATA_ENV = "LOTUS_CIFAR10"
DEFAULT_DATA = Path(".data") / "cifar10-jpeg.tar.gz"


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------


def _outputs(ctx: Context, **extra: str) -> dict[str, str]:
    """A step's environment: where its records go (the run's files), how hard kernels autotune, and extra."""
    env = {
        "LOTUS_BENCH_JSONL": str(output_path(ctx.out, "cases.jsonl").resolve()),
        "LOTUS_TEST_LOG": str(output_path(ctx.out, "tests.jsonl").resolve()),
        "LOTUS_AUTOTUNE": os.environ.get("LOTUS_AUTOTUNE", "quick"),
    }
    return {**env, **extra}


def _pytest(ctx: Context, *args: str) -> list[str]:
    return [ctx.python, "-m", "pytest", *args, "-p", "no:cacheprovider", "-p", PLUGIN, "-rfEs", "-q"]


def _needs_source(ctx: Context) -> str | None:
    return None if ctx.root is not None else "needs the source checkout (bench/ and tests/): run gpu-check from the repository"


def _body(name: str):
    def prepare(ctx: Context) -> Command:
        return Command([ctx.python, "-m", "lotus_kernels.recipe.tools.gpu_check.steps", name, str(ctx.out.resolve())], _outputs(ctx))

    return prepare


def _bench(file: str):
    def prepare(ctx: Context) -> Command | str:
        return _needs_source(ctx) or Command(_pytest(ctx, f"bench/{file}", "--benchmark-only"), _outputs(ctx, LOTUS_BENCH_GRID="headline"))

    return prepare


def _correctness(selection: str, *files: str):
    def prepare(ctx: Context) -> Command | str:
        argv = _pytest(ctx, *files, "tests/ops/test_gpu_quick.py", "-k", selection, "-v", "--durations=10")
        return _needs_source(ctx) or Command(argv, _outputs(ctx))

    return prepare


def xdist_workers() -> int:
    """pytest-xdist workers for the full suite: one per core up to 12 (0: xdist is not installed)."""
    if importlib.util.find_spec("xdist") is None:
        return 0
    return max(1, min(12, os.cpu_count() or 1))


def _tests(ctx: Context) -> Command | str:
    missing = _needs_source(ctx)
    if missing:
        return missing
    argv = _pytest(ctx, "tests/", "--durations=25")  # where the time goes (Triton compiles, mostly) lands in steps.log
    workers = xdist_workers()
    if workers > 1:
        argv += ["-n", str(workers)]
    env = _outputs(ctx)
    # The suite's own default (tests/conftest.py) is LOTUS_AUTOTUNE=off: correctness does not depend on the tile.
    if "LOTUS_AUTOTUNE" not in os.environ:
        env.pop("LOTUS_AUTOTUNE")
    if ctx.resume:
        # Tests that passed in this folder before are not run again (the plugin deselects them).
        env["LOTUS_TEST_RESUME"] = env["LOTUS_TEST_LOG"]
    return Command(argv, env)


def _build(ctx: Context) -> Command | str:
    from lotus_kernels.info import extension_built

    if extension_built() and os.environ.get("LOTUS_GPU_CHECK_REBUILD") != "1":
        return "the extension is already built (LOTUS_GPU_CHECK_REBUILD=1 rebuilds)"
    if ctx.root is None:
        return "not built, and there is no source checkout to build from"
    # For this GPU's architecture only (both default arches take twice as long), every core compiling.
    script = (
        "import os, subprocess, sys, torch\n"
        "if torch.cuda.is_available() and 'TORCH_CUDA_ARCH_LIST' not in os.environ:\n"
        "    os.environ['TORCH_CUDA_ARCH_LIST'] = '%d.%d' % torch.cuda.get_device_capability()\n"
        "os.environ.setdefault('MAX_JOBS', str(os.cpu_count() or 1))\n"
        "sys.exit(subprocess.call([sys.executable, '-m', 'pip', 'install', '-e', sys.argv[1], '--no-build-isolation', '--no-deps', '-q']))\n"
    )
    return Command([ctx.python, "-c", script, str(ctx.root)])


def _data_path() -> Path | None:
    path = Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)
    return path if path.exists() else None


def _on_cifar10(name: str):
    def prepare(ctx: Context) -> Command | str:
        data = _data_path()
        if data is None:
            return f"no CIFAR-10 data: put the archive at {DEFAULT_DATA} or name it in ${DATA_ENV}"
        command = _body(name)(ctx)
        # Absolute: the step runs in the source checkout, which need not be where the check was started.
        return Command(command.argv, {**command.env, DATA_ENV: str(data.resolve())})

    return prepare


def _cusparselt_after(ctx: Context, result: StepResult) -> None:
    # The proven configuration failed on this GPU: nothing later may touch cuSPARSELt.
    if result.status not in ("passed", "skipped"):
        ctx.env["LOTUS_CUSPARSELT"] = "off"


STEPS = (
    Step("build", "build the extension when it is not built", _build, min_s=30, max_s=300),
    Step("env", "environment and measured peaks", _body("env"), min_s=10, max_s=90),
    Step("speed-block", "block-sparse linear vs cuBLAS and torch BSR", _bench("bench_block_sparse_matmul.py"), min_s=30, max_s=120),
    Step("speed-attn", "patch-drop attention vs SDPA and gather + SDPA", _bench("bench_patch_drop_attention.py"), min_s=20, max_s=90),
    Step("cusparselt", "cuSPARSELt call configurations, each in its own process", _body("cusparselt"), min_s=20, max_s=120, after=_cusparselt_after),
    Step("speed-2to4", "2:4 linear vs cuBLAS, torch semi-structured, ours and auto", _bench("bench_semi_structured_matmul.py"), min_s=30, max_s=120),
    Step("speed-vit", "ViT-B/16 batch 256 inference and training step", _bench("bench_vit.py"), min_s=60, max_s=240),
    Step("correctness", "fast tier: every op forward and backward", _correctness("not cusparselt"), min_s=30, max_s=180),
    Step("correctness-cusparselt", "fast tier, cuSPARSELt apart", _correctness("cusparselt", "tests/ops/test_cusparselt.py"), min_s=15, max_s=90),
    Step("speed-train", "training step and evaluation images/s of the fast profile", _bench("bench_train_throughput.py"), min_s=60, max_s=240),
    Step("tests", "the whole test suite (resumable)", _tests, min_s=60),
    Step("cifar10", "the fast profile on CIFAR-10", _on_cifar10("cifar10"), min_s=60),
    Step("lotus-table", "the LOTUS pipeline at the fast profile's scale on CIFAR-10", _on_cifar10("lotus-table"), min_s=120),
)


# ---------------------------------------------------------------------------
# bodies
# ---------------------------------------------------------------------------


def _record(out: Path, record: dict) -> None:
    step = os.environ.get("LOTUS_STEP", "")
    append_jsonl(output_path(out, "cases.jsonl"), {"step": step, **record})
    print(json.dumps(record, default=str), flush=True)


def _past_deadline(margin_s: float = 0.0) -> bool:
    deadline = os.environ.get("LOTUS_DEADLINE")
    return deadline is not None and time.time() + margin_s > float(deadline)


def _median_ms(fn, repeats: int) -> float:
    import torch

    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) for s, e in events)
    else:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
    return times[len(times) // 2]


def env_step(out: Path) -> int:
    """Environment and the device's measured peaks, one record each."""
    import torch

    from lotus_kernels.info import collect, environment

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    info = collect()
    record = {"group": "env", "name": "environment", **environment(device), "extension": info.get("extension"), "cuda_devices": info.get("cuda_devices")}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        record.update(sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1), capability=list(torch.cuda.get_device_capability(0)))
    _record(out, record)
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _median_ms(lambda: a @ b, 10)
    _record(out, {"group": "env", "name": "peak_matmul", "op": f"{str(dtype)[6:]} {n}^3 matmul", "device": record["device"], "p50_ms": ms, "tflops": 2 * n**3 / ms / 1e9})
    numel = (2**30 if cuda else 2**26) // 4
    src = torch.empty(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), 10)
    _record(out, {"group": "env", "name": "peak_copy", "op": f"copy of {numel * 4 / 2**20:.0f} MiB", "device": record["device"], "p50_ms": ms, "gb_per_s": 2 * numel * 4 / ms / 1e6})
    return 0


# Probe cases: rows M of x for a [N, K] weight. 1581 (ViT-B at batch 8: not a multiple of 8) is where fp16
# crashed; 1544 / 1552 / 1600 are multiples of 8 / 16 / 64 only; all but 1100 share one power-of-two bucket (2048).
PROBE_ROWS = (1581, 1544, 1552, 1600, 2000, 1100)
PROBE_SHAPES = ((3072, 768), (768, 3072))  # ViT-B fc1, fc2: (N, K)
PROBE_TIMING_ROWS = 256 * 197  # ViT-B/16 at batch 256


def cusparselt_step(out: Path) -> int:
    """Every configuration in its own process, the proven ones first; fails only if a proven one fails."""
    import torch

    from lotus_kernels.ops import cusparselt

    if not torch.cuda.is_available():
        _record(out, {"group": "cusparselt_probe", "name": "skipped", "status": "skipped", "reason": "no CUDA device"})
        print("cusparselt: no CUDA device here: nothing to probe")
        return 0
    order = sorted(cusparselt.CONFIGS, key=lambda name: name not in cusparselt.PROVEN)
    failed_proven = []
    for name in order:
        deadline = float(os.environ.get("LOTUS_DEADLINE", time.time() + 600))
        left = deadline - time.time()
        if left < 10:
            _record(out, {"group": "cusparselt_config", "name": name, "config": name, "status": "skipped", "reason": "step deadline"})
            continue
        # Each configuration gets an equal share of what is left (the last one all of it).
        share = left / (len(order) - order.index(name))
        env = {**os.environ, cusparselt.ENV: name, "LOTUS_DEADLINE": f"{time.time() + share:.3f}"}
        start = time.monotonic()
        try:
            done = subprocess.run([sys.executable, "-m", "lotus_kernels.recipe.tools.gpu_check.steps", "cusparselt-config", str(out), name], env=env, timeout=share + 10)
            returncode, status = done.returncode, "passed" if done.returncode == 0 else "crashed" if done.returncode < 0 else "failed"
        except subprocess.TimeoutExpired:
            returncode, status = None, "timeout"
        cases = [c for c in read_jsonl(output_path(out, "cases.jsonl")) if c.get("group") == "cusparselt_probe" and c.get("config") == name]
        last = cases[-1]["name"] if cases else None
        _record(out, {
            "group": "cusparselt_config", "name": name, "config": name, "proven": name in cusparselt.PROVEN, "status": status,
            "returncode": returncode, "seconds": round(time.monotonic() - start, 1), "cases": len(cases),
            "cases_ok": sum(bool(c.get("ok")) for c in cases), "last_case": last,
        })
        if status != "passed" and name in cusparselt.PROVEN:
            failed_proven.append(name)
    return 1 if failed_proven else 0


def _rel_err(got, exact) -> float:
    return float((got.double() - exact).norm() / exact.norm().clamp_min(1e-30))


def cusparselt_config_step(out: Path, name: str) -> int:
    """One configuration: correctness at awkward rows, fp16 and bf16, then speed at ViT-B MLP shapes.

    Each case is written before the next starts; a device fault ends the
    process, and the last record names the last case that completed.
    """
    import torch
    import torch.nn.functional as F

    from lotus_kernels import SparseLinear, masks
    from lotus_kernels.ops import cusparselt

    cusparselt.set_call_config(name)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in PROBE_SHAPES:
            w = torch.randn(n, k, generator=g) / k**0.5
            w = w * masks.nm_mask(w)
            linear = torch.nn.Linear(k, n).to("cuda", dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
            layer = SparseLinear.from_dense(linear, "2:4", backend="cusparselt")
            for m in PROBE_ROWS:
                if _past_deadline(2):
                    return 0
                x = torch.randn(m, k, generator=g).to("cuda", dtype)
                case = f"{name}-{str(dtype)[6:]}-{n}x{k}-m{m}"
                print(f"running {case}", flush=True)
                with torch.no_grad():
                    y = layer(x)
                    torch.cuda.synchronize()
                    exact = F.linear(x.double(), linear.weight.double(), linear.bias.double())
                    same = F.linear(x, linear.weight, linear.bias)
                err, torch_err = _rel_err(y, exact), _rel_err(same, exact)
                _record(out, {
                    "group": "cusparselt_probe", "name": case, "config": name, "dtype": str(dtype), "M": m, "N": n, "K": k,
                    "rel_err": err, "torch_rel_err": torch_err, "ok": bool(err <= 2 * torch_err + 1e-3),
                })
            if _past_deadline(5):
                return 0
            x = torch.randn(PROBE_TIMING_ROWS, k, generator=g).to("cuda", dtype)
            with torch.no_grad():
                ms = _median_ms(lambda: layer(x), 20)
                dense_ms = _median_ms(lambda: linear(x), 20)
            _record(out, {
                "group": "cusparselt_probe", "name": f"{name}-{str(dtype)[6:]}-{n}x{k}-m{PROBE_TIMING_ROWS}-timing", "config": name,
                "dtype": str(dtype), "M": PROBE_TIMING_ROWS, "N": n, "K": k, "p50_ms": ms, "dense_p50_ms": dense_ms,
                "speedup_vs_dense": dense_ms / ms, "ok": True,
            })
    return 0


def _run_before_deadline(command: list[str]) -> tuple[int | str, float]:
    """(exit code, or "stopped at the step's deadline"; wall seconds) of ``command``, stopped 15 s before
    the step's deadline (LOTUS_DEADLINE) so that the step can still record what the command left."""
    deadline = os.environ.get("LOTUS_DEADLINE")
    timeout = max(1.0, float(deadline) - time.time() - 15) if deadline else None
    start = time.perf_counter()
    try:
        returncode: int | str = subprocess.run(command, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        returncode = "stopped at the step's deadline"
    return returncode, time.perf_counter() - start


def cifar10_step(out: Path) -> int:
    """The fast profile on CIFAR-10 (``lotus train --profile fast``: the issue-17 recipe, compiled step); one record.

    Its epochs come from the profile unless LOTUS_GPU_CHECK_EPOCHS says otherwise. The run stops a little
    before the step's deadline (LOTUS_DEADLINE) and the epochs it finished are recorded all the same. The
    record holds every epoch's metrics, the test accuracy against the run's elapsed training time
    (``curve``), the median training images/s after the first epoch (which includes compilation) and
    ``startup_s``: the wall time outside the epochs (interpreter, data loading, model build, checkpoints).
    """
    import torch

    from lotus_kernels.info import environment

    data = _data_path()
    epochs = os.environ.get("LOTUS_GPU_CHECK_EPOCHS")
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "lotus_kernels", "train", "--data", "cifar10", "--data-path", str(data), "--profile", "fast",
            *(["--epochs", epochs] if epochs else []), "--set", "progress=false", "--out", tmp, "--overwrite",
        ]
        returncode, wall = _run_before_deadline(command)
        metrics = read_jsonl(Path(tmp) / "metrics.jsonl") if (Path(tmp) / "metrics.jsonl").exists() else []
        config = json.loads((Path(tmp) / "config.json").read_text()) if (Path(tmp) / "config.json").exists() else None
    run = training_curve(metrics)
    _record(out, {
        "group": "cifar10", "name": f"fast-{config['epochs'] if config else epochs}ep",
        **environment("cuda" if torch.cuda.is_available() else "cpu"),
        "command": " ".join(command[1:]).replace(str(tmp), "TMP"), "returncode": returncode, "wall_s": round(wall, 1),
        "startup_s": round(wall - run["train_s"], 1), "train_images_per_s": run["train_images_per_s"],
        "curve": run["curve"], "config": config, "metrics": metrics,
        "final_test_acc": metrics[-1].get("test_acc") if metrics else None,
    })
    return returncode if isinstance(returncode, int) else 1


def training_curve(metrics: list[dict]) -> dict:
    """What a training run's metrics.jsonl says about speed: {"curve": test accuracy against the elapsed
    training time ([{"epoch", "elapsed_s", "test_acc"}] at the epochs that evaluated), "train_s": the
    epochs' summed time, "train_images_per_s": the median epoch's after the first (which compiles)}."""
    elapsed, curve = 0.0, []
    for m in metrics:
        elapsed += m.get("epoch_time_s") or 0.0
        if m.get("test_acc") is not None:
            curve.append({"epoch": m["epoch"], "elapsed_s": round(elapsed, 1), "test_acc": m["test_acc"]})
    rates = sorted(m["images_per_s"] for m in metrics[1:] if m.get("images_per_s"))
    return {"curve": curve, "train_s": elapsed, "train_images_per_s": rates[len(rates) // 2] if rates else None}


# The table's settings beyond the fast profile: a validation split for the decisions (the knee, Instant
# Soup's rounds), so no decision looks at the test set; both patterns the issue asks for.
TABLE_SETTINGS = ("train.holdout=5000", 'patterns=["unstructured", "2:4"]', "train.progress=false")


def table_command(data: Path, out: Path, epochs: str | None) -> list[str]:
    """``lotus pipeline`` for the LOTUS table: the fast profile's dense run (``epochs`` of it when given)."""
    settings = [item for setting in TABLE_SETTINGS for item in ("--set", setting)]
    return [
        sys.executable, "-m", "lotus_kernels", "pipeline", "--data", "cifar10", "--data-path", str(data), "--profile", "fast",
        *(["--epochs", epochs] if epochs else []), *settings, "--out", str(out), "--overwrite",
    ]


def table_record(out: Path) -> dict:
    """What a (finished or cut short) pipeline run folder says. Always: the dense run's speed (it is the fast
    profile's run, on 45,000 images: ``training_curve``) as ``dense_run``. A finished run adds the rows with
    their distance to dense, the Essential Sparsity curve, Instant Soup and timing, from summary.json; one
    stopped before the end has no summary and names the stages that finished an epoch instead."""
    dense_metrics = read_jsonl(out / "dense" / "metrics.jsonl") if (out / "dense" / "metrics.jsonl").exists() else []
    dense_run = training_curve(dense_metrics)
    summary_path = out / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        rows = summary.get("rows", [])
        dense = next((r.get("acc_all_patches") for r in rows if r.get("stage") == "dense"), None)
        for r in rows:
            if isinstance(dense, float) and isinstance(r.get("acc_all_patches"), float):
                r["points_vs_dense"] = round((r["acc_all_patches"] - dense) * 100, 2)
        keep = ("rows", "essential_sparsity", "instant_soup", "timing", "decision_split", "test_images", "config")
        return {"finished": True, "dense_run": dense_run, **{k: summary[k] for k in keep if k in summary}}
    stages = sorted(p.parent.name for p in out.glob("*/metrics.jsonl"))
    return {"finished": False, "dense_run": dense_run, "stages_with_metrics": stages}


def lotus_table_step(out: Path) -> int:
    """The LOTUS pipeline at the fast profile's scale on CIFAR-10 (``table_command``); one record.

    The dense run's epochs come from the profile unless LOTUS_GPU_CHECK_EPOCHS says otherwise; the run stops
    a little before the step's deadline (LOTUS_DEADLINE) and what it finished is recorded (``table_record``).
    """
    import torch

    from lotus_kernels.info import environment

    epochs = os.environ.get("LOTUS_GPU_CHECK_EPOCHS")
    with tempfile.TemporaryDirectory() as tmp:
        command = table_command(_data_path(), Path(tmp), epochs)
        returncode, wall = _run_before_deadline(command)
        record = table_record(Path(tmp))
    _record(out, {
        "group": "lotus_table", "name": f"fast-{epochs}ep" if epochs else "fast-profile", **environment("cuda" if torch.cuda.is_available() else "cpu"),
        "command": " ".join(command[1:]).replace(str(tmp), "TMP"), "returncode": returncode, "wall_s": round(wall, 1), **record,
    })
    return returncode if isinstance(returncode, int) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lotus_kernels.recipe.tools.gpu_check.steps", description="one gpu-check step body")
    parser.add_argument("step", choices=("env", "cusparselt", "cusparselt-config", "cifar10", "lotus-table"))
    parser.add_argument("out", type=Path)
    parser.add_argument("config", nargs="?", help="cusparselt-config: the configuration's name")
    args = parser.parse_args(argv)
    if args.step == "env":
        return env_step(args.out)
    if args.step == "cusparselt":
        return cusparselt_step(args.out)
    if args.step == "cusparselt-config":
        return cusparselt_config_step(args.out, args.config)
    if args.step == "lotus-table":
        return lotus_table_step(args.out)
    return cifar10_step(args.out)


if __name__ == "__main__":
    sys.exit(main())
