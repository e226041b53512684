"""The benchmark harness's own logic (bench/conftest.py, bench/bench_vit.py, bench/run_gpu.sh), on the CPU and
without timing anything: quantiles, speedup bookkeeping, FLOP counts, the grids, the warm-up's skips, and the
GPU runner's report / compare / info steps driven with fake files.

bench/conftest.py has no import-time side effects (fixtures and functions only), so it is loaded here under
its own module name. bench/bench_vit.py imports it as ``conftest`` (pytest puts bench/ on sys.path for the
benchmarks); while it loads, ``conftest`` points at that module, then back at tests/conftest.py.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bench_report import kernel_and_vit_run, write

from lotus_kernels.recipe.tools import bench_report

ROOT = Path(__file__).resolve().parents[3]


def _load(name: str, path: Path, **modules):
    """The file as a module named ``name``; ``modules`` stand in sys.modules while it runs (then sys.modules is as before)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {name: module, **modules}.items():  # dataclasses look their module up while the class is made
            mp.setitem(sys.modules, key, value)
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    """bench/conftest.py as a module."""
    return _load("lotus_bench_conftest", ROOT / "bench" / "conftest.py")


@pytest.fixture(scope="module")
def vit(harness):
    """bench/bench_vit.py as a module (its `from conftest import ...` served by bench/conftest.py)."""
    return _load("lotus_bench_vit", ROOT / "bench" / "bench_vit.py", conftest=harness)


# ---------------------------------------------------------------------------
# bench/conftest.py helpers
# ---------------------------------------------------------------------------


