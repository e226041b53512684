"""lotus gpu-check on a CPU: the budget and deadlines, isolation of crashing steps, the file limit, the summary,
the pytest progress plugin, and the real steps end to end on tiny shapes under the interpreter."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from lotus_kernels.recipe import cli
from lotus_kernels.recipe.tools.gpu_check import MAX_FILES, OUTPUT_FILES, run, runner, summary
from lotus_kernels.recipe.tools.gpu_check.pytest_progress import passed_nodeids
from lotus_kernels.recipe.tools.gpu_check.runner import Command, Step

PY = sys.executable


def python_step(name, code, min_s=0.0, max_s=None, after=None, env=None):
    return Step(name, f"test step {name}", lambda ctx: Command([PY, "-c", textwrap.dedent(code)], env or {}), min_s, max_s, after)


CRASHING_TABLE = [
    python_step("first", "print('measured something')"),
    # A real segfault (a NULL read), as a CUDA library's illegal instruction would end a process.
    python_step("segfault", "import ctypes; print('before the crash', flush=True); ctypes.string_at(0)"),
    python_step("raises", "raise RuntimeError('CUDA error: an illegal instruction was encountered')"),
    python_step("last", "print('still here')"),
]


def test_a_crashing_step_fails_alone_and_the_rest_still_run(tmp_path):
    results = run(tmp_path / "out", budget=60, table=CRASHING_TABLE, device="cpu", echo=lambda line: None)
    assert [(r.name, r.status) for r in results] == [("first", "passed"), ("segfault", "crashed"), ("raises", "failed"), ("last", "passed")]
    by_name = {r.name: r for r in results}
    assert by_name["segfault"].reason == "killed by SIGSEGV" and by_name["segfault"].returncode == -11
    assert "before the crash" in by_name["segfault"].log_tail
    assert by_name["raises"].reason == "exit code 1" and any("illegal instruction" in line for line in by_name["raises"].log_tail)
    assert by_name["last"].log_tail == ["still here"]
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["status"] for s in doc["steps"]] == ["passed", "crashed", "failed", "passed"]
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "| segfault | crashed |" in text and "killed by SIGSEGV" in text and "last output: `before the crash`" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["gpu_check.json", "steps.log", "summary.md"])


def alive(pid: int) -> bool:
    """Whether pid runs (a killed process nobody reaped yet, a zombie, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_deadlines_budget_and_skips(tmp_path):
    pid_file = tmp_path / "child.pid"
    table = [
        python_step("deadline", "import os; print(os.environ['LOTUS_DEADLINE'], os.environ['LOTUS_STEP'])"),
        # Overruns its 2 s: the whole process group goes, the grandchild too.
        python_step("slow", f"""
            import subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            open({str(pid_file)!r}, "w").write(str(child.pid))
            time.sleep(60)
        """, max_s=2),
        python_step("greedy", "print('never')", min_s=1000),
        Step("not-here", "prepare says no", lambda ctx: "no such hardware here", 0.0),
        python_step("after", "print('ran')"),
    ]
    start = time.time()
    results = run(tmp_path / "out", budget=40, table=table, device="cpu", echo=lambda line: None)
    statuses = {r.name: (r.status, r.reason) for r in results}
    assert statuses["deadline"][0] == "passed"
    deadline, step = results[0].log_tail[0].split()
    assert step == "deadline" and start < float(deadline) < start + 40
    assert statuses["slow"] == ("timeout", "killed at its deadline (2 s)") and results[1].seconds < 15
    assert not alive(int(pid_file.read_text()))  # the step's child was killed with it
    assert statuses["greedy"][0] == "skipped" and statuses["greedy"][1].startswith("budget: ") and "at least 1000 s" in statuses["greedy"][1]
    assert statuses["not-here"] == ("skipped", "no such hardware here")
    assert statuses["after"][0] == "passed"
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "| greedy | skipped |" in text and "| not-here | skipped | 0 | no such hardware here |" in text


def test_an_earlier_step_can_turn_something_off_for_the_later_ones(tmp_path):
    def off(ctx, result):
        if result.status != "passed":
            ctx.env["LOTUS_CUSPARSELT"] = "off"

    table = [
        python_step("probe", "raise SystemExit(3)", after=off),
        python_step("later", "import os; print(os.environ.get('LOTUS_CUSPARSELT'), os.environ['TRITON_INTERPRET'])"),
    ]
    results = run(tmp_path / "out", budget=30, table=table, device="cpu", echo=lambda line: None)
    assert results[0].reason == "exit code 3" and results[1].log_tail == ["off 1"]
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["env_for_later_steps"] == {"LOTUS_CUSPARSELT": "off"}


def test_only_the_output_files_and_at_most_eight(tmp_path):
    assert len(OUTPUT_FILES) <= MAX_FILES == 8
    with pytest.raises(ValueError, match="gpu-check writes only"):
        runner.output_path(tmp_path, "bench-block.json")
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="holds files gpu-check did not write .*mine.txt"):
        run(tmp_path, budget=10, table=CRASHING_TABLE[:1], device="cpu")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run(tmp_path / "a_file", budget=10, table=CRASHING_TABLE[:1], device="cpu")
    with pytest.raises(ValueError, match="unknown .*'nope'"):
        run(tmp_path / "out", budget=10, steps=["nope"], table=CRASHING_TABLE, device="cpu")
    with pytest.raises(ValueError, match="budget must be a positive"):
        run(tmp_path / "out", budget=0, table=CRASHING_TABLE, device="cpu")


