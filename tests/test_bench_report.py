"""Benchmark reports and the regression guard (lotus_kernels.bench_report, `lotus bench-report`), on fake
pytest-benchmark documents: CPU only, no timing."""

import json
import re

import pytest

from lotus_kernels import bench_report, cli

H100 = "NVIDIA H100 80GB HBM3"
PNG = b"\x89PNG\r\n\x1a\n"


def fake_bench(name, group, p50_ms, device=H100, median_ms=None, **extra):
    """One pytest-benchmark entry; extra_info as bench/conftest.py writes it (p50_ms=None: stats only)."""
    median_s = (median_ms if median_ms is not None else p50_ms) * 1e-3
    info = {"device": device, **extra}
    if p50_ms is not None:
        info.update(p20_ms=0.9 * p50_ms, p50_ms=p50_ms, p80_ms=1.1 * p50_ms)
    return {
        "group": group,
        "name": name,
        "fullname": f"bench/bench_x.py::{name}",
        "params": {},
        "param": None,
        "extra_info": info,
        "options": {},
        "stats": {"min": median_s * 0.9, "max": median_s * 1.2, "mean": median_s, "median": median_s, "rounds": 10, "iterations": 1},
    }


def fake_run(benchmarks, date="2026-11-24T12:00:00+00:00"):
    return {
        "machine_info": {"node": "box", "machine": "x86_64", "cpu": {"brand_raw": "Fake CPU"}},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "benchmarks": benchmarks,
        "datetime": date,
        "version": "5.1.0",
    }


def write(path, doc):
    path.write_text(json.dumps(doc))
    return path


def kernel_and_vit_run():
    rows = []
    for mode in ("forward", "forward_backward"):
        rows.append(fake_bench(f"bench_block_sparse_matmul[vit_b-fc1-{mode}-dense]", "block_sparse_matmul", 2.0, provider="dense", mode=mode, speedup_vs_dense=1.0))
        for density in (0.1, 0.5):
            for block in (32, 64):
                p50 = 2.0 * density * (1.2 if block == 32 else 1.0)
                rows.append(
                    fake_bench(
                        f"bench_block_sparse_matmul[vit_b-fc1-d{density}-blk{block}-lotus-{mode}]",
                        "block_sparse_matmul",
                        p50,
                        provider="lotus",
                        mode=mode,
                        density=density,
                        block=block,
                        speedup_vs_dense=2.0 / p50,
                        useful_tflops=312.5,
                        pct_of_peak=41.25,
                    )
                )
    for variant, ips in (("dense", 1000.0), ("2to4mlp", 1300.0), ("keep0.5", 1900.0)):
        for batch in (1, 256):
            rows.append(
                fake_bench(
                    f"bench_vit[vit_b16_224-infer-b{batch}-eager-{variant}]",
                    "vit_e2e",
                    batch / ips * 1e3,
                    model="vit_b16_224",
                    workload="infer",
                    batch=batch,
                    compile="eager",
                    variant=variant,
                    provider=variant,
                    images_per_s=ips,
                    peak_memory_mib=2048.0,
                    speedup_vs_dense=ips / 1000.0,
                )
            )
    rows.append(fake_bench("bench_keep_indices[lotus]", None, None, median_ms=0.25, op="keep_indices"))
    return fake_run(rows)


