"""Record `lotus train` runs as a bench/results JSON: one run per seed, with the
device, versions, date, the exact command and each run's metrics.

    python bench/record_train.py --out bench/results/train-quick-synthetic-tiny-cpu-DATE.json \
        --seeds 0 1 2 --what "..." -- --data synthetic --preset tiny

Everything after ``--`` goes to ``lotus train`` unchanged (``--seed`` is set
per run with ``--set seed=N``; each run writes to a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lotus_kernels.info import environment


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: record_train.py --out FILE.json [--seeds N ...] [--what TEXT] -- LOTUS_TRAIN_ARGS ...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--what", default="", help="one line: what the runs show")
    args = parser.parse_args(argv[:split])
    train_args = argv[split + 1:]

    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "lotus_kernels", "train", *train_args, "--set", f"seed={seed}", "--set", "progress=false", "--out", tmp, "--overwrite"]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                sys.stderr.write(done.stdout + done.stderr)
                return done.returncode
            metrics = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
            config = json.loads((Path(tmp) / "config.json").read_text())
        final = metrics[-1]
        print(f"seed {seed}: test_acc {final.get('test_acc')}, wall {wall:.1f} s", flush=True)
        runs.append({"seed": seed, "wall_s": round(wall, 1), "final_test_acc": final.get("test_acc"), "config": config, "metrics": metrics})

    accs = [r["final_test_acc"] for r in runs if r["final_test_acc"] is not None]
    record = {
        "what": args.what,
        **environment("cuda" if torch.cuda.is_available() else "cpu"),
        "command": "lotus train " + shlex.join(train_args) + "  (per seed: --set seed=N --set progress=false)",
        "recorded_by": "python bench/record_train.py " + shlex.join(argv),
        "note": "wall_s: the whole command (interpreter start, data, training, evaluation, checkpoints)",
        "summary": {"final_test_acc_min": min(accs), "final_test_acc_max": max(accs), "wall_s_max": max(r["wall_s"] for r in runs)} if accs else {},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
