"""Benchmark harness shared by bench/bench_*.py (run: pytest bench/ --benchmark-only).

Every result (one pytest-benchmark entry, grouped by its ``op``) stores in
extra_info:
- p20_ms / p50_ms / p80_ms: quantiles of the device time of one call. On CUDA
  ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, the
  device synchronised, warm-up excluded), with enough repetitions for at
  least ``min_reps`` samples; on CPU a few wall-clock repetitions after one
  warm-up call. pytest-benchmark's own stats (pedantic mode, the callable
  synchronises the device) sit beside them; reports quote p50_ms.
- dense_p50_ms and speedup_vs_dense (record_vs_dense / measure_vs_dense):
  the dense provider of the same case timed in the same run;
- useful_tflops (FLOPs of useful work per second) and pct_of_peak: against
  the device's dense peak measured once per session (``device_peak``: on
  CUDA a bf16 8192^3 cuBLAS matmul, on CPU an fp32 1024^3 matmul);
- the device, driver, versions, git commit, date and the pytest command.

On CPU the benchmarks run small shapes through the reference paths so the
command always works (in a few seconds); on CUDA the real shapes.

``LOTUS_BENCH_JSONL=FILE`` (lotus gpu-check) also appends every result to
FILE as one line the moment it is measured, as the flat row ``lotus
bench-report`` reads (extra_info with name, fullname, group on top), so a
session killed at a deadline keeps what it measured. ``LOTUS_BENCH_GRID=headline``
picks each file's headline grid (the issue's target cases).
"""

import datetime
import os
import platform
import subprocess
import time

import pytest
import torch

from lotus_kernels.info import collect

QUANTILES = (0.2, 0.5, 0.8)
QUANTILE_KEYS = ("p20_ms", "p50_ms", "p80_ms")


def _command_output(*command: str) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _quantiles(samples: list[float], qs=QUANTILES) -> list[float]:
    """Linear-interpolation quantiles (numpy's default, torch.quantile's too) of a non-empty list."""
    ordered = sorted(samples)
    out = []
    for q in qs:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return out


