"""The gpu-check runner: steps in priority order, each in its own process under a deadline carved from one budget.

Budget rules (all in seconds of wall time, from the start of ``run``):
- a step runs only if at least its ``min_s`` is left (after ``RESERVE_S``
  kept for writing the summary); otherwise it is listed as skipped, with why;
- its deadline is the smaller of its ``max_s`` and what is left; the step's
  process learns it as ``LOTUS_DEADLINE`` (wall-clock epoch seconds, a grace
  before the hard limit) so a test or benchmark session stops starting new
  cases in time, and at the hard limit the whole process group is killed
  (SIGTERM, then SIGKILL): the step is "timeout", and what it wrote stays.

Isolation: a step is a subprocess in a new session (process group). An
illegal instruction, a segfault or an exception fails that step alone
("crashed" with the signal's name, or "failed" with its exit code); the next
step starts on a fresh CUDA context. Per step the runner records status,
exit code, seconds, deadline and the last lines of its output.

Files: only the names in ``OUTPUT_FILES`` are ever written into the output
folder (``MAX_FILES`` is what a lease returns); ``gpu_check.json`` and
``summary.md`` are rewritten after every step, so whatever ends the run, the
folder describes what was done.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

OUTPUT_FILES = ("summary.md", "gpu_check.json", "cases.jsonl", "tests.jsonl", "steps.log")
MAX_FILES = 8  # what one device call returns
assert len(OUTPUT_FILES) <= MAX_FILES
RESERVE_S = 5.0  # kept back from the budget for the last summary
KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL of a step that overran
LOG_TAIL_LINES = 20
STATUSES = ("passed", "failed", "crashed", "timeout", "skipped")


@dataclass
class Context:
    """What a step's ``prepare`` may look at: where things are, and what earlier steps found."""

    out: Path
    python: str
    root: Path | None  # the source checkout (bench/, tests/), None when installed without one
    device: str  # "cuda" or "cpu"
    resume: bool
    results: dict[str, StepResult] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # set by earlier steps for every later one (Step.after)


@dataclass(frozen=True)
class Command:
    """What a step runs: argv, with these variables added to the environment (for this step only)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One isolated step: ``prepare(ctx)`` gives the command, or a string saying why the step is skipped."""

    name: str
    description: str
    prepare: Callable[[Context], Command | str]
    min_s: float  # skipped when less than this is left
    max_s: float | None = None  # deadline at most this long (None: all that is left)
    after: Callable[[Context, StepResult], None] | None = None  # e.g. turn a crashing backend off for later steps


@dataclass
class StepResult:
    name: str
    status: str  # one of STATUSES
    seconds: float = 0.0
    returncode: int | None = None
    deadline_s: float | None = None
    reason: str = ""
    log_tail: list[str] = field(default_factory=list)


def output_path(out: Path, name: str) -> Path:
    """The path of one of the output files; any other name is refused (the folder holds at most MAX_FILES)."""
    if name not in OUTPUT_FILES:
        raise ValueError(f"gpu-check writes only {OUTPUT_FILES} into its folder, not {name!r}")
    return Path(out) / name


def source_root() -> Path | None:
    """The repository this package runs from (it has bench/ and tests/), or None for an installed copy."""
    root = Path(__file__).resolve().parents[4]  # lotus_kernels/recipe/tools/gpu_check/runner.py
    return root if (root / "bench" / "conftest.py").is_file() and (root / "tests").is_dir() else None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line cut short by a killed writer (or any unparsable line) is left out."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def append_jsonl(path: Path, record: dict) -> None:
    """One record as one line, flushed to disk before returning: a crash right after loses nothing written."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _tail(log: Path, offset: int) -> list[str]:
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    return [line[:300] for line in text.splitlines()[-LOG_TAIL_LINES:]]


def run_isolated(name: str, argv: list[str], env: dict[str, str], limit_s: float, log: Path, cwd: Path | None) -> StepResult:
    """Run argv in its own process group, output appended to log, killed at limit_s: the step's result."""
    grace = min(15.0, 0.1 * limit_s)
    env = {**env, "LOTUS_DEADLINE": f"{time.time() + limit_s - grace:.3f}", "LOTUS_STEP": name, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"\n===== {name}: {' '.join(argv)} (deadline {limit_s:.0f} s)\n".encode())
        f.flush()
        offset = f.tell()
        try:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        except OSError as e:
            return StepResult(name, "failed", reason=f"could not start: {e}", deadline_s=limit_s)
        timed_out = False
        try:
            returncode = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            returncode = proc.returncode
        except KeyboardInterrupt:
            _kill_group(proc)
            raise
    seconds = time.monotonic() - start
    result = StepResult(name, "passed", round(seconds, 2), returncode, round(limit_s, 1), log_tail=_tail(log, offset))
    if timed_out:
        result.status, result.reason = "timeout", f"killed at its deadline ({limit_s:.0f} s)"
    elif returncode < 0:
        result.status, result.reason = "crashed", f"killed by {_signal_name(returncode)}"
    elif returncode != 0:
        result.status, result.reason = "failed", f"exit code {returncode}"
    return result