def test_quantiles_interpolate_like_torch(harness):
    assert harness._quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx([1.8, 3.0, 4.2], abs=1e-12)
    samples = [0.7, 0.1, 9.0, 2.5, 2.5, 3.25, 0.05]
    expected = torch.quantile(torch.tensor(samples, dtype=torch.float64), torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    assert harness._quantiles(samples) == pytest.approx(expected.tolist(), abs=1e-12)
    assert harness._quantiles([7.0]) == [7.0, 7.0, 7.0]


def test_dense_provider_speedup_is_exactly_one_and_others_use_the_cached_dense(harness, monkeypatch):
    monkeypatch.setattr(harness, "_DENSE", {})
    times = {"dense": 4.0, "sparse": 1.0, "dense_again": 5.0}
    monkeypatch.setattr(harness, "time_quantiles_ms", lambda fn, min_reps=5: {"p20_ms": 0.0, "p50_ms": times[fn()], "p80_ms": 9.0})
    made = []

    def make_dense():
        made.append(1)
        return lambda: "dense"

    key = ("case",)
    sparse = harness.measure_vs_dense(lambda: "sparse", make_dense, key, 2e9, 100.0)
    assert sparse["speedup_vs_dense"] == 4.0 and sparse["dense_p50_ms"] == 4.0 and made == [1]
    assert sparse["useful_tflops"] == pytest.approx(2e9 / 1e-3 / 1e12) and sparse["pct_of_peak"] == pytest.approx(2.0)
    assert harness.measure_vs_dense(lambda: "sparse", make_dense, key, None, 100.0)["speedup_vs_dense"] == 4.0
    assert made == [1]  # dense measured once per key
    # The dense provider is its own reference, even when the key was measured before with another time.
    dense = harness.measure_vs_dense(lambda: "dense_again", make_dense, key, 1e9, 100.0, is_dense=True)
    assert dense["speedup_vs_dense"] == 1.0 and dense["dense_p50_ms"] == 5.0 and made == [1]


def test_warm_up_skips_foreign_providers_only(harness):
    from torch._dynamo.exc import TorchDynamoException
    from triton.runtime.errors import OutOfResources

    assert "torch_semi_structured" in harness.FOREIGN_PROVIDERS

    def failing(error):
        def make():
            raise error

        return make

    out_of_resources = OutOfResources(262144, 232448, "shared memory")
    for provider, error in [
        ("torch_semi_structured", RuntimeError("original_tensor.dtype torch.float32 is not a supported dtype")),
        ("cusparselt", out_of_resources),
        ("torch_bsr", TorchDynamoException("backend compiler failed")),
        ("torch_semi_structured", NotImplementedError("")),  # an empty message must not break the skip
    ]:
        with pytest.raises(pytest.skip.Exception, match=f"{provider} cannot run forward: {type(error).__name__}"):
            harness.warmed_up(provider, "forward", failing(error))
    for provider in ("lotus", "dense", "auto"):
        with pytest.raises(OutOfResources):
            harness.warmed_up(provider, "forward", failing(out_of_resources))
        with pytest.raises(TorchDynamoException):
            harness.warmed_up(provider, "forward", failing(TorchDynamoException("x")))
    with pytest.raises(KeyError):  # not an "unsupported case" error: a harness bug, even for a foreign provider
        harness.warmed_up("cusparselt", "forward", failing(KeyError("x")))
    calls = []
    fn = harness.warmed_up("lotus", "forward", lambda: lambda: calls.append(1))
    fn()
    assert calls == [1, 1]  # called once to warm up, then by the caller


# ---------------------------------------------------------------------------
# bench/bench_vit.py
# ---------------------------------------------------------------------------

# vit_micro_cifar by hand: 32x32 images, 4x4 patches -> 64 patches + CLS = 65 tokens, width 64, depth 2,
# MLP 256, 10 classes. Patch embedding 2*64*(3*4*4*64); per block qkv+proj+fc1+fc2 2*T*64*(192+64+256+256)
# and attention 4*T^2*64; head 2*64*10.
EMBED, HEAD = 2 * 64 * 3072, 2 * 64 * 10


def _micro_flops(tokens: int, mlp_density: float = 1.0) -> int:
    linears = 2 * tokens * 64 * (192 + 64 + mlp_density * (256 + 256))
    return EMBED + 2 * (linears + 4 * tokens**2 * 64) + HEAD


def test_vit_flops_of_the_micro_preset_by_hand(vit):
    dense = _micro_flops(65)
    assert dense == 15_337_216
    net = vit.base_model("vit_micro_cifar")
    assert vit.vit_flops(net) == (dense, dense)
    assert vit.vit_flops(net, keep_ratio=0.5) == (_micro_flops(1 + 32), dense)  # ceil(0.5 * 64) patches kept
    sparse = vit.build_variant("vit_micro_cifar", vit.MLP_2TO4, "cpu", torch.float32)
    assert vit.vit_flops(sparse) == (_micro_flops(65, mlp_density=0.5), dense) == (11_077_376, dense)


def test_grids_hold_the_targets_compile_on_cpu_and_train_at_256(vit):
    def names(grid, model, workload, batch, compile_mode="eager"):
        return {v.name for m, w, b, c, v in grid if (m, w, b, c) == (model, workload, batch, compile_mode)}

    for full in (False, True):
        grid = vit.make_grid(cuda=True, full=full)
        models = [case[0] for case in grid]
        assert models == sorted(models, key=models.index)  # one model's cases together
        for workload in ("infer", "train"):
            assert {"dense", "2to4mlp+keep0.5", "block0.5-blk64-mlp", "block0.5-blk64-mlp+keep0.5"} <= names(grid, "vit_b16_224", workload, 256)
    block_mlp = {v for *_, v in vit.make_grid(cuda=True, full=False) if v.name == "block0.5-blk64-mlp+keep0.5"}
    assert block_mlp == {vit.Variant("block0.5-blk64-mlp+keep0.5", "block", 0.5, 64, mlp_only=True, keep_ratio=0.5)}
    # Like 2to4mlp, only fc1/fc2 are sparse (block size 64 divides ViT-B's 768 and 3072).
    net = vit.build_variant("vit_micro_cifar", vit.MLP_BLOCK50, "cpu", torch.float32)
    sparse = sorted(name for name, m in net.named_modules() if type(m).__name__ == "SparseLinear")
    assert sparse == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    cpu = vit.make_grid(cuda=False, full=False)
    assert names(cpu, "vit_micro_cifar", "infer", 1, "compile") == {"dense", "2to4mlp+keep0.5"}


def test_every_target_is_measured_by_the_default_cuda_grid(vit):
    """Each bench_report target finds its variant, and the dense of the same case, among the default CUDA cases."""
    grid = vit.make_grid(cuda=True, full=False)
    for target in [t for t in bench_report.TARGETS if t.group == "vit_e2e"]:
        where = dict(target.where)
        cases = [v for m, w, b, c, v in grid if (m, w, b, c) == (where["model"], where["workload"], where["batch"], "eager")]
        assert vit.DENSE in cases, target.name
        extra = [{"pattern": v.pattern, "sparsity": v.sparsity, "mlp_only": v.mlp_only, "keep_ratio": v.keep_ratio} for v in cases]
        for label, wanted in target.variants:
            assert any(all(bench_report._same(e.get(k), value) for k, value in wanted) for e in extra), (target.name, label)


# ---------------------------------------------------------------------------
# bench/run_gpu.sh (no GPU: only the steps that read and write files, or a fake python)
# ---------------------------------------------------------------------------

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_gpu(out: Path, *steps: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", "bench/run_gpu.sh", str(out), *steps], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def steps_of(out: Path) -> dict[str, int]:
    return {line.split()[0]: int(line.split()[1][3:]) for line in (out / "steps.txt").read_text().splitlines()}


@needs_bash
def test_run_gpu_script_parses():
    assert subprocess.run(["bash", "-n", "bench/run_gpu.sh"], cwd=ROOT, capture_output=True).returncode == 0


@needs_bash
def test_run_gpu_report_and_compare_steps(tmp_path):
    out, baselines = tmp_path / "gpu-run", tmp_path / "baselines"
    out.mkdir()
    baselines.mkdir()
    write(out / "bench-vit.json", kernel_and_vit_run())
    write(out / "info.json", {"versions": {"torch": "x"}})  # what the info step leaves: not a bench-*.json
    result = run_gpu(out, "report", "compare", BENCH_BASELINE_DIR=str(baselines))
    assert result.returncode == 0, result.stdout + result.stderr
    assert steps_of(out) == {"report": 0, "compare": 0}
    report = (out / "bench_report.md").read_text()
    assert "bench-vit.json" in report and "## Targets" in report and "## vit_e2e" in report
    assert (out / "vit_e2e_vit_b16_224.png").is_file()
    assert "no baseline, nothing to compare" in (out / "compare.log").read_text()

    # A committed run of the same device and benchmarks, 30% faster than this one: the compare step fails.
    old = kernel_and_vit_run()
    for bench in old["benchmarks"]:
        bench["stats"]["median"] /= 1.3
        if "p50_ms" in bench["extra_info"]:
            bench["extra_info"]["p50_ms"] /= 1.3
    (baselines / "gpu-old").mkdir()
    write(baselines / "gpu-old" / "bench-vit.json", old)
    result = run_gpu(out, "compare", BENCH_BASELINE_DIR=str(baselines))
    assert result.returncode == 1
    log = (out / "compare.log").read_text()
    assert "REGRESSION" in log and "gpu-old/bench-vit.json" in log


@needs_bash
def test_run_gpu_report_without_benchmarks_fails_clearly(tmp_path):
    result = run_gpu(tmp_path, "report")
    assert result.returncode == 1
    assert "no bench-*.json in" in (tmp_path / "report.log").read_text()


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: info prints JSON with a warning on stderr; pytest prints its arguments, one a line.
case "$1 $2" in
  "-m lotus_kernels.info") echo '{"cuda_devices": []}'; echo "UserWarning: no GPU" >&2 ;;
  "-m pytest") shift 2; printf 'ARG %s\\n' "$@" ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


