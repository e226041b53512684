"""`python -m lotus_kernels.info` and the demo, run as a user would run them."""

import json
import subprocess
import sys

import torch

from lotus_kernels import info
from lotus_kernels.recipe.tools import demo


def run_module(*args):
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_info_reports_versions_build_and_backends():
    text = run_module("lotus_kernels.info")
    assert f"torch          {torch.__version__}" in text
    assert "extension lotus_kernels._C" in text and "built          yes" in text
    assert "auto: dense" in text
    assert "auto decisions on this GPU" in text
    data = json.loads(run_module("lotus_kernels.info", "--json"))
    assert data["extension"]["built"] is True
    assert data["compaction_ops"]["cpu"] is None
    if not torch.cuda.is_available():
        assert data["compaction_ops"]["cuda"] is not None  # says why not
    assert set(data["backends"]["cpu"]) == {"unstructured", "2:4", "block"}
    assert "cusparselt" in data["backends"]["cpu"]["2:4"]


def test_info_lists_saved_auto_decisions(monkeypatch):
    decisions = {"2:4 bfloat16 out 4096 in 1024 values [4096, 512] rows<=16384 among triton,cusparselt,dense": {
        "choice": "cusparselt", "times_ms": {"triton": 0.41, "cusparselt": 0.30, "dense": 0.38}}}
    text = info.format_report({**info.collect(), "auto_decisions": decisions, "auto_cache": "/tmp/x.json"})
    assert "cache: /tmp/x.json" in text
    assert "rows<=16384 among triton,cusparselt,dense: cusparselt  [cusparselt 0.300 ms, dense 0.380 ms, triton 0.410 ms]" in text


def test_info_knows_which_arches_run_where():
    assert info._arch_runs_on("8.0;9.0", (8, 6))  # sm_80 SASS runs on sm_86
    assert info._arch_runs_on("8.0;9.0", (9, 0))
    assert not info._arch_runs_on("8.0;9.0", (10, 0))  # no PTX: Blackwell needs a rebuild
    assert not info._arch_runs_on("9.0", (8, 0))
    assert info._arch_runs_on("8.0+PTX", (8, 9))


def test_demo_table_matches_fake_sparse_exactly(tmp_path, capsys):
    out = tmp_path / "demo.json"
    code = demo.main(["--batch", "1", "--repeats", "1", "--json", str(out)])
    table = capsys.readouterr().out
    assert code == 0
    assert "2:4" in table and "block 32x32 90%" in table
    result = json.loads(out.read_text())
    assert [row["max_abs_error"] for row in result["rows"]] == [0.0] * 5
    for row in result["rows"][1:]:
        assert row["weight_bytes_compact"] < 0.6 * row["weight_bytes_dense"]
        assert row["state_dict_bytes"] < result["rows"][0]["state_dict_bytes"]
    assert result["versions"]["torch"] == torch.__version__ and "date" in result and "command" in result