def _cuda_estimate_ms(fn) -> float:
    """One call timed with CUDA events (fn has been called before: compile and autotune are done)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return max(start.elapsed_time(end), 1e-3)


def time_quantiles_ms(fn, *, min_reps: int = 5, rep_ms: float = 50.0, warmup_ms: float = 10.0) -> dict[str, float]:
    """{"p20_ms", "p50_ms", "p80_ms"}: quantiles of the time of one call of fn, warm-up excluded.

    CUDA: triton's do_bench (device time by CUDA events, L2 flushed before
    each call) over about ``rep_ms`` of calls, stretched so that a slow fn
    (an end-to-end training step) still gets ``min_reps`` samples. CPU:
    wall clock (perf_counter) of at least ``min_reps`` calls (up to 50, about
    ``rep_ms`` in all) after one warm-up call.
    """
    if torch.cuda.is_available():
        import triton.testing

        fn()
        estimate = _cuda_estimate_ms(fn)
        # do_bench repeats int(rep / its own 5-call estimate) times: ask for enough time for min_reps.
        rep = max(rep_ms, 1.25 * min_reps * estimate)
        values = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep, quantiles=list(QUANTILES))
        return dict(zip(QUANTILE_KEYS, (float(v) for v in values)))
    fn()
    start = time.perf_counter()
    fn()
    estimate = (time.perf_counter() - start) * 1e3
    reps = max(min_reps, min(50, int(rep_ms / max(estimate, 1e-3))))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return dict(zip(QUANTILE_KEYS, _quantiles(samples)))


def time_ms(fn) -> float:
    """Median milliseconds of one call of fn (see time_quantiles_ms)."""
    return time_quantiles_ms(fn)["p50_ms"]


@pytest.fixture(scope="session")
def environment(pytestconfig):
    info = collect()
    if info["cuda_devices"]:
        device = info["cuda_devices"][0]["name"]
        driver = _command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    else:
        device, driver = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)", None
    dirty = _command_output("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "device": device,
        "driver": driver,
        "versions": info["versions"],
        "cuda_runtime": torch.version.cuda,
        "cuda_build": info["extension"].get("cuda_version"),
        "git_commit": _command_output("git", "rev-parse", "HEAD"),
        "git_dirty": None if dirty is None else bool(dirty),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m pytest", *pytestconfig.invocation_params.args]),
    }


def _matmul_p50_ms(n: int, dtype: torch.dtype, device: str) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return time_quantiles_ms(lambda: torch.mm(a, b, out=c), min_reps=5)["p50_ms"]


@pytest.fixture(scope="session")
def device_peak():
    """The device's dense matmul peak, measured once per session: {"peak_tflops", "peak_op", "peak_ms"}.

    CUDA: bf16 8192^3 (cuBLAS, do_bench); CPU: fp32 1024^3. Results quote
    their useful TFLOP/s as a percentage of it (pct_of_peak).
    """
    if torch.cuda.is_available():
        n, dtype, device = 8192, torch.bfloat16, "cuda"
    else:
        n, dtype, device = 1024, torch.float32, "cpu"
    p50 = _matmul_p50_ms(n, dtype, device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "peak_tflops": 2 * n**3 / (p50 * 1e-3) / 1e12,
        "peak_op": f"torch.mm {str(dtype)[6:]} {n}x{n}x{n} on {device}",
        "peak_ms": p50,
    }


@pytest.fixture
def bench_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# What every result repeats about the session: a row keeps the device and date, and the run's file says the rest once.
_SESSION_KEYS = ("driver", "versions", "cuda_runtime", "cuda_build", "git_commit", "git_dirty", "command", "peak_op")


def append_result_row(node, group: str, extra_info: dict) -> None:
    """One measured result as a row in $LOTUS_BENCH_JSONL (nothing without it)."""
    path = os.environ.get("LOTUS_BENCH_JSONL")
    if not path:
        return
    from lotus_kernels.recipe.tools.gpu_check.runner import append_jsonl

    row = {key: value for key, value in extra_info.items() if key not in _SESSION_KEYS}
    append_jsonl(path, {**row, "step": os.environ.get("LOTUS_STEP", ""), "name": node.name, "fullname": node.nodeid, "group": group})


@pytest.fixture
def run_benchmark(benchmark, environment, device_peak, request):
    """run_benchmark(fn, rounds=10, **extra): time fn (device-synchronised) and record the environment.

    extra["op"] names the result's group. Without p20_ms/p50_ms/p80_ms in
    extra, they are measured here (time_quantiles_ms).
    """

    def run(fn, rounds: int = 10, **extra):
        def synced():
            out = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return out

        if not all(key in extra for key in QUANTILE_KEYS):
            extra.update(time_quantiles_ms(fn))
        if extra.get("op"):
            benchmark.group = extra["op"]
        benchmark.extra_info.update(environment)
        benchmark.extra_info.update({"peak_tflops": device_peak["peak_tflops"], "peak_op": device_peak["peak_op"]})
        benchmark.extra_info.update(extra)
        result = benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=2)
        append_result_row(request.node, benchmark.group or request.node.name.split("[")[0], benchmark.extra_info)
        return result

    return run


# Third-party kernels with known gaps (torch.sparse has no backward for a
# sparse weight; cuSPARSELt and torch's semi-structured sparsity have shape,
# dtype and arch limits): such a case is skipped with its reason. Our own
# providers must run: their errors fail.
FOREIGN_PROVIDERS = ("torch_bsr", "cusparselt", "torch_semi_structured")
# dense_key -> quantiles of the dense provider of that case, measured once per session.
_DENSE: dict[tuple, dict[str, float]] = {}


def foreign_errors() -> tuple[type[BaseException], ...]:
    """What a foreign provider may raise where it cannot run a case: unsupported shapes and dtypes, Triton out of
    shared memory or registers (OutOfResources is no RuntimeError), torch.compile / dynamo failures."""
    errors: list[type[BaseException]] = [RuntimeError, NotImplementedError, ValueError]
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)
    except ImportError:  # torch without dynamo
        pass
    try:
        from triton.runtime.errors import OutOfResources

        errors.append(OutOfResources)
    except ImportError:  # no triton on this machine: nothing of it can be raised
        pass
    return tuple(errors)


def warmed_up(provider: str, mode: str, make_fn):
    """make_fn() -> a zero-argument callable, called once (compile, autotune, algorithm search) before timing.

    A foreign provider (FOREIGN_PROVIDERS) that cannot run the case is
    skipped with the reason; any error of our own providers propagates.
    """
    try:
        fn = make_fn()
        fn()
        return fn
    except foreign_errors() as e:
        if provider not in FOREIGN_PROVIDERS:
            raise
        first_line = (str(e).splitlines() or [""])[0]
        pytest.skip(f"{provider} cannot run {mode}: {type(e).__name__}: {first_line}")


def measure_vs_dense(fn, make_dense_fn, dense_key, useful_flops, peak_tflops, *, is_dense=False, min_reps=5) -> dict:
    """Time fn and (once per dense_key) the dense provider of the same case; returns the metrics to record.

    make_dense_fn() -> the dense callable (only called when dense_key was not
    measured yet). is_dense: fn is that dense callable; its own measurement
    is the dense one (speedup exactly 1). useful_flops: FLOPs of useful work
    in one call of fn (None: no TFLOP/s recorded).
    """
    quantiles = time_quantiles_ms(fn, min_reps=min_reps)
    if is_dense:
        _DENSE.setdefault(dense_key, quantiles)
        dense = quantiles
    else:
        if dense_key not in _DENSE:
            _DENSE[dense_key] = time_quantiles_ms(make_dense_fn(), min_reps=min_reps)
        dense = _DENSE[dense_key]
    metrics = {
        **quantiles,
        "dense_p50_ms": dense["p50_ms"],
        "speedup_vs_dense": dense["p50_ms"] / quantiles["p50_ms"],
        "useful_tflops": None,
        "pct_of_peak": None,
    }
    if useful_flops is not None:
        metrics["useful_tflops"] = useful_flops / (quantiles["p50_ms"] * 1e-3) / 1e12
        metrics["pct_of_peak"] = 100.0 * metrics["useful_tflops"] / peak_tflops
    return metrics


@pytest.fixture
def record_vs_dense(run_benchmark, device_peak):
    """record(fn, make_dense_fn, dense_key, useful_flops, **info): time fn and the dense provider of the same case
    (measured once per dense_key; a provider="dense" case is its own reference), and record p20/p50/p80, speedup
    vs dense, TFLOP/s of useful work and % of the device's dense peak."""

    def record(fn, make_dense_fn, dense_key, useful_flops, **info):
        metrics = measure_vs_dense(
            fn, make_dense_fn, dense_key, useful_flops, device_peak["peak_tflops"], is_dense=info.get("provider") == "dense"
        )
        run_benchmark(fn, **metrics, **info)

    return record
