"""The LOTUS pipeline end to end on synthetic data (CPU, seconds), its export, and config checks before any training."""

import json

import pytest
import torch

from lotus_kernels import cli
from lotus_kernels import train as engine
from lotus_kernels.nn import SparseLinear
from lotus_kernels.pipeline import PipelineConfig, load_exported, run_pipeline

TINY = dict(
    train=dict(model="vit_micro_cifar", dataset="synthetic", epochs=2, batch_size=64, synthetic_train=512, synthetic_test=256,
               holdout=128, lr=2e-3, progress=False),
    ticket_epochs=1, finetune_epochs=1, isp_ingredients=2, isp_subset_fraction=0.2, target_sparsity=0.5,
    es_sparsities=(0.3, 0.5, 0.7), patterns=("unstructured", "2:4"), timing_batch=8,
)


def test_pipeline_end_to_end_on_synthetic_data(tmp_path):
    summary = run_pipeline(PipelineConfig(**TINY), tmp_path, log=lambda *a: None)
    stages = [r["stage"] for r in summary["rows"]]
    assert stages == ["dense", "tickets", "random patches (control)", "tickets + unstructured pruning", "tickets + 2:4 pruning"]
    for r in summary["rows"][3:]:
        assert r["sparsity"] == 0.5 and 0 <= r["acc_all_patches"] <= 1 and 0 <= r["acc_tickets"] <= 1
    for name in ("report.md", "accuracy_per_epoch.png", "essential_sparsity.png", "instant_soup.png", "model.safetensors", "timing.json", "summary.json"):
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "report.md").read_text()
    assert "(synthetic data)" in report and "## Essential Sparsity" in report and "tickets + 2:4 pruning" in report
    # The export is compact and loads back into a model with SparseLinear layers of exactly the target sparsity.
    model = load_exported(tmp_path / "model.safetensors")
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 4 * 2  # qkv, proj, fc1, fc2 of 2 blocks
    kept = sum(int(m.mask().sum()) for m in layers)
    total = sum(m.in_features * m.out_features for m in layers)
    assert total - kept == int(0.5 * total + 0.5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_pipeline_with_fixed_tickets(tmp_path):
    config = PipelineConfig(**{**TINY, "ticket_mode": "fixed", "patterns": ("unstructured",), "random_control": False})
    summary = run_pipeline(config, tmp_path, log=lambda *a: None)
    assert [r["stage"] for r in summary["rows"]] == ["dense", "tickets", "tickets + unstructured pruning"]
    assert "fixed mode" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "change,match",
    [
        ({"train": {"model": "no_such_vit"}}, "model"),
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"target_sparsity": 1.0}, "target_sparsity"),
        ({"target_sparsity": -0.1}, "target_sparsity"),
        ({"train": {"dataset": "cifar10", "data_path": "/nonexistent/cifar"}}, "cifar10"),
        ({"patterns": ["3:8"]}, "patterns"),
        ({"patterns": ["2:4"], "target_sparsity": 0.3}, "2:4"),
        ({"isp_vote_threshold": 9}, "isp_vote_threshold"),
        ({"no_such_key": 1}, "unknown pipeline config keys"),
        ({"ticket_mode": "sticky"}, "ticket_mode"),
    ],
)
def test_bad_configs_fail_before_any_training(monkeypatch, tmp_path, change, match):
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("training started"))
    fields = json.loads(json.dumps(TINY))
    for key, value in change.items():
        if key == "train":
            fields["train"].update(value)
        else:
            fields[key] = value
    with pytest.raises((ValueError, TypeError), match=match):
        PipelineConfig.from_dict(fields)


def test_cli_pipeline_rejects_a_bad_config_with_a_clear_message(capsys, tmp_path):
    code = cli.main(["pipeline", "--demo", "--set", "keep_ratio=2", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "keep_ratio must be a number in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