def test_resume_keeps_earlier_records_and_a_fresh_run_replaces_them(tmp_path):
    out = tmp_path / "out"
    record = python_step("record", f"""
        from lotus_kernels.recipe.tools.gpu_check.runner import append_jsonl
        append_jsonl({str(out / 'cases.jsonl')!r}, {{"group": "x", "name": "case"}})
    """)
    run(out, budget=30, table=[record], device="cpu", echo=lambda line: None)
    run(out, budget=30, table=[record], device="cpu", resume=True, echo=lambda line: None)
    assert len(runner.read_jsonl(out / "cases.jsonl")) == 2
    run(out, budget=30, table=[record], device="cpu", echo=lambda line: None)
    assert len(runner.read_jsonl(out / "cases.jsonl")) == 1
    # A line cut short by a killed writer is left out, not an error.
    with open(out / "cases.jsonl", "a") as f:
        f.write('{"group": "x", "na')
    assert len(runner.read_jsonl(out / "cases.jsonl")) == 1


# ---------------------------------------------------------------------------
# the pytest plugin
# ---------------------------------------------------------------------------


def _pytest(tmp_path, **env):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest
        def test_passes(): pass
        def test_fails(): assert 1 == 2, "one is not two"
        def test_skips(): pytest.skip("no GPU here")
    """))
    return subprocess.run(
        [PY, "-m", "pytest", str(tmp_path / "test_sample.py"), "-p", "lotus_kernels.recipe.tools.gpu_check.pytest_progress", "-p", "no:cacheprovider", "-q"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env}, timeout=120,
    )


def test_progress_plugin_names_outcomes_resumes_and_keeps_the_deadline(tmp_path):
    log = tmp_path / "tests.jsonl"
    _pytest(tmp_path, LOTUS_TEST_LOG=str(log), LOTUS_STEP="tests")
    records = {r["nodeid"].split("::")[1]: r for r in runner.read_jsonl(log)}
    assert {k: r["outcome"] for k, r in records.items()} == {"test_passes": "passed", "test_fails": "failed", "test_skips": "skipped"}
    assert "one is not two" in records["test_fails"]["message"] and records["test_skips"]["message"] == "no GPU here"
    assert all(r["step"] == "tests" for r in records.values())
    assert {n.split("::")[1] for n in passed_nodeids(log)} == {"test_passes"}
    # Resumed: the passed test is deselected, the others run again.
    done = _pytest(tmp_path, LOTUS_TEST_LOG=str(log), LOTUS_TEST_RESUME=str(log))
    assert "1 deselected" in done.stdout and len(runner.read_jsonl(log)) == 5
    # Past the deadline nothing starts.
    done = _pytest(tmp_path, LOTUS_DEADLINE=str(time.time() - 1))
    assert "3 skipped" in done.stdout


# ---------------------------------------------------------------------------
# the summary
# ---------------------------------------------------------------------------


def _row(group, provider, speedup, **case):
    name = f"bench_{group}[{case.get('model')}-{case.get('layer')}-{provider}-{case.get('mode')}]"
    return {"group": group, "name": name, "provider": provider, "device": "NVIDIA H200",
            "p50_ms": 1.0 / speedup, "dense_p50_ms": 1.0, "speedup_vs_dense": speedup, **case}


def test_summary_reads_targets_speed_cusparselt_and_failures():
    case = dict(model="vit_b", batch=256, density=0.5, mode="forward", dtype="torch.bfloat16", block=64)
    cases = [{"group": "env", "name": "environment", "device": "NVIDIA H200", "date": "2026-12-01", "versions": {"torch": "2.11.0"}}]
    cases += [{"group": "env", "name": "peak_matmul", "op": "bfloat16 8192^3 matmul", "tflops": 790.2}]
    for layer, ours in (("fc1", 1.7), ("fc2", 1.5)):
        cases += [_row("block_sparse_matmul", p, s, layer=layer, **case) for p, s in (("dense", 1.0), ("torch_bsr", 1.2), ("lotus", ours))]
    cases += [
        {"group": "cusparselt_config", "name": "torch", "config": "torch", "proven": True, "status": "passed", "cases": 24, "cases_ok": 24, "last_case": "torch-bfloat16-768x3072-m1100"},
        {"group": "cusparselt_config", "name": "searched", "config": "searched", "proven": False, "status": "crashed", "cases": 0, "cases_ok": 0, "last_case": None},
        {"group": "cusparselt_probe", "config": "torch", "name": "t", "dtype": "torch.float16", "rel_err": 3e-4, "torch_rel_err": 2e-4, "ok": True},
    ]
    cases += [{"group": "cifar10", "name": "fast-100ep", "returncode": "stopped at the step's deadline", "wall_s": 500.0, "startup_s": 40.0,
               "train_images_per_s": 31000.0, "curve": [{"epoch": 5, "elapsed_s": 80.0, "test_acc": 0.71}, {"epoch": 10, "elapsed_s": 160.0, "test_acc": 0.82}]}]
    tests = [
        {"step": "tests", "nodeid": "tests/test_a.py::test_one", "outcome": "passed"},
        {"step": "tests", "nodeid": "tests/test_a.py::test_two", "outcome": "failed", "message": "E   AssertionError: off by 3"},
        {"step": "tests", "nodeid": "tests/test_a.py::test_three", "outcome": "skipped", "message": summary_deadline()},
    ]
    doc = {"command": "lotus gpu-check", "budget_s": 480, "elapsed_s": 300, "steps_all": ["env", "speed-block", "tests", "cifar10"],
           "steps_chosen": ["env", "speed-block", "tests"], "steps": [{"name": "env", "status": "passed", "seconds": 9, "reason": ""}],
           "cases": cases, "tests": tests}
    text = summary.render(doc)
    assert text.startswith("# lotus gpu-check: NVIDIA H200") and "bfloat16 8192^3 matmul: 790 TFLOP/s" in text
    assert "| speed-block | not reached |" in text and "| cifar10 | not chosen |" in text
    # fc2 at 1.5x misses 1.6x; versus torch BSR: 1.7/1.2 and 1.5/1.2 both >= 1.2.
    target = [line for line in text.splitlines() if line.startswith("| block-sparse MLP layer (ViT-B")][0]
    assert "| fail |" in target and "ours fc1 block 64: 1.70x (NVIDIA H200); ours fc2 block 64: 1.50x" in target
    assert "| pass |" in [line for line in text.splitlines() if line.startswith("| block-sparse MLP layer (same cases) vs torch BSR")][0]
    assert "| vit_b-fc1 | forward | 1 | 1.20x | 1.70x |" in text and "| vit_b-fc2 | forward | 1 | 1.20x | 1.50x |" in text
    assert "| searched | no | crashed | 0/0 |" in text and "| torch | yes | passed | 24/24 |" in text
    assert "| tests | 1 | 1 | 0 | 1 (1) |" in text and "`tests/test_a.py::test_two` (tests): E   AssertionError: off by 3" in text
    assert "test accuracy against training time: 71.0% at 80 s, 82.0% at 160 s; 31000 training images/s (median epoch); 90% in 300 s: fail (not reached)" in text


def test_time_to_ninety_percent_charges_all_time_outside_the_epochs():
    run = {"startup_s": 40.0, "curve": [{"epoch": 80, "elapsed_s": 200.0, "test_acc": 0.895}, {"epoch": 90, "elapsed_s": 255.0, "test_acc": 0.901}]}
    assert summary.time_to_target(run) == "90% in 300 s: pass (epoch 90, at most 295 s of wall time)"
    assert summary.time_to_target({**run, "startup_s": 50.0}) == "90% in 300 s: fail (epoch 90, at most 305 s of wall time)"
    assert summary.time_to_target({"curve": [], "wall_s": 310.0, "returncode": 0}) == "90% in 300 s: fail (not reached)"
    cut = {"curve": run["curve"][:1], "wall_s": 240.0, "returncode": "stopped at the step's deadline"}
    assert summary.time_to_target(cut) == "90% in 300 s: not decided (the run stopped after 240 s)"


def summary_deadline():
    from lotus_kernels.recipe.tools.gpu_check.pytest_progress import DEADLINE_REASON

    return DEADLINE_REASON


# ---------------------------------------------------------------------------
# the real steps, on this CPU (tiny shapes, the interpreter)
# ---------------------------------------------------------------------------


def test_real_steps_on_the_cpu_through_the_command(tmp_path, capsys):
    out = tmp_path / "check"
    code = cli.main(["gpu-check", "--budget", "300", "--out", str(out), "--steps", "env", "speed-attn", "cusparselt", "correctness"])
    results = json.loads((out / "gpu_check.json").read_text())
    assert code == 0, results["steps"]
    assert [(s["name"], s["status"]) for s in results["steps"]] == [("env", "passed"), ("speed-attn", "passed"), ("cusparselt", "passed"), ("correctness", "passed")]
    groups = {c["group"] for c in results["cases"]}
    assert {"env", "patch_drop_attention", "cusparselt_probe"} <= groups
    outcomes = [t["outcome"] for t in results["tests"] if t["step"] == "correctness"]
    assert set(outcomes) == {"passed"} and len(outcomes) >= 15  # cuSPARSELt's tests are not in this step
    text = (out / "summary.md").read_text()
    assert "## Targets" in text and "### patch_drop_attention" in text and "Not probed: no CUDA device." in text
    assert len(list(out.iterdir())) <= MAX_FILES and {p.name for p in out.iterdir()} <= set(OUTPUT_FILES)
    assert "results in" in capsys.readouterr().out


def test_the_command_reports_bad_arguments_in_one_line(tmp_path, capsys):
    assert cli.main(["gpu-check", "--steps", "bogus", "--out", str(tmp_path / "x")]) == 2
    assert "unknown ['bogus']" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert cli.main(["gpu-check", "--out", str(tmp_path / "f")]) == 2


def test_lotus_table_step_runs_the_fast_pipeline_with_a_validation_split(tmp_path):
    from lotus_kernels.recipe.engine import fast_recipe
    from lotus_kernels.recipe.pipeline import PipelineConfig
    from lotus_kernels.recipe.tools.gpu_check.steps import table_command

    (tmp_path / "cifar.tar.gz").touch()  # the config checks that the source exists, not what it holds
    argv = table_command(tmp_path / "cifar.tar.gz", tmp_path / "run", "40")
    assert argv[1:3] == ["-m", "lotus_kernels"]
    args = cli.build_parser().parse_args(argv[3:])
    config = PipelineConfig.from_dict(cli._pipeline_fields(args))
    train = config.train_config
    assert config.patterns == ("unstructured", "2:4") and config.target_sparsity == 0.5
    assert train.holdout == 5000 and train.epochs == 40 and train.data_path == str(tmp_path / "cifar.tar.gz")
    assert (train.model, train.batch_size, train.lr, train.ema) == tuple(fast_recipe()[k] for k in ("model", "batch_size", "lr", "ema"))
    assert args.out == str(tmp_path / "run") and args.overwrite


def test_lotus_table_record_and_summary_finished_and_cut_short(tmp_path):
    from lotus_kernels.recipe.tools.gpu_check.steps import table_record

    finished = tmp_path / "finished"
    finished.mkdir()
    rows = [
        {"stage": "dense", "sparsity": 0.0, "acc_all_patches": 0.9, "note": ""},
        {"stage": "tickets", "sparsity": 0.0, "acc_all_patches": 0.895, "acc_tickets": 0.88, "note": ""},
        {"stage": "tickets + 2:4 pruning", "sparsity": 0.5, "acc_all_patches": 0.8812, "acc_tickets": 0.87, "note": ""},
    ]
    es = {"knee": 0.3, "dense_accuracy": 0.9, "curve": {"0.1": 0.9, "0.3": 0.893}}
    (finished / "summary.json").write_text(json.dumps({"rows": rows, "essential_sparsity": es, "decision_split": "val", "timing": {}, "other": 1}))
    record = table_record(finished)
    assert record["finished"] and "other" not in record and record["essential_sparsity"] == es
    assert record["dense_run"] == {"curve": [], "train_s": 0.0, "train_images_per_s": None}  # no dense/metrics.jsonl here
    assert [r["points_vs_dense"] for r in record["rows"]] == [0.0, -0.5, -1.88]

    cut = tmp_path / "cut"
    dense = [
        {"epoch": 1, "epoch_time_s": 30.0, "images_per_s": 1500.0, "test_acc": 0.3},  # the first epoch compiles: not in the median
        {"epoch": 2, "epoch_time_s": 2.0, "images_per_s": 22500.0},
        {"epoch": 3, "epoch_time_s": 1.5, "images_per_s": 30000.0, "test_acc": 0.5},
        {"epoch": 4, "epoch_time_s": 1.6, "images_per_s": 28000.0},
    ]
    for stage, lines in (("dense", dense), ("tickets", [{"epoch": 1}])):
        (cut / stage).mkdir(parents=True)
        (cut / stage / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (cut / "essential_sparsity").mkdir()  # no metrics: not a finished epoch
    assert table_record(cut) == {
        "finished": False, "stages_with_metrics": ["dense", "tickets"],
        "dense_run": {
            "curve": [{"epoch": 1, "elapsed_s": 30.0, "test_acc": 0.3}, {"epoch": 3, "elapsed_s": 33.5, "test_acc": 0.5}],
            "train_s": 35.1, "train_images_per_s": 28000.0,
        },
    }

    cases = [
        {"group": "lotus_table", "name": "fast-40ep", "returncode": 0, "wall_s": 400.0, **record},
        {"group": "lotus_table", "name": "fast-100ep", "returncode": "stopped at the step's deadline", "wall_s": 500.0, **table_record(cut)},
    ]
    text = summary.render({"cases": cases, "steps": []})
    assert "## LOTUS table on CIFAR-10" in text
    assert "| tickets + 2:4 pruning | 50% | 88.1% | 87.0% | -1.88 |" in text and "| dense | 0% | 90.0% | - | +0.00 |" in text
    assert "Essential Sparsity (val split, no fine-tuning): 10%: 90.0%, 30%: 89.3%; knee 30.0%" in text
    assert ("fast-100ep: exit stopped at the step's deadline, 500.0 s wall; dense run: test accuracy against training time: "
            "30.0% at 30 s, 50.0% at 34 s; 28000 training images/s (median epoch); not finished: stages with metrics ['dense', 'tickets']") in text


def test_throughput_groups_are_shown_in_images_per_s():
    cases = [
        {"group": "train_throughput_train_step", "name": f"bench_train_throughput[{p}]", "provider": p, "p50_ms": ms, "images_per_s": 512 / ms * 1e3,
         "pct_of_peak": pct, "model": "vit_lite_cifar", "recipe": "fast", "batch": 512, "compile": p[10:], "device": "NVIDIA H200"}
        for p, ms, pct in (("fast-b512-compiled", 17.0, 4.9), ("fast-b512-reduce-overhead", 15.0, None))
    ]
    text = summary.render({"cases": cases, "steps": []})
    assert "| case | images/s | p50 ms | % of measured peak |" in text
    assert "| fast-b512-compiled | 30,118 | 17 | 4.9 |" in text and "| fast-b512-reduce-overhead | 34,133 | 15 | - |" in text
    assert "fast profile reduce-overhead: 34,133 images/s (NVIDIA H200)" in text  # and the target reads them