def table_row(text, name):
    (line,) = [line for line in text.splitlines() if line.startswith(f"| `{name}`")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_tables_and_plots(tmp_path):
    source = write(tmp_path / "run.json", kernel_and_vit_run())
    md = bench_report.write_report([source], tmp_path / "out")
    text = md.read_text()
    assert md == tmp_path / "out" / "bench_report.md"
    for group in ("block_sparse_matmul", "keep_indices", "vit_e2e"):
        assert f"## {group}" in text
    assert "| name | device | p50 ms | speedup vs dense | TFLOP/s | % of peak |" in text
    assert table_row(text, "bench_block_sparse_matmul[vit_b-fc1-d0.5-blk64-lotus-forward]") == [
        "`bench_block_sparse_matmul[vit_b-fc1-d0.5-blk64-lotus-forward]`", H100, "1", "2.00x", "312", "41.2"
    ]
    # No extra_info p50: pytest-benchmark's median; no group: the op; nothing else known.
    assert table_row(text, "bench_keep_indices[lotus]") == ["`bench_keep_indices[lotus]`", H100, "0.25", "-", "-", "-"]
    assert "0123456789ab" in text and "run.json" in text
    assert (tmp_path / "out" / "block_sparse_speedup.png").read_bytes()[:8] == PNG
    assert (tmp_path / "out" / "vit_e2e_vit_b16_224.png").read_bytes()[:8] == PNG
    assert "](block_sparse_speedup.png)" in text and "](vit_e2e_vit_b16_224.png)" in text
    assert "patch_drop_attention): plot skipped: no patch_drop_attention results." in text
    assert not (tmp_path / "out" / "patch_drop_speedup.png").exists()


def test_vit_table_has_images_per_s_and_memory(tmp_path):
    text = bench_report.write_report([write(tmp_path / "run.json", kernel_and_vit_run())], tmp_path).read_text()
    assert "| name | device | p50 ms | speedup vs dense | TFLOP/s | % of peak | images/s | peak MiB |" in text
    assert table_row(text, "bench_vit[vit_b16_224-infer-b256-eager-keep0.5]")[3:] == ["1.90x", "-", "-", "1900", "2048"]


def test_patch_drop_plot_and_multiple_files(tmp_path):
    rows = [fake_bench("bench_patch_drop_attention[dense]", "patch_drop_attention", 1.0, provider="dense", keep_ratio=1.0, speedup_vs_dense=1.0)]
    rows += [
        fake_bench(f"bench_patch_drop_attention[lotus-k{k}]", "patch_drop_attention", k, provider="lotus", keep_ratio=k, speedup_vs_dense=1 / k)
        for k in (0.3, 0.5, 0.7)
    ]
    cpu_rows = [fake_bench("bench_patch_drop_attention[ref-k0.5]", "patch_drop_attention", 3.0, device="CPU x86_64 (2 threads)", provider="reference", keep_ratio=0.5, speedup_vs_dense=0.5)]
    files = [write(tmp_path / "gpu.json", fake_run(rows)), write(tmp_path / "cpu.json", fake_run(cpu_rows))]
    text = bench_report.write_report(files, tmp_path / "out").read_text()
    assert (tmp_path / "out" / "patch_drop_speedup.png").read_bytes()[:8] == PNG
    assert "block_sparse_matmul): plot skipped" in text and "vit_e2e): plot skipped" in text
    assert "CPU x86_64 (2 threads)" in text and H100 in text


def test_plots_without_their_data_are_skipped_not_crashed(tmp_path):
    rows = [
        fake_bench("bench_dense_to_bsr[lotus]", "dense_to_bsr", 0.1),
        # block_sparse_matmul and vit_e2e rows that lack what their plots need
        fake_bench("bench_block_sparse_matmul[x-lotus]", "block_sparse_matmul", 1.0, provider="lotus"),
        fake_bench("bench_vit[x]", "vit_e2e", 1.0),
    ]
    text = bench_report.write_report([write(tmp_path / "run.json", fake_run(rows))], tmp_path / "out").read_text()
    assert text.count("plot skipped") == 3
    assert "block_sparse_matmul results carry no density" in text
    assert not list((tmp_path / "out").glob("*.png"))
    empty = bench_report.write_report([write(tmp_path / "empty.json", fake_run([]))], tmp_path / "empty").read_text()
    assert "No benchmarks in the input files." in empty and empty.count("plot skipped") == 3


OLD = {"same": 1.0, "plus5": 2.0, "plus10": 2.0, "plus10_5": 2.0, "plus50": 4.0, "minus30": 1.0, "gone": 1.0}
NEW = {"same": 1.0, "plus5": 2.1, "plus10": 2.2, "plus10_5": 2.21, "plus50": 6.0, "minus30": 0.7, "added": 5.0}


def runs(tmp_path, old_device=H100, new_device=H100):
    old = fake_run([fake_bench(f"bench_k[{k}]", "k", v, device=old_device) for k, v in OLD.items()], "2026-11-01T00:00:00")
    new = fake_run([fake_bench(f"bench_k[{k}]", "k", v, device=new_device) for k, v in NEW.items()], "2026-11-24T00:00:00")
    return write(tmp_path / "old.json", old), write(tmp_path / "new.json", new)


def test_compare_flags_exactly_the_benchmarks_more_than_10_percent_slower(tmp_path):
    old, new = runs(tmp_path)
    comparison = bench_report.compare_runs(old, new, threshold=0.10)
    assert set(comparison.regressions) == {"bench_k[plus10_5]", "bench_k[plus50]"}
    status = {r["name"]: r["status"] for r in comparison.rows}
    assert status == {
        "bench_k[same]": "ok",
        "bench_k[plus5]": "ok",
        "bench_k[plus10]": "ok",  # exactly 10%: not more than
        "bench_k[plus10_5]": "REGRESSION",
        "bench_k[plus50]": "REGRESSION",
        "bench_k[minus30]": "faster",
        "bench_k[added]": "new",
        "bench_k[gone]": "gone",
    }
    table = comparison.format()
    assert "+50.0%" in table and "REGRESSION" in table and "2 regression(s): bench_k[plus10_5], bench_k[plus50]" in table
    assert set(bench_report.compare_runs(old, new, threshold=0.45).regressions) == {"bench_k[plus50]"}


def test_compare_command_exit_codes(tmp_path, capsys):
    old, new = runs(tmp_path)
    assert cli.main(["bench-report", "--compare", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert "bench_k[plus50]" in out and "REGRESSION" in out
    assert cli.main(["bench-report", "--compare", str(old), str(old)]) == 0
    assert "0 regression(s)" in capsys.readouterr().out
    assert cli.main(["bench-report", "--compare", str(old), str(new), "--threshold", "0.6"]) == 0


def test_compare_falls_back_to_the_stats_median(tmp_path):
    old = fake_run([fake_bench("bench_k[a]", "k", None, median_ms=1.0), fake_bench("bench_k[b]", "k", 5.0)])
    new = fake_run([fake_bench("bench_k[a]", "k", None, median_ms=1.2), fake_bench("bench_k[b]", "k", None, median_ms=5.0)])
    assert bench_report.compare_runs(old, new).regressions == ["bench_k[a]"]


def test_compare_refuses_different_devices(tmp_path, capsys):
    old, new = runs(tmp_path, old_device="NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match="refusing to compare runs from different devices"):
        bench_report.compare_runs(old, new)
    assert cli.main(["bench-report", "--compare", str(old), str(new)]) == 2
    err = capsys.readouterr().err
    assert "different devices" in err and "NVIDIA A100-SXM4-80GB" in err and H100 in err and "Traceback" not in err


def test_compare_against_the_newest_committed_run_of_the_same_device(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    make = lambda name, date, device, slow: write(  # noqa: E731
        results / name, fake_run([fake_bench("bench_k[a]", "k", slow, device=device)], date)
    )
    make("h100-old.json", "2026-10-01T00:00:00", H100, 1.0)
    make("h100-newest.json", "2026-11-01T00:00:00", H100, 2.0)
    make("a100-newer.json", "2026-11-20T00:00:00", "NVIDIA A100-SXM4-80GB", 0.5)
    (results / "demo-cpu.json").write_text(json.dumps({"not": "a benchmark file"}))
    new = make("h100-now.json", "2026-11-24T00:00:00", H100, 2.1)
    assert bench_report.find_baseline(new, results) == results / "h100-newest.json"
    assert cli.main(["bench-report", "--compare", str(new), "--baseline-dir", str(results)]) == 0
    assert "h100-newest.json" in capsys.readouterr().out
    other = write(tmp_path / "t4.json", fake_run([fake_bench("bench_k[a]", "k", 1.0, device="Tesla T4")]))
    assert cli.main(["bench-report", "--compare", str(other), "--baseline-dir", str(results)]) == 2
    assert "no committed pytest-benchmark file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ("dir", "is not a file"),
        ("{not json", "is not JSON"),
        (b"\xff\xfe\x00\x81binary", "is not JSON"),
        ("[1, 2]", "not a pytest-benchmark JSON file"),
        ('{"machine_info": {}}', "not a pytest-benchmark JSON file: no 'benchmarks' key"),
        ('{"machine_info": {}, "benchmarks": {}}', "'benchmarks' is a dict, not a list"),
        ('{"machine_info": {}, "benchmarks": [{"name": "x", "stats": {}}]}', "benchmarks[0] (x) has no numeric stats.median"),
        ('{"machine_info": {}, "benchmarks": [{"stats": {"median": 1}}]}', "benchmarks[0] has no 'name'"),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path, capsys, content, message):
    path = tmp_path / "input.json"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(bench_report.BenchReportError, match=re.escape(message)):
        bench_report.load_run(path)
    good = write(tmp_path / "good.json", kernel_and_vit_run())
    for argv in (["bench-report", str(path), "--out", str(tmp_path / "out")], ["bench-report", "--compare", str(good), str(path)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("lotus bench-report: error:") and message in err and "Traceback" not in err


def test_command_arguments(tmp_path, capsys):
    good = write(tmp_path / "good.json", kernel_and_vit_run())
    assert cli.main(["bench-report", str(good), "--out", str(tmp_path / "rep")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "rep" / "bench_report.md")
    assert cli.main(["bench-report"]) == 2
    assert "no input files" in capsys.readouterr().err
    assert cli.main(["bench-report", str(good), "--compare", str(good)]) == 2
    assert cli.main(["bench-report", "--compare", str(good), str(good), str(good)]) == 2
    assert cli.main(["bench-report", "--compare", str(good), str(good), "--threshold", "0"]) == 2
    assert "threshold must be a number > 0" in capsys.readouterr().err