@needs_bash
def test_run_gpu_info_keeps_stderr_apart_and_bench_args_reach_pytest(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    result = run_gpu(out, "info", "bench-vit", PYTHON=str(fake), REAL_PYTHON=sys.executable, BENCH_ARGS='-k "vit_b16_224 and infer" -x')
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "info.json").read_text()) == {"cuda_devices": []}
    assert "no GPU" in (out / "info.err").read_text()
    args = [line[4:] for line in (out / "bench-vit.log").read_text().splitlines() if line.startswith("ARG ")]
    assert args[0] == "bench/bench_vit.py" and args[-3:] == ["-k", "vit_b16_224 and infer", "-x"]


LAYER_BENCHES = {  # group -> (file, the row keys of its case parameters)
    "block_sparse_matmul": ("bench_block_sparse_matmul.py", ("model", "layer", "batch", "dtype", "density", "block")),
    "semi_structured_matmul": ("bench_semi_structured_matmul.py", ("model", "layer", "batch", "dtype")),
    "patch_drop_attention": ("bench_patch_drop_attention.py", ("model", "tokens", "batch", "keep_ratio")),
}


def test_the_headline_grids_measure_every_target(harness, monkeypatch):
    """lotus gpu-check runs each bench file's headline grid: every target finds its rows there (on CUDA), with the
    provider it is compared with, for each layer / batch it is judged per."""
    monkeypatch.setenv("LOTUS_BENCH_GRID", "headline")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for group, (file, keys) in LAYER_BENCHES.items():
        module = _load(f"lotus_headline_{group}", ROOT / "bench" / file, conftest=harness)
        rows = []
        for case in module.CASES:
            values = dict(zip(keys, case.values))
            values["dtype"] = str(values.get("dtype", getattr(module, "DTYPE", None)))
            rows += [{**values, "provider": p, "mode": m} for p in module.PROVIDERS for m in ("forward", "forward_backward")]
        assert len(rows) <= 120, (group, len(rows))  # a headline, not the whole grid
        for target in [t for t in bench_report.TARGETS if t.group == group]:
            found = [r for r in rows if all(bench_report._same(r.get(k), v) for k, v in target.where)
                     and any(all(bench_report._same(r.get(k), v) for k, v in wanted) for _, wanted in target.variants)]
            assert found, target.name
            assert target.versus == "dense" or target.versus in module.PROVIDERS, target.name
            per = {tuple(r[k] for k in target.per) for r in found}
            if "layer" in target.per:
                assert {p[target.per.index("layer")] for p in per} == {"fc1", "fc2"}, target.name
    vit_grid = _load("lotus_headline_vit", ROOT / "bench" / "bench_vit.py", conftest=harness).GRID
    assert len(vit_grid) == 12 and {(m, w, b, c) for m, w, b, c, _ in vit_grid} == {("vit_b16_224", w, 256, "eager") for w in ("infer", "train")}