def run(
    out,
    *,
    budget: float = 480.0,
    steps: Sequence[str] | None = None,
    table: Sequence[Step] | None = None,
    python: str | None = None,
    device: str | None = None,
    resume: bool = False,
    command: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> list[StepResult]:
    """Run the steps (names from ``table``, default ``steps.STEPS``; all of them when ``steps`` is None) in
    table order within ``budget`` seconds; write the output folder; return one result per step chosen.

    resume: keep the folder's earlier cases and test outcomes (the tests step skips tests that passed);
    otherwise the folder's output files are replaced.
    """
    from . import summary

    if table is None:
        from .steps import STEPS as table
    names = [s.name for s in table]
    chosen = list(names) if steps is None else list(steps)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ValueError(f"steps must be among {names}, got unknown {unknown}")
    if not budget > 0:
        raise ValueError(f"budget must be a positive number of seconds, got {budget!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; gpu-check needs a folder")
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES and not p.name.startswith("."))
    if foreign:
        raise ValueError(f"--out {out} holds files gpu-check did not write ({', '.join(foreign[:5])}); use an empty folder")
    if not resume:
        for name in OUTPUT_FILES:
            output_path(out, name).unlink(missing_ok=True)
    echo = echo or (lambda line: print(line, flush=True))
    ctx = Context(out, python or sys.executable, source_root(), device or default_device(), resume)
    doc = {
        "command": command or " ".join(sys.argv),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": budget,
        "device_kind": ctx.device,
        "steps_all": names,
        "steps_chosen": chosen,
        "steps": [],
    }
    start = time.monotonic()
    log = output_path(out, "steps.log")
    base_env = dict(os.environ)
    base_env["TRITON_INTERPRET"] = "0" if ctx.device == "cuda" else "1"
    results: list[StepResult] = []
    try:
        for step in table:
            if step.name not in chosen:
                continue
            left = budget - (time.monotonic() - start) - RESERVE_S
            result = None
            if left < step.min_s:
                result = StepResult(step.name, "skipped", reason=f"budget: {max(left, 0):.0f} s left, the step needs at least {step.min_s:.0f} s")
            else:
                prepared = step.prepare(ctx)
                if isinstance(prepared, str):
                    result = StepResult(step.name, "skipped", reason=prepared)
                else:
                    limit = left if step.max_s is None else min(step.max_s, left)
                    echo(f"gpu-check: {step.name} ({step.description}), deadline {limit:.0f} s")
                    result = run_isolated(step.name, prepared.argv, {**base_env, **ctx.env, **prepared.env}, limit, log, ctx.root)
            ctx.results[step.name] = result
            if step.after is not None:
                step.after(ctx, result)
            results.append(result)
            echo(f"gpu-check: {step.name}: {result.status}" + (f" ({result.reason})" if result.reason else "") + f", {result.seconds:.0f} s")
            doc["steps"] = [dataclasses.asdict(r) for r in results]
            doc["elapsed_s"] = round(time.monotonic() - start, 1)
            doc["env_for_later_steps"] = dict(ctx.env)
            _finish(out, doc, summary)
    finally:
        doc["steps"] = [dataclasses.asdict(r) for r in results]
        doc["elapsed_s"] = round(time.monotonic() - start, 1)
        _finish(out, doc, summary)
    return results


def _finish(out: Path, doc: dict, summary) -> None:
    """gpu_check.json (the run, every case and test outcome so far) and summary.md, rewritten whole."""
    doc = {**doc, "cases": read_jsonl(output_path(out, "cases.jsonl")), "tests": read_jsonl(output_path(out, "tests.jsonl"))}
    _write_atomic(output_path(out, "gpu_check.json"), json.dumps(doc, indent=1, default=str) + "\n")
    _write_atomic(output_path(out, "summary.md"), summary.render(doc))
