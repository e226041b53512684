"""Benchmark reports and the regression guard, from pytest-benchmark JSON files.

    lotus bench-report bench/results/*.json [--out DIR]
        -> DIR/bench_report.md (one table per benchmark group: name, device,
           p50 ms, speedup vs dense, TFLOP/s, % of peak) and PNG plots:
           block_sparse_speedup.png (block_sparse_matmul: speedup vs density
           per block size), patch_drop_speedup.png (patch_drop_attention:
           speedup vs keep ratio), vit_e2e_<model>.png (bench_vit: images/s
           per variant). A plot without data is skipped, with a line saying so.
           A JSON file that is not pytest-benchmark output (demo.json,
           info.json, training records) is skipped with a note; only when no
           benchmark file remains is it an error. A "Targets" section checks
           the issue's end-to-end targets (TARGETS) against the run.
    lotus bench-report --compare OLD.json NEW.json [--threshold 0.10]
    lotus bench-report --compare NEW.json [--baseline-dir bench/results]
        -> a table of p50 per benchmark, old vs new; exit 1 if any benchmark
           is more than threshold slower. With one file the baseline is the
           newest pytest-benchmark file committed under --baseline-dir that
           ran on the same device and shares benchmarks with it. Runs from
           different devices are refused.
    lotus bench-report [--baseline-dir DIR] --compare-each NEW.json ...
        -> each file compared with its own baseline as above; a file without
           one is reported and passes (bench/run_gpu.sh's compare step).

Input is what ``pytest --benchmark-json`` writes: {"machine_info",
"commit_info", "benchmarks": [{"name", "group", "params", "stats",
"extra_info"}, ...], "datetime", "version"}; bench/conftest.py puts p20/p50/p80
(ms), speedup_vs_dense, useful_tflops, pct_of_peak and the device into
extra_info. p50 is extra_info["p50_ms"] where present, else pytest-benchmark's
median. Bad input raises BenchReportError (a ValueError) naming the file.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BenchReportError",
    "NotBenchmarkFileError",
    "NoBaselineError",
    "Comparison",
    "Target",
    "TARGETS",
    "load_run",
    "load_runs",
    "target_lines",
    "rows_of",
    "markdown_tables",
    "write_report",
    "compare_runs",
    "find_baseline",
    "compare_each",
    "run",
]

REPORT_NAME = "bench_report.md"
DEFAULT_OUT = Path("bench/results")
DEFAULT_THRESHOLD = 0.10
BLOCK_SPARSE_PLOT = "block_sparse_speedup.png"
PATCH_DROP_PLOT = "patch_drop_speedup.png"


class BenchReportError(ValueError):
    """A file that is not a readable pytest-benchmark JSON document, or runs that cannot be compared."""


class NotBenchmarkFileError(BenchReportError):
    """Valid JSON that is not pytest-benchmark output (a demo or training record): reports skip such a file.

    Missing, unreadable or malformed files and broken benchmark entries stay
    plain BenchReportErrors: those are mistakes to fix, not other kinds of result.
    """


class NoBaselineError(BenchReportError):
    """No committed run to compare with (a first run on a device): the regression guard has nothing to say."""


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


def load_run(path) -> dict:
    """The pytest-benchmark document in ``path``, checked; its path is kept under "_path"."""
    path = Path(path)
    if not path.exists():
        raise BenchReportError(f"{path} does not exist")
    if not path.is_file():
        raise BenchReportError(f"{path} is not a file")
    try:
        doc = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise BenchReportError(f"{path} is not JSON (not a text file)") from None
    except json.JSONDecodeError as e:
        raise BenchReportError(f"{path} is not JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise BenchReportError(f"{path} cannot be read: {e.strerror or e}") from None
    _check_document(doc, path)
    return {**doc, "_path": str(path)}


def load_runs(paths: Sequence) -> tuple[list[dict], list[tuple[str, str]]]:
    """(documents, skipped): the pytest-benchmark files among paths, and (path, reason) for each JSON file that is not one.

    Raises BenchReportError when no path is given, when a file is missing,
    unreadable or broken, or when no benchmark file remains (naming each
    skipped file and why).
    """
    if not paths:
        raise BenchReportError("no input files: give one or more pytest-benchmark JSON files")
    docs, skipped = [], []
    for path in paths:
        try:
            docs.append(load_run(path))
        except NotBenchmarkFileError as e:
            # `bench/results/*.json` and a run_gpu.sh folder hold demo / training / info JSON beside the benchmarks.
            skipped.append((str(path), str(e)))
    if not docs:
        raise BenchReportError("no pytest-benchmark file among the inputs: " + "; ".join(reason for _, reason in skipped))
    return docs, skipped


def _check_document(doc, path) -> None:
    def not_benchmark(reason: str) -> BenchReportError:
        return NotBenchmarkFileError(f"{path} is not a pytest-benchmark JSON file: {reason} (write one with pytest --benchmark-json=FILE)")

    if not isinstance(doc, dict):
        raise not_benchmark(f"the top level is a {type(doc).__name__}, not an object")
    missing = [key for key in ("benchmarks", "machine_info") if key not in doc]
    if missing:
        raise not_benchmark(f"no {' or '.join(repr(k) for k in missing)} key")
    if not isinstance(doc["benchmarks"], list):
        raise not_benchmark(f"'benchmarks' is a {type(doc['benchmarks']).__name__}, not a list")
    for i, bench in enumerate(doc["benchmarks"]):
        if not isinstance(bench, dict) or not isinstance(bench.get("name"), str):
            raise BenchReportError(f"{path}: benchmarks[{i}] has no 'name'")
        stats = bench.get("stats")
        if not isinstance(stats, dict) or not _is_number(stats.get("median")):
            raise BenchReportError(f"{path}: benchmarks[{i}] ({bench['name']}) has no numeric stats.median")
        if bench.get("extra_info") is not None and not isinstance(bench["extra_info"], dict):
            raise BenchReportError(f"{path}: benchmarks[{i}] ({bench['name']}) has an extra_info that is not an object")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _machine_device(doc: dict) -> str:
    info = doc.get("machine_info") or {}
    cpu = info.get("cpu") if isinstance(info.get("cpu"), dict) else {}
    return f"CPU {cpu.get('brand_raw') or info.get('machine') or 'unknown'}"


def _device(bench: dict, doc: dict) -> str:
    return (bench.get("extra_info") or {}).get("device") or _machine_device(doc)


def devices_of(doc: dict) -> tuple[str, ...]:
    """The devices a run's benchmarks ran on (sorted; usually one)."""
    return tuple(sorted({_device(b, doc) for b in doc["benchmarks"]})) or (_machine_device(doc),)


