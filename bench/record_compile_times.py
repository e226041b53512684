"""Record how long Triton takes to compile our kernels ahead of time for sm_90, per tile: where a GPU lease's
compile time goes, measured without a GPU (triton.compile for a target needs none).

    python bench/record_compile_times.py --out bench/results/aot-compile-times-sm90-cpu-2026-12-01.json

For each kernel (block-sparse matmul forward, block-sparse dW, patch-drop
attention forward and the two backward kernels) and dtype / dot precision,
it compiles the tile LOTUS_AUTOTUNE=off runs (the smallest) and the largest
tile of the full config list, each in a fresh Triton cache, and records the
seconds and the shared memory the kernel needs. The machine's load average
is recorded too: compile time is CPU time, and a busy machine stretches it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path


def _tile(config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs.get("BLOCK_N"), config.num_warps, config.num_stages)


def cases():
    """(kernel name, dtype, precision, which tile, kernel, signature, constexprs, options) to compile."""
    from lotus_kernels.kernels import block_sparse_matmul as bsm
    from lotus_kernels.kernels import patch_drop_attention as pda

    def area(c):
        return c.kwargs["BLOCK_M"] * c.kwargs.get("BLOCK_N", 1)

    out = []
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        # Block-sparse forward (64x64 blocks, bias, GELU) and dW.
        ptrs = ["x_ptr", "values_ptr", "crow_ptr", "col_ptr", "source_ptr", "row_order_ptr", "bias_ptr", "y_ptr", "pre_ptr"]
        sig = {p: "*i64" if p in ("crow_ptr", "col_ptr", "source_ptr", "row_order_ptr") else f"*{dtype}" for p in ptrs}
        sig.update({n: "i32" for n in ("M", "stride_xm", "stride_xk", "stride_ym", "stride_yn", "M_BUCKET", "N", "K", "NNZ_BUCKET")})
        const = {"BH": 64, "BW": 64, "TRANSPOSED": False, "HAS_BIAS": True, "ACTIVATION": 1, "STORE_PRE": True,
                 "INPUT_PRECISION": precision, "INTERPRETED": False}
        for which, config in (("off", bsm._MATMUL_CONFIGS[bsm._MATMUL_OFF]), ("largest", max(bsm._MATMUL_CONFIGS, key=area))):
            out.append(("block_sparse_matmul", dtype, precision, which, bsm._bsr_matmul_kernel, sig, {**const, "BLOCK_M": config.kwargs["BLOCK_M"]}, config))
        sig = {"dy_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "row_ptr": "*i64", "col_ptr": "*i64", "dvalues_ptr": f"*{dtype}"}
        sig.update({n: "i32" for n in ("M", "M_PER_SPLIT", "stride_dym", "stride_dyn", "stride_xm", "stride_xk", "NNZ", "M_BUCKET", "NNZ_BUCKET", "SPLITS")})
        const = {"BH": 64, "BW": 64, "INPUT_PRECISION": precision, "INTERPRETED": False}
        for which, config in (("off", bsm._SDD_CONFIGS[bsm._SDD_OFF]), ("largest", max(bsm._SDD_CONFIGS, key=area))):
            out.append(("block_sparse_sdd", dtype, precision, which, bsm._bsr_sdd_kernel, sig, {**const, "BLOCK_M": config.kwargs["BLOCK_M"]}, config))
        # Patch-drop attention at head_dim 64 (ViT-B).
        qkv = ["stride_b", "stride_n", "stride_3", "stride_h", "stride_d", "stride_ib", "stride_ik"]

        def ptr(name):
            return "*i32" if name in ("idx_ptr", "count_ptr") else "*fp32" if name in ("lse_ptr", "cls_ptr", "delta_ptr") else f"*{dtype}"

        fwd_sig = {p: ptr(p) for p in ("qkv_ptr", "idx_ptr", "count_ptr", "out_ptr", "lse_ptr", "cls_ptr")}
        fwd_sig.update({n: "i32" for n in ["H", "K", *qkv, "stride_ob", "stride_ok", "stride_oh", "stride_od"]})
        fwd_sig.update({"qk_scale": "fp32", "K_BUCKET": "i32"})
        bwd_sig = {p: ptr(p) for p in ("qkv_ptr", "idx_ptr", "count_ptr", "do_ptr", "lse_ptr", "delta_ptr", "dqkv_ptr")}
        bwd_sig.update({n: "i32" for n in ["H", "K", *qkv, "stride_dob", "stride_dok", "stride_doh", "stride_dod",
                                           "stride_gb", "stride_gn", "stride_g3", "stride_gh", "stride_gd"]})
        bwd_sig.update({"qk_scale": "fp32", "sm_scale": "fp32", "K_BUCKET": "i32"})
        head = {"D": 64, "BLOCK_D": pda._block_d(64), "INPUT_PRECISION": precision, "INTERPRETED": False, "IDENTITY": False}
        for name, kernel, configs, off, sig, extra in (
            ("patch_drop_attention_fwd", pda._pda_fwd_kernel, pda._FWD_CONFIGS, pda._FWD_OFF, fwd_sig, {"CLS": True, "NUM_PREFIX": 1}),
            ("patch_drop_attention_dkdv", pda._pda_bwd_dkdv_kernel, pda._BWD_CONFIGS, pda._BWD_OFF, bwd_sig, {}),
            ("patch_drop_attention_dq", pda._pda_bwd_dq_kernel, pda._BWD_CONFIGS, pda._BWD_OFF, bwd_sig, {}),
        ):
            for which, config in (("off", configs[off]), ("largest", max(configs, key=area))):
                const = {**head, **extra, "BLOCK_M": config.kwargs["BLOCK_M"], "BLOCK_N": config.kwargs["BLOCK_N"]}
                out.append((name, dtype, precision, which, kernel, sig, const, config))
    return out


def compile_seconds(kernel, sig, const, config, arch: int) -> tuple[float, int]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**sig, **{name: "constexpr" for name in const}}
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs=const), target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    return time.perf_counter() - start, int(compiled.metadata.shared)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton

    from lotus_kernels.info import environment

    load_before = os.getloadavg()
    rows = []
    for name, dtype, precision, which, kernel, sig, const, config in cases():
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # a cold compile every time
            seconds, shared = compile_seconds(kernel, sig, const, config, args.arch)
        rows.append({"kernel": name, "dtype": dtype, "precision": precision, "tile": which, "config": list(_tile(config)),
                     "seconds": round(seconds, 2), "shared_bytes": shared})
        print(json.dumps(rows[-1]), flush=True)
    record = {
        "what": f"cold ahead-of-time Triton compile of each kernel for sm_{args.arch}, the LOTUS_AUTOTUNE=off tile vs the largest",
        **environment("cpu"),
        "triton": triton.__version__, "torch": torch.__version__,
        "command": "python bench/record_compile_times.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "note": "CPU time on the machine named; a GPU machine's faster cores compile faster, the ratios carry over",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
