"""LOTUS_AUTOTUNE: how many configs each Triton kernel tunes over (full / quick / off), keyed by shape class.

The compiled (autotuned) kernels exist only with TRITON_INTERPRET=0, so they
are inspected in a subprocess; building an autotuner needs no GPU.
"""

import os
import subprocess
import sys

import pytest

from lotus_kernels.backends import rows_bucket

INSPECT = """
from lotus_kernels.kernels import block_sparse_matmul as k, patch_drop_attention as a
for name, f in (("matmul", k._matmul), ("sdd", k._sdd), ("fwd", a._fwd), ("dkdv", a._bwd_dkdv), ("dq", a._bwd_dq)):
    print(name, len(f.configs), ",".join(f.keys), [str(c) for c in f.configs][0].replace(" ", ""))
"""


def autotuners(mode: str) -> dict[str, tuple[int, str, str]]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "LOTUS_AUTOTUNE": mode}
    done = subprocess.run([sys.executable, "-c", INSPECT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return {name: (int(n), keys, first) for name, n, keys, first in (line.split(" ", 3) for line in done.stdout.splitlines())}


def test_full_quick_and_off_tune_over_all_a_few_and_one_config():
    from lotus_kernels.kernels import _common
    from lotus_kernels.kernels import block_sparse_matmul as k
    from lotus_kernels.kernels import patch_drop_attention as a

    full, quick, off = autotuners("full"), autotuners("quick"), autotuners("off")
    sizes = {"matmul": (k._MATMUL_CONFIGS, k._MATMUL_QUICK, k._MATMUL_OFF), "sdd": (k._SDD_CONFIGS, k._SDD_QUICK, k._SDD_OFF),
             "fwd": (a._FWD_CONFIGS, a._FWD_QUICK, a._FWD_OFF), "dkdv": (a._BWD_CONFIGS, a._BWD_QUICK, a._BWD_OFF),
             "dq": (a._BWD_CONFIGS, a._BWD_QUICK, a._BWD_OFF)}
    for name, (configs, chosen, single) in sizes.items():
        assert len(set(chosen)) == len(chosen) and all(0 <= i < len(configs) for i in chosen), name
        assert (full[name][0], quick[name][0], off[name][0]) == (len(configs), len(chosen), 1), name
        assert quick[name][2] == str(configs[chosen[0]]).replace(" ", ""), name
        # "off" (the test suite's) runs the smallest tile: it fits everywhere and compiles fastest.
        area = [c.kwargs["BLOCK_M"] * c.kwargs.get("BLOCK_N", 1) for c in configs]
        assert off[name][2] == str(configs[single]).replace(" ", "") and area[single] == min(area), name
    # Keyed by shape class: the stored-block count enters as a power-of-two bucket, never exactly.
    assert full["matmul"][1] == "M_BUCKET,N,K,NNZ_BUCKET,BH,BW,TRANSPOSED,ACTIVATION"
    assert full["sdd"][1] == "M_BUCKET,NNZ_BUCKET,SPLITS,BH,BW" and full["fwd"][1] == "K_BUCKET,BLOCK_D,CLS,IDENTITY"
    assert _common.bucket is rows_bucket and [rows_bucket(n) for n in (1, 2, 3, 58, 64, 65)] == [1, 2, 4, 64, 64, 128]


@pytest.mark.parametrize("mode", ["full", "quick", "off"])
def test_autotune_configs_by_mode(monkeypatch, mode):
    from lotus_kernels.kernels import _common

    monkeypatch.setattr(_common, "AUTOTUNE", mode)
    configs = ["a", "b", "c", "d"]
    assert _common.autotune_configs(configs, (2, 0), 3) == {"full": configs, "quick": ["c", "a"], "off": ["d"]}[mode]


def test_a_bad_mode_is_a_named_error():
    env = {**os.environ, "TRITON_INTERPRET": "0", "LOTUS_AUTOTUNE": "fastest"}
    done = subprocess.run([sys.executable, "-c", "import lotus_kernels.kernels.block_sparse_matmul"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and "LOTUS_AUTOTUNE must be one of ('full', 'quick', 'off'), got 'fastest'" in done.stderr
    # Importing the package itself never fails: the kernels are imported when they first run.
    done = subprocess.run([sys.executable, "-c", "import lotus_kernels"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