def _group(bench: dict) -> str:
    extra = bench.get("extra_info") or {}
    return bench.get("group") or extra.get("op") or bench["name"].split("[")[0]


def _p50_ms(bench: dict) -> float:
    value = (bench.get("extra_info") or {}).get("p50_ms")
    return float(value) if _is_number(value) else bench["stats"]["median"] * 1e3


def rows_of(docs: Iterable[dict]) -> list[dict]:
    """One flat row per benchmark: extra_info, then name, fullname, group, device, file and p50_ms on top."""
    rows = []
    for doc in docs:
        for bench in doc["benchmarks"]:
            extra = dict(bench.get("extra_info") or {})
            rows.append(
                {
                    **extra,
                    "name": bench["name"],
                    "fullname": bench.get("fullname") or bench["name"],
                    "group": _group(bench),
                    "device": _device(bench, doc),
                    "file": doc.get("_path", ""),
                    "p50_ms": _p50_ms(bench),
                    "stats_median_ms": bench["stats"]["median"] * 1e3,
                }
            )
    return rows


# ---------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------


def fmt(value, spec: str, suffix: str = "") -> str:
    """``value`` formatted by ``spec`` (+ ``suffix``), or "-" when it is not a finite number (a missing measurement)."""
    return f"{value:{spec}}{suffix}" if _is_number(value) else "-"


def _escape(text) -> str:
    return str(text).replace("|", "\\|")


def _source_lines(docs: Sequence[dict]) -> list[str]:
    lines = ["| file | device | date | commit | torch | triton | dense peak |", "|---|---|---|---|---|---|---|"]
    for doc in docs:
        first = (doc["benchmarks"][0].get("extra_info") or {}) if doc["benchmarks"] else {}
        versions = first.get("versions") or {}
        commit = doc.get("commit_info") or {}
        commit_id = (commit.get("id") or first.get("git_commit") or "-")[:12] + (" (dirty)" if commit.get("dirty") else "")
        peak = f"{fmt(first.get('peak_tflops'), '.3g')} TFLOP/s ({first.get('peak_op', '-')})" if "peak_tflops" in first else "-"
        lines.append(
            f"| {_escape(doc.get('_path', '-'))} | {_escape(', '.join(devices_of(doc)))} | {doc.get('datetime') or first.get('date') or '-'} "
            f"| {commit_id} | {versions.get('torch', '-')} | {versions.get('triton', '-')} | {_escape(peak)} |"
        )
    return lines


