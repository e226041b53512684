"""``lotus gpu-check``: what this project must learn from a short GPU lease, in priority order, crash-isolated.

A GPU is lent for minutes at a time (15 minutes of device time in all, at
most 10 per command), and one CUDA fault (an illegal instruction in a
library) kills every later CUDA call of its process. So the check is a list
of steps in priority order, each run in its own subprocess under its own
deadline carved from one budget:

    build (only if the extension is not built)
    env            environment and measured peaks (bf16 8192^3 matmul, copy bandwidth)
    speed-block    block-sparse linear vs cuBLAS dense and torch BSR       (bench/, headline grid)
    speed-attn     patch-drop attention vs full SDPA and gather + SDPA     (bench/, headline grid)
    cusparselt     each cuSPARSELt call configuration probed in its own process
    speed-2to4     2:4 linear vs dense, torch semi-structured, ours, "auto" (bench/, headline grid)
    speed-vit      ViT-B/16 batch 256 inference and training step, dense vs LOTUS variants
    correctness    the fast tier: every op forward and backward, fp16/bf16 awkward shapes, fp32 once
    correctness-cusparselt   the same for cuSPARSELt, apart
    speed-train    the fast profile's training step (compiled, CUDA graphs) and evaluation, images/s  (bench/, headline grid)
    tests          the whole test suite (resumable: --resume skips what passed)
    cifar10        the fast training profile on CIFAR-10 (when the data is there), up to the step's deadline
    lotus-table    the LOTUS pipeline on CIFAR-10 from the fast profile's dense run (dense, tickets vs random,
                   Essential Sparsity, Instant Soup to 50 %, 2:4), up to the step's deadline

Everything lands in one folder of at most eight files (a lease returns
eight): ``summary.md`` (one page: steps, targets pass / fail / pending,
headline speedups, cuSPARSELt configurations, failed tests), ``gpu_check.json``
(all of it, rewritten after every step), ``cases.jsonl`` (one line per
measured case, written as it is measured: a step killed at its deadline
keeps what it measured), ``tests.jsonl`` (one line per test outcome) and
``steps.log`` (every step's output). See ``runner`` for the budget rules and
``steps`` for what each step runs.
"""

from .runner import MAX_FILES, OUTPUT_FILES, StepResult, run

__all__ = ["MAX_FILES", "OUTPUT_FILES", "StepResult", "run"]
