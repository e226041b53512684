"""Builds lotus_kernels._C, the mask-compaction extension.

Whether the CUDA sources are compiled is decided from the toolkit, never from
torch.cuda.is_available(): build machines commonly have nvcc and no GPU, and
must still produce the CUDA kernels.

Environment:
  LOTUS_CPU_ONLY=1        build the CPU ops alone
  LOTUS_SANITIZE=1        CPU ops alone, with AddressSanitizer + UndefinedBehaviorSanitizer
                          (-O1 -g; `make sanitize` builds this into build/sanitize and runs
                          the compaction tests and the fuzz module against it)
  FORCE_CUDA=1            compile CUDA even if no toolkit was detected (fails loudly without one)
  CUDA_HOME               the toolkit; when unset, the one owning `nvcc` on PATH, or /usr/local/cuda
  TORCH_CUDA_ARCH_LIST    arches to compile for; default "8.0;9.0" (A100, H100/H200)
  MAX_JOBS                parallel compile jobs; default capped by free memory
"""

import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"
# A translation unit that includes torch headers peaks near 2 GB in cc1plus/cicc.
GB_PER_COMPILE_JOB = 2.5


def _flag(name):
    return os.environ.get(name) == "1"


def _find_cuda_home():
    """CUDA_HOME / CUDA_PATH, else the first toolkit found that has its headers.

    torch's own guess is dirname(dirname(which nvcc)), which gives /usr/local
    when /usr/local/bin/nvcc is a link or a wrapper script into
    /usr/local/cuda-13.0/bin; a candidate only counts if it holds
    include/cuda_runtime.h.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _available_memory_gb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def _cap_compile_jobs():
    if os.environ.get("MAX_JOBS"):
        return
    jobs = os.cpu_count() or 1
    mem = _available_memory_gb()
    if mem is not None:
        jobs = max(1, min(jobs, int(mem // GB_PER_COMPILE_JOB)))
    os.environ["MAX_JOBS"] = str(jobs)


def _extensions():
    if _flag("LOTUS_SANITIZE"):
        # The sanitizers instrument host code; the CUDA kernels stay out (a separate build).
        os.environ["LOTUS_CPU_ONLY"] = "1"
    cuda_home = None if _flag("LOTUS_CPU_ONLY") else _find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads
        # CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = (
        not _flag("LOTUS_CPU_ONLY")
        and torch.version.cuda is not None
        and (cuda_home is not None or _flag("FORCE_CUDA"))
    )
    if _flag("LOTUS_SANITIZE"):
        why = "LOTUS_SANITIZE=1 (ASan + UBSan)"
    elif _flag("LOTUS_CPU_ONLY"):
        why = "LOTUS_CPU_ONLY=1"
    elif torch.version.cuda is None:
        why = f"torch {torch.__version__} was built without CUDA"
    else:
        why = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"

    arch_list = ""
    if with_cuda:
        arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    _cap_compile_jobs()
    print(
        f"lotus_kernels: building _C with CUDA ({cuda_home}; arches {arch_list}; MAX_JOBS={os.environ['MAX_JOBS']})"
        if with_cuda
        else f"lotus_kernels: building _C for CPU only: {why}"
    )

    sources = ["csrc/module.cpp", "csrc/mask_compaction.cpp"]
    macros = [
        ("LOTUS_TORCH_VERSION", f'"{torch.__version__}"'),
        ("LOTUS_CUDA_ARCH_LIST", f'"{arch_list}"'),
    ]
    # No -std flag: cpp_extension picks the standard its torch headers need
    # (C++17 for torch 2.11, C++20 for newer releases).
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if _flag("LOTUS_SANITIZE"):
        # Every report is fatal (no recovery), so a test run fails on the first one.
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        cxx_flags = ["-O1", "-g", "-fopenmp", *sanitize]
        link_flags = ["-fopenmp", *sanitize]
    if not with_cuda:
        return [
            CppExtension(
                "lotus_kernels._C",
                sources,
                define_macros=macros,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
                include_dirs=[os.path.join(ROOT, "csrc")],
            )
        ]
    return [
        CUDAExtension(
            "lotus_kernels._C",
            sources + ["csrc/cuda/mask_compaction.cu"],
            define_macros=macros + [("LOTUS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
            include_dirs=[os.path.join(ROOT, "csrc")],
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