def markdown_tables(rows: Sequence[dict]) -> list[str]:
    """Markdown lines: per group (sorted), a table of name, device, p50 ms, speedup vs dense, TFLOP/s, % of peak.

    A group whose rows carry images_per_s / peak_memory_mib (bench_vit) gets those columns too.
    """
    by_group: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_group[row["group"]].append(row)
    lines: list[str] = []
    for group in sorted(by_group):
        members = by_group[group]
        e2e = any(_is_number(r.get("images_per_s")) for r in members)
        header = ["name", "device", "p50 ms", "speedup vs dense", "TFLOP/s", "% of peak"]
        if e2e:
            header += ["images/s", "peak MiB"]
        lines += ["", f"## {group}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in members:
            cells = [
                f"`{_escape(r['name'])}`",
                _escape(r["device"]),
                fmt(r["p50_ms"], ".4g"),
                fmt(r.get("speedup_vs_dense"), ".2f", "x"),
                fmt(r.get("useful_tflops"), ".3g"),
                fmt(r.get("pct_of_peak"), ".1f"),
            ]
            if e2e:
                cells += [fmt(r.get("images_per_s"), ".4g"), fmt(r.get("peak_memory_mib"), ".0f")]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------


def _bf16(value) -> bool:
    """bf16 inference or bf16 autocast training: the targets' precision (the CPU grid's fp32 says nothing of them)."""
    return bool(re.search(r"bf16|bfloat16", str(value or "")))


def _mlp(layer) -> bool:
    return layer in ("fc1", "fc2")


@dataclass(frozen=True)
class Target:
    """A speed target: which rows of one benchmark group measure it, what they are compared with, how much faster.

    A row counts when it is in ``group``, matches every (key, value) of
    ``where`` (a value may be a predicate) and every key/value of one of
    ``variants``. Its measure is its speedup_vs_dense (``versus="dense"``:
    the dense provider of the same case, same run), the p50 of the row of
    provider ``versus`` with the same ``case_keys`` values over its own, or,
    with ``versus="images_per_s"``, the row's own images/s (an absolute rate:
    ``minimum`` is then in images/s, not a ratio). Rows are grouped by the
    values of ``per`` (e.g. the layer): with rule "best" the target passes
    when each group's best row reaches ``minimum``; with rule "every", when
    every row does ("never slower than dense").
    """

    name: str
    group: str
    where: tuple[tuple[str, object], ...]
    variants: tuple[tuple[str, tuple[tuple[str, object], ...]], ...]  # (label, ((key, value), ...))
    minimum: float
    versus: str = "dense"
    case_keys: tuple[str, ...] = ()
    per: tuple[str, ...] = ()
    rule: str = "best"  # "best" | "every"
    devices: tuple[str, ...] = ("H100", "H200")  # where the issue sets it; a run elsewhere says its device


_KEEP_2TO4_MLP = ("keep 0.5 + 2:4 MLP", (("pattern", "2:4"), ("mlp_only", True), ("keep_ratio", 0.5)))
_KEEP_BLOCK50_MLP = ("keep 0.5 + 50% block MLP", (("pattern", "block"), ("sparsity", 0.5), ("mlp_only", True), ("keep_ratio", 0.5)))
_BLOCK_MLP_LAYER = (("model", "vit_b"), ("layer", _mlp), ("batch", 256), ("density", 0.5), ("mode", "forward"), ("dtype", _bf16))
_BLOCK_CASE = ("model", "layer", "batch", "dtype", "density", "block", "mode")
_ATTENTION = (("model", "vit_b"), ("tokens", 197), ("batch", 256), ("keep_ratio", 0.5), ("mode", "forward"), ("dtype", _bf16))
_ATTENTION_CASE = ("model", "tokens", "batch", "keep_ratio", "mode", "dtype")


def _vit(workload: str) -> tuple[tuple[str, object], ...]:
    return (("model", "vit_b16_224"), ("workload", workload), ("batch", 256), ("img_size", [224, 224]), ("dtype", _bf16))


# Issues 8 and 15, "targets (ViT-B/16, bf16, H100/H200)". One table: add a target here and every report checks it.
TARGETS = (
    Target(
        "block-sparse MLP layer (ViT-B fc1 and fc2, batch 256, density 0.5, forward) vs cuBLAS dense",
        "block_sparse_matmul", _BLOCK_MLP_LAYER, (("ours", (("provider", "lotus"),)),), 1.6, per=("layer",),
    ),
    Target(
        "block-sparse MLP layer (same cases) vs torch BSR",
        "block_sparse_matmul", _BLOCK_MLP_LAYER, (("ours", (("provider", "lotus"),)),), 1.2,
        versus="torch_bsr", case_keys=_BLOCK_CASE, per=("layer",),
    ),
    Target(
        "2:4 ViT-L MLP (fc1 and fc2, batch >= 64, forward), \"auto\" vs cuBLAS dense",
        "semi_structured_matmul",
        (("model", "vit_l"), ("layer", _mlp), ("batch", lambda b: isinstance(b, int) and b >= 64), ("mode", "forward"), ("dtype", _bf16)),
        (("auto", (("provider", "auto"),)),), 1.3, per=("layer", "batch"),
    ),
    Target(
        "2:4 after \"auto\": never slower than dense, every measured shape and mode (0.95x: timing noise)",
        "semi_structured_matmul", (("dtype", _bf16),), (("auto", (("provider", "auto"),)),), 0.95, rule="every",
    ),
    Target(
        "patch-drop attention (ViT-B, 197 tokens, batch 256, keep 0.5, forward) vs full-token SDPA",
        "patch_drop_attention", _ATTENTION, (("ours", (("provider", "lotus"),)),), 3.5,
    ),
    Target(
        "patch-drop attention (same case) vs gather + SDPA",
        "patch_drop_attention", _ATTENTION, (("ours", (("provider", "lotus"),)),), 1.15, versus="gather_sdpa", case_keys=_ATTENTION_CASE,
    ),
    Target(
        "ViT-B/16 224, batch 256, inference: keep 0.5 + 2:4 (or 50% block) MLP vs dense timm (SDPA), images/s",
        "vit_e2e", _vit("infer"), (_KEEP_2TO4_MLP, _KEEP_BLOCK50_MLP), 2.5,
    ),
    Target(
        "ViT-B/16 224, batch 256, training step: keep 0.5 + 2:4 (or 50% block) MLP vs dense timm (SDPA), images/s",
        "vit_e2e", _vit("train"), (_KEEP_2TO4_MLP, _KEEP_BLOCK50_MLP), 1.8,
    ),
    # Issue 17: 10x the 3,000-3,300 images/s of `lotus train --preset tiny` as it first ran on an H200 (eager, batch 128).
    Target(
        "training step of the fast profile (vit_lite_cifar, batch >= 512, its recipe), training images/s",
        "train_throughput_train_step", (("model", "vit_lite_cifar"), ("recipe", "fast"), ("batch", lambda b: isinstance(b, int) and b >= 512)),
        (("fast profile", ()),), 30000, versus="images_per_s",
    ),
)


def _same(value, wanted) -> bool:
    if callable(wanted):
        return bool(wanted(value))
    if isinstance(wanted, list):
        return isinstance(value, (list, tuple)) and list(value) == wanted
    if isinstance(wanted, bool) or not _is_number(wanted):
        return value == wanted
    return _is_number(value) and math.isclose(value, wanted, rel_tol=1e-9, abs_tol=1e-9)


def _value(target: Target, value: float, spec: str = ".2f") -> str:
    """A target's measure as the table writes it: '1.70x' (``spec`` formats the ratio), or '31,000 images/s' for an absolute rate."""
    return f"{value:,.0f} images/s" if target.versus == "images_per_s" else f"{value:{spec}}x"


def _speedup(target: Target, row: dict, rows: Sequence[dict]) -> float | None:
    if target.versus == "images_per_s":
        value = row.get("images_per_s")
        return float(value) if _is_number(value) else None
    if target.versus == "dense":
        value = row.get("speedup_vs_dense")
        return float(value) if _is_number(value) else None
    for other in rows:
        if other["group"] == target.group and other.get("provider") == target.versus and _is_number(other.get("p50_ms")):
            if all(_same(other.get(key), row.get(key)) for key in target.case_keys) and _is_number(row.get("p50_ms")) and row["p50_ms"] > 0:
                return other["p50_ms"] / row["p50_ms"]
    return None


def _target_rows(target: Target, rows: Sequence[dict]) -> list[tuple[str, dict, float]]:
    """(variant label, row, speedup) for every row that measures the target, best speedup first."""
    found = []
    for r in rows:
        if r["group"] != target.group or not all(_same(r.get(key), value) for key, value in target.where):
            continue
        for label, wanted in target.variants:
            if all(_same(r.get(key), value) for key, value in wanted):
                speedup = _speedup(target, r, rows)
                if speedup is not None:
                    found.append((label, r, speedup))
                break
    return sorted(found, key=lambda found_row: -found_row[2])


def _case_label(target: Target, label: str, row: dict) -> str:
    """The variant (and compile mode), then what tells the deciding rows apart: the ``per`` keys and the block size."""
    parts = [str(row.get("variant") or label)]
    if row.get("compile"):
        parts.append(str(row["compile"]))
    keys = target.per if row.get("variant") else (*target.per, "block")  # a variant's name already says its block
    parts += [str(row[key]) if isinstance(row[key], str) else f"{key} {row[key]}" for key in keys if row.get(key) is not None]
    return " ".join(parts)


def evaluate_target(target: Target, rows: Sequence[dict]) -> tuple[str, list[tuple[str, dict, float]]]:
    """("pass" | "fail" | "pending (not in this run)", every row that measures it: (label, row, speedup), best first)."""
    found = _target_rows(target, rows)
    if not found:
        return "pending (not in this run)", []
    groups: dict[tuple, list[tuple[str, dict, float]]] = defaultdict(list)
    for item in found:
        groups[tuple(str(item[1].get(key)) for key in target.per)].append(item)
    deciding = [members[0] for members in groups.values()] if target.rule == "best" else found
    status = "pass" if all(speedup >= target.minimum for _, _, speedup in deciding) else "fail"
    devices = {row["device"] for _, row, _ in deciding}
    if not all(any(wanted in device for wanted in target.devices) for device in devices):
        status += f" (on {', '.join(sorted(devices))}; the target is for {' or '.join(target.devices)})"
    return status, found


def target_lines(rows: Sequence[dict], targets: Sequence[Target] = TARGETS) -> list[str]:
    """Markdown lines: per target, pass / fail with the measured speedups, or "pending (not in this run)"."""
    lines = [
        "## Targets",
        "",
        "Speedup: the variant's p50 time over the baseline's of the same case in the same run (dense: cuBLAS / "
        "dense timm with SDPA; or the named provider); per group (e.g. layer) the best result decides, or every "
        "result where the target says \"never\".",
        "",
        "| target | needs | status | measured (best first) |",
        "|---|---|---|---|",
    ]
    for target in targets:
        status, deciding = evaluate_target(target, rows)
        measured = "; ".join(
            f"{_case_label(target, label, r)}: {_value(target, speedup)} ("
            + (f"{fmt(r['images_per_s'], '.4g')} images/s, " if _is_number(r.get("images_per_s")) and target.versus != "images_per_s" else "")
            + f"{r['device']})"
            for label, r, speedup in deciding
        ) or "-"
        lines.append(f"| {_escape(target.name)} | >= {_value(target, target.minimum, 'g')} | {_escape(status)} | {_escape(measured)} |")
    return lines


# ---------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------


class _NoData(Exception):
    """A plot has nothing to show; the message goes into the report."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    return plt


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _curves(rows, x_key: str, series_key) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{mode: {series label: [(x, geometric-mean speedup over the other parameters)] sorted by x}}."""
    points: dict[str, dict[str, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        x, speedup = r.get(x_key), r.get("speedup_vs_dense")
        if r.get("provider") == "dense" or not _is_number(x) or not _is_number(speedup) or speedup <= 0:
            continue
        points[str(r.get("mode") or "all")][series_key(r)][float(x)].append(float(speedup))
    return {
        mode: {label: sorted((x, _geomean(v)) for x, v in by_x.items()) for label, by_x in series.items()}
        for mode, series in points.items()
    }


def _plain_log_labels(ax) -> None:
    """Tick labels 0.5, 2, 10 on a log y axis (not 5x10^-1); minor ticks labelled only within one decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if low > 0 and high / low < 10 else NullFormatter())


def _line_plot(curves, path: Path, xlabel: str, title: str) -> Path:
    plt = _pyplot()
    modes = sorted(curves)
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for label in sorted(curves[mode]):
            xs, ys = zip(*curves[mode][label])
            ax.plot(xs, ys, marker="o", label=label)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_yscale("log")  # 2x faster and 2x slower sit the same distance from 1
        _plain_log_labels(ax)
        ax.set_title(mode)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speedup vs dense (p50; geometric mean over shapes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_block_sparse(rows: Sequence[dict], out_dir: Path) -> list[Path]:
    """block_sparse_matmul: speedup vs density, one line per provider and block size, one panel per mode."""
    mine = [r for r in rows if r["group"] == "block_sparse_matmul"]
    if not mine:
        raise _NoData("no block_sparse_matmul results")
    multi = len({r["device"] for r in mine}) > 1
    curves = _curves(
        [r for r in mine if r.get("block") is not None],
        "density",
        lambda r: f"{r.get('provider', '?')} blk{r.get('block')}" + (f" ({r['device']})" if multi else ""),
    )
    if not curves:
        raise _NoData("block_sparse_matmul results carry no density / block / speedup_vs_dense for a non-dense provider")
    return [_line_plot(curves, out_dir / BLOCK_SPARSE_PLOT, "block density (fraction of blocks kept)", "block-sparse matmul")]


def plot_patch_drop(rows: Sequence[dict], out_dir: Path) -> list[Path]:
    """patch_drop_attention: speedup vs keep ratio, one line per provider, one panel per mode."""
    mine = [r for r in rows if r["group"] == "patch_drop_attention"]
    if not mine:
        raise _NoData("no patch_drop_attention results")
    multi = len({r["device"] for r in mine}) > 1
    curves = _curves(mine, "keep_ratio", lambda r: str(r.get("provider", "?")) + (f" ({r['device']})" if multi else ""))
    if not curves:
        raise _NoData("patch_drop_attention results carry no keep_ratio / speedup_vs_dense for a non-dense provider")
    return [_line_plot(curves, out_dir / PATCH_DROP_PLOT, "keep ratio (fraction of patches kept)", "patch-dropping attention")]


def plot_vit(rows: Sequence[dict], out_dir: Path) -> list[Path]:
    """bench_vit: images/s per variant (bars: workload, batch, compile mode), one PNG per device and model."""
    mine = [r for r in rows if r["group"] == "vit_e2e" and _is_number(r.get("images_per_s")) and r.get("variant")]
    if not mine:
        raise _NoData("no vit_e2e results with images_per_s")
    plt = _pyplot()
    multi = len({r["device"] for r in mine}) > 1
    by_plot: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in mine:
        by_plot[(r["device"], str(r.get("model", "?")))].append(r)
    paths = []
    for (device, model), members in sorted(by_plot.items()):
        variants = list(dict.fromkeys(r["variant"] for r in members))
        series = list(dict.fromkeys(f"{r.get('workload', '?')} b{r.get('batch', '?')} {r.get('compile', '')}".strip() for r in members))
        values = {(f"{r.get('workload', '?')} b{r.get('batch', '?')} {r.get('compile', '')}".strip(), r["variant"]): r["images_per_s"] for r in members}
        width = 0.8 / len(series)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(variants) * max(1, len(series)) ** 0.5 + 2), 4.5))
        for i, label in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * width for j, v in enumerate(variants) if (label, v) in values]
            ys = [values[(label, v)] for v in variants if (label, v) in values]
            ax.bar(xs, ys, width=width, label=label)
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("images/s (p50)")
        ax.set_title(f"{model} end to end" + (f" on {device}" if multi else "") + ": images/s per variant")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / (f"vit_e2e_{_slug(model)}" + (f"_{_slug(device)}" if multi else "") + ".png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


PLOTS = (
    ("speedup vs density per block size (block_sparse_matmul)", plot_block_sparse),
    ("attention speedup vs keep ratio (patch_drop_attention)", plot_patch_drop),
    ("end-to-end images/s per variant (vit_e2e)", plot_vit),
)


def write_report(paths: Sequence, out_dir=DEFAULT_OUT) -> Path:
    """Read the pytest-benchmark files, write out_dir/bench_report.md and the plots; returns the markdown's path.

    JSON files that are not pytest-benchmark output are skipped and listed in
    the report; BenchReportError when none of the files is one.
    """
    docs, skipped = load_runs(paths)
    return _write_report(docs, skipped, out_dir)


def _write_report(docs: Sequence[dict], skipped: Sequence[tuple[str, str]], out_dir) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BenchReportError(f"--out {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows_of(docs)
    lines = ["# Benchmark report", "", "Sources:", "", *_source_lines(docs)]
    if skipped:
        lines += ["", "Skipped (JSON, but not pytest-benchmark output): " + ", ".join(_escape(path) for path, _ in skipped) + "."]
    lines += [
        "",
        "p50: median device time of one call (extra_info p50_ms: triton do_bench on CUDA, wall clock on CPU; "
        "else pytest-benchmark's median). Speedup: the dense provider's p50 of the same case, same run, over this p50. "
        "TFLOP/s: useful work per second; % of peak: of the dense matmul peak measured in the same run.",
        "",
        *target_lines(rows),
        "",
        "## Plots",
        "",
    ]
    for title, plot in PLOTS:
        try:
            written = plot(rows, out_dir)
        except _NoData as e:
            lines.append(f"- {title}: plot skipped: {e}.")
            continue
        lines += [f"- {title}:", ""] + [f"  ![{title}]({p.name})" for p in written] + [""]
    if not rows:
        lines += ["", "No benchmarks in the input files."]
    lines += markdown_tables(rows)
    path = out_dir / REPORT_NAME
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------
# regression guard
# ---------------------------------------------------------------------------


@dataclass
class Comparison:
    """Old vs new p50 per benchmark (matched by fullname). status: REGRESSION | faster | ok | new | gone."""

    device: str
    threshold: float
    old_file: str
    new_file: str
    rows: list[dict] = field(default_factory=list)

    @property
    def regressions(self) -> list[str]:
        """Names of the benchmarks more than threshold slower (p50), in table order."""
        return [r["name"] for r in self.rows if r["status"] == "REGRESSION"]

    def format(self) -> str:
        lines = [
            f"old: {self.old_file}",
            f"new: {self.new_file}",
            f"device: {self.device}; regression = p50 more than {self.threshold:.0%} slower",
            "",
            f"| {'benchmark':<60} | {'old p50 ms':>10} | {'new p50 ms':>10} | {'change':>8} | status |",
            f"|{'-' * 62}|{'-' * 12}|{'-' * 12}|{'-' * 10}|--------|",
        ]
        for r in self.rows:
            change = f"{r['change']:+.1%}" if r["change"] is not None else "-"
            lines.append(f"| {r['name']:<60} | {fmt(r['old_ms'], '.4g'):>10} | {fmt(r['new_ms'], '.4g'):>10} | {change:>8} | {r['status']} |")
        compared = sum(1 for r in self.rows if r["change"] is not None)
        regressions = self.regressions
        lines += ["", f"{compared} benchmarks compared, {len(regressions)} regression(s)" + (": " + ", ".join(regressions) if regressions else "")]
        return "\n".join(lines)


def _as_run(run) -> dict:
    """A path (loaded and checked) or a document (load_run's, or checked here)."""
    if not isinstance(run, dict):
        return load_run(run)
    if "_path" not in run:
        _check_document(run, "<document>")
        run = {**run, "_path": "<document>"}
    return run


def compare_runs(old, new, threshold: float = DEFAULT_THRESHOLD) -> Comparison:
    """Compare two runs (paths or loaded documents) of the same device: p50 per benchmark, new vs old.

    A benchmark is a regression when new p50 > old p50 * (1 + threshold).
    p50 is extra_info["p50_ms"] when both runs have it for that benchmark,
    else pytest-benchmark's median. Raises BenchReportError when the runs
    come from different devices.
    """
    if not _is_number(threshold) or threshold <= 0:
        raise BenchReportError(f"threshold must be a number > 0 (0.10 = 10% slower), got {threshold!r}")
    old, new = _as_run(old), _as_run(new)
    old_devices, new_devices = devices_of(old), devices_of(new)
    if old_devices != new_devices:
        raise BenchReportError(
            f"refusing to compare runs from different devices: {old['_path']} ran on {', '.join(old_devices)}; "
            f"{new['_path']} ran on {', '.join(new_devices)}. Compare runs of one device only."
        )
    old_by = {b.get("fullname") or b["name"]: b for b in old["benchmarks"]}
    new_by = {b.get("fullname") or b["name"]: b for b in new["benchmarks"]}
    rows = []
    for key in list(dict.fromkeys([*new_by, *old_by])):
        o, n = old_by.get(key), new_by.get(key)
        name = (n or o)["name"]
        if o is None or n is None:
            rows.append({"name": name, "old_ms": _p50_ms(o) if o else None, "new_ms": _p50_ms(n) if n else None, "change": None, "status": "new" if o is None else "gone"})
            continue
        both = all(_is_number((b.get("extra_info") or {}).get("p50_ms")) for b in (o, n))
        old_ms = _p50_ms(o) if both else o["stats"]["median"] * 1e3
        new_ms = _p50_ms(n) if both else n["stats"]["median"] * 1e3
        change = new_ms / old_ms - 1.0 if old_ms > 0 else math.inf
        # The epsilon keeps an exact threshold (1.0 ms -> 1.1 ms at 10%) out of the regressions despite rounding.
        status = "REGRESSION" if change > threshold + 1e-9 else "faster" if change < -threshold - 1e-9 else "ok"
        rows.append({"name": name, "old_ms": old_ms, "new_ms": new_ms, "change": change, "status": status})
    return Comparison(", ".join(new_devices), threshold, old["_path"], new["_path"], rows)


def _committed_json(results_dir: Path) -> list[Path]:
    """JSON files under results_dir that git tracks (all JSON files there when git cannot say)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", "*.json"], cwd=results_dir, capture_output=True, text=True, check=True, timeout=30
        ).stdout
        return [results_dir / name for name in listed.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        return sorted(results_dir.rglob("*.json"))


def find_baseline(new, results_dir=DEFAULT_OUT) -> Path:
    """The newest committed pytest-benchmark file under results_dir from the same device as ``new`` (by its "datetime")
    that has at least one benchmark of ``new`` (by fullname). NoBaselineError when there is none.

    Sharing a benchmark matters because a run is split over files
    (bench/run_gpu.sh writes one per benchmark file): the newest file of the
    device may hold other benchmarks, and comparing with it would compare nothing.
    """
    new = _as_run(new)
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise BenchReportError(f"baseline directory {results_dir} does not exist")
    devices = devices_of(new)
    names = {b.get("fullname") or b["name"] for b in new["benchmarks"]}
    new_path = Path(new["_path"]).resolve()
    candidates = []
    for path in _committed_json(results_dir):
        if not path.is_file() or path.resolve() == new_path:
            continue
        try:
            doc = load_run(path)
        except BenchReportError:
            continue  # demo / training-run JSON files live there too
        shared = names & {b.get("fullname") or b["name"] for b in doc["benchmarks"]}
        if devices_of(doc) == devices and shared:
            candidates.append((str(doc.get("datetime") or ""), str(path), path))
    if not candidates:
        raise NoBaselineError(
            f"no committed pytest-benchmark file under {results_dir} ran on {', '.join(devices)} "
            f"with any benchmark of {new['_path']}: give the baseline explicitly (--compare OLD.json NEW.json)"
        )
    return max(candidates)[2]


# ---------------------------------------------------------------------------
# command
# ---------------------------------------------------------------------------


def run(
    files: Sequence[str] = (),
    out=None,
    compare: Sequence[str] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    baseline_dir=DEFAULT_OUT,
    compare_each_files: Sequence[str] | None = None,
) -> int:
    """What ``lotus bench-report`` does; returns the exit code (0 fine, 1 regression). Bad input raises BenchReportError."""
    if sum(bool(x) for x in (files, compare, compare_each_files)) > 1:
        raise BenchReportError("give one of: files to report on, --compare, --compare-each")
    if compare_each_files:
        return compare_each(compare_each_files, baseline_dir, threshold)
    if compare:
        if len(compare) > 2:
            raise BenchReportError(f"--compare takes OLD.json NEW.json or NEW.json alone, got {len(compare)} files")
        if len(compare) == 1:
            new = load_run(compare[0])
            old = find_baseline(new, baseline_dir)
        else:
            old, new = compare
        comparison = compare_runs(old, new, threshold)
        print(comparison.format())
        return 1 if comparison.regressions else 0
    docs, skipped = load_runs(files)
    for path, _ in skipped:
        print(f"lotus bench-report: skipped {path}: not pytest-benchmark output", file=sys.stderr)
    print(_write_report(docs, skipped, DEFAULT_OUT if out is None else out))
    return 0


def compare_each(files: Sequence, baseline_dir=DEFAULT_OUT, threshold: float = DEFAULT_THRESHOLD) -> int:
    """Compare each new run with its baseline (find_baseline) and print the tables; 0 fine, 1 any regression.

    A run without a baseline (the first on a device, or new benchmarks) is
    reported and passes: there is nothing to regress from. A file that is not
    pytest-benchmark output is skipped with a note.
    """
    docs, skipped = load_runs(files)
    for path, _ in skipped:
        print(f"{path}: skipped, not pytest-benchmark output")
    regressed = False
    for doc in docs:
        try:
            baseline = find_baseline(doc, baseline_dir)
        except NoBaselineError as e:
            print(f"{doc['_path']}: no baseline, nothing to compare ({e})")
            continue
        comparison = compare_runs(baseline, doc, threshold)
        print(comparison.format(), end="\n\n")
        regressed = regressed or bool(comparison.regressions)
    return 1 if regressed else 0
