"""Benchmark harness shared by bench/bench_*.py (run: pytest bench/ --benchmark-only).

Every result records the device, versions, git commit and date in
extra_info; timed callables synchronize the device so GPU time is counted.
On CPU the benchmarks run small shapes so the command always works.
"""

import datetime
import platform
import subprocess

import pytest
import torch

from lotus_kernels.info import collect


def _command_output(*command: str) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def time_ms(fn) -> float:
    """Median milliseconds of fn: triton's do_bench on CUDA (device-synchronised), a short wall-clock mean on CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50)
    import time

    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


@pytest.fixture(scope="session")
def environment():
    info = collect()
    if info["cuda_devices"]:
        device = info["cuda_devices"][0]["name"]
        driver = _command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    else:
        device, driver = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)", None
    return {
        "device": device,
        "driver": driver,
        "versions": info["versions"],
        "cuda_build": info["extension"].get("cuda_version"),
        "git_commit": _command_output("git", "rev-parse", "HEAD"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@pytest.fixture
def bench_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def run_benchmark(benchmark, environment):
    """run_benchmark(fn, **extra): time fn (device-synchronised) and record the environment."""

    def run(fn, **extra):
        def synced():
            out = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return out

        benchmark.extra_info.update(environment)
        benchmark.extra_info.update(extra)
        return benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)

    return run


# Third-party kernels with known gaps (torch.sparse has no backward for a
# sparse weight; cuSPARSELt has shape and dtype limits): such a case is
# skipped with its reason. Our own providers must run: their errors fail.
FOREIGN_PROVIDERS = ("torch_bsr", "cusparselt")
_DENSE_MS: dict[tuple, float] = {}


def warmed_up(provider: str, mode: str, make_fn):
    """make_fn() -> a zero-argument callable, called once (compile, autotune, algorithm search) before timing."""
    try:
        fn = make_fn()
        fn()
        return fn
    except (RuntimeError, NotImplementedError, ValueError) as e:
        if provider not in FOREIGN_PROVIDERS:
            raise
        pytest.skip(f"{provider} cannot run {mode}: {str(e).splitlines()[0]}")


@pytest.fixture
def record_vs_dense(run_benchmark):
    """record(fn, make_dense_fn, dense_key, useful_flops, **info): time fn and the dense provider of the same case
    (measured once per dense_key), and record median, speedup vs dense and TFLOP/s of useful work."""

    def record(fn, make_dense_fn, dense_key, useful_flops, **info):
        if dense_key not in _DENSE_MS:
            _DENSE_MS[dense_key] = time_ms(make_dense_fn())
        result_ms = time_ms(fn)
        run_benchmark(
            fn,
            median_ms=result_ms,
            dense_ms=_DENSE_MS[dense_key],
            speedup_vs_dense=_DENSE_MS[dense_key] / result_ms,
            useful_tflops=useful_flops / (result_ms * 1e-3) / 1e12,
            **info,
        )

    return record

