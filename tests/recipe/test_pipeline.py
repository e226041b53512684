"""The LOTUS pipeline end to end on synthetic data (CPU, seconds), its export, and config checks before any training."""

import json

import pytest
import torch

from lotus_kernels.recipe import cli
from lotus_kernels.recipe import stages
from lotus_kernels.nn import SparseLinear
from lotus_kernels.recipe.pipeline import PipelineConfig, run_pipeline
from lotus_kernels.recipe.stages import load_exported

TINY = dict(
    train=dict(model="vit_micro_cifar", dataset="synthetic", epochs=2, batch_size=64, synthetic_train=512, synthetic_test=256,
               holdout=128, lr=2e-3, progress=False),
    ticket_epochs=1, finetune_epochs=1, ingredients=2, subset_fraction=0.2, target_sparsity=0.5,
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
    assert report.startswith("# LOTUS pipeline: vit_micro_cifar on synthetic data\n") and "## Essential Sparsity" in report
    assert "tickets + 2:4 pruning" in report and "## At a glance" in report and "Tickets vs random patches of the same count" in report
    # One unit (%), every accuracy names its split, differences in points; decisions on the validation split.
    assert "| stage | sparsity | test accuracy, all patches | test accuracy, on its kept patches | note |" in report
    dense = summary["rows"][0]["acc_all_patches"]
    assert f"| dense | 0.0% | {dense:.2%} |" in report and f"{dense:.4f}" not in report
    assert "| sparsity | val accuracy, one-shot, no fine-tuning |" in report and "at most 1 point below the dense model's" in report
    assert "measured on the validation split carved from the training set (128 images, not trained on)" in report and summary["decision_split"] == "val"
    # The export is compact and loads back into a model with SparseLinear layers of exactly the target sparsity.
    model = load_exported(tmp_path / "model.safetensors")
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 4 * 2  # qkv, proj, fc1, fc2 of 2 blocks
    kept = sum(int(m.mask().sum()) for m in layers)
    total = sum(m.in_features * m.out_features for m in layers)
    assert total - kept == int(0.5 * total + 0.5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_every_stage_trains_compiled(tmp_path):
    # What compile="auto" does on CUDA, forced here: the dense run, the ticket students' hooked forward (the
    # frozen selector inside), Instant Soup's ingredients and the fine-tuning with masks held all go through
    # torch.compile. compile=True raises where "auto" would fall back to eager, so a stage dynamo cannot
    # trace fails here instead of running slowly on a GPU. (About a minute on 2 cores, mostly compiling.)
    train = {**TINY["train"], "epochs": 1, "synthetic_train": 256, "synthetic_test": 128, "holdout": 64, "compile": True}
    config = PipelineConfig(**{**TINY, "train": train, "es_sparsities": (0.3, 0.5)})
    summary = run_pipeline(config, tmp_path, log=lambda *a: None)
    assert [r["stage"] for r in summary["rows"]][-2:] == ["tickets + unstructured pruning", "tickets + 2:4 pruning"]
    for stage in ("dense", "tickets", "random"):
        assert json.loads((tmp_path / stage / "config.json").read_text())["compile"] is True, stage


def test_resume_skips_finished_stages_and_redoes_only_what_is_missing(tmp_path):
    import shutil

    config = PipelineConfig(**TINY)
    first = run_pipeline(config, tmp_path, log=lambda *a: None)
    # A folder holding a run is never overwritten by accident, and a resume must keep the config.
    with pytest.raises(ValueError, match=r"already holds a pipeline run: resume=True \(--resume\) continues it"):
        run_pipeline(config, tmp_path, log=lambda *a: None)
    changed = PipelineConfig(**{**TINY, "ingredients": 3})
    with pytest.raises(ValueError, match=r"cannot resume .* with a different config \(changed: ingredients\)"):
        run_pipeline(changed, tmp_path, log=lambda *a: None, resume=True)
    with pytest.raises(ValueError, match="holds no pipeline run"):
        run_pipeline(config, tmp_path / "empty", log=lambda *a: None, resume=True)
    # The last stage's run is lost (killed before it finished): only it is trained again.
    shutil.rmtree(tmp_path / "combined_2of4")
    # A folder the code before issue 19 wrote (ISP keys with their isp_ prefix) resumes all the same.
    old_names = {"ingredients": "isp_ingredients", "subset_fraction": "isp_subset_fraction", "prune_step": "isp_prune_step",
                 "vote_threshold": "isp_vote_threshold", "ingredient_epochs": "isp_ingredient_epochs"}
    saved = json.loads((tmp_path / "pipeline_config.json").read_text())
    (tmp_path / "pipeline_config.json").write_text(json.dumps({old_names.get(k, k): v for k, v in saved.items()}))
    logged = []
    second = run_pipeline(config, tmp_path, log=logged.append, resume=True)
    assert second["rows"][:4] == first["rows"][:4]  # dense, tickets, control, unstructured: read back exactly
    assert "  (read back from essential_sparsity.json)" in logged and "  (read back from instant_soup.json and its masks)" in logged
    assert second["rows"][4]["stage"] == "tickets + 2:4 pruning" and (tmp_path / "combined_2of4" / "checkpoints" / "last.pt").is_file()
    assert second["instant_soup"] == first["instant_soup"] and second["essential_sparsity"] == first["essential_sparsity"]
    # overwrite=True starts afresh over it (checked before any work; a whole run more is not needed to see it).
    from lotus_kernels.recipe.pipeline import _check_run_folder

    assert _check_run_folder(tmp_path, changed, resume=False, overwrite=True) is None
    with pytest.raises(ValueError, match="exclude each other"):
        _check_run_folder(tmp_path, config, resume=True, overwrite=True)


def test_the_report_says_loudly_when_decisions_were_made_on_the_test_split(tmp_path):
    from lotus_kernels.recipe.pipeline import write_pipeline_report

    history = [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.6, "test_tickets_acc": 0.55}]
    summary = {
        "model": "vit_micro_cifar", "dataset": "cifar10", "decision_split": "test",
        "rows": [{"stage": "dense", "sparsity": 0.0, "acc_all_patches": 0.6, "note": ""}],
        "essential_sparsity": {"knee": 0.3, "dense_accuracy": 0.61, "curve": {0.3: 0.605}},
        "instant_soup": {"rounds": 2, "final_sparsity": 0.5}, "export": "model.safetensors", "export_bytes": 1e6,
        "timing": {"batch": 8, "device": "cpu", "dense_s": 0.1, "sparse_s": 0.1, "sparse_on_tickets_s": 0.05, "note": ""},
        "sparsity": "",
    }
    config = PipelineConfig(**{**TINY, "train": {**TINY["train"], "holdout": 0}})
    report = write_pipeline_report(tmp_path, config, summary, {"dense": (history, 0), "tickets": (history, 2)}).read_text()
    assert "**The knee and the Instant Soup rounds were chosen on the test split**" in report
    assert "| sparsity | test accuracy, one-shot, no fine-tuning |" in report and "| 30% | 60.50% |" in report


def test_stages_share_one_epoch_axis():
    from lotus_kernels.recipe.reporting.plots import stage_series

    dense = [{"epoch": 1, "test_acc": 0.2}, {"epoch": 2, "test_acc": 0.4}]
    tickets = [{"epoch": 1, "test_acc": 0.41, "test_tickets_acc": 0.45}]
    series = stage_series([("dense", dense, 0), ("tickets", tickets, 2), ("random", [{"epoch": 1, "test_acc": 0.4}], 2)])
    assert series == [
        ("dense, all patches", [(1, 20.0), (2, 40.0)], False),
        ("tickets, all patches", [(3, 41.0)], False), ("tickets, on its kept patches", [(3, 45.0)], True),
        ("random, all patches", [(3, 40.0)], False),
    ]


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
        ({"vote_threshold": 9}, "vote_threshold"),
        ({"no_such_key": 1}, "unknown pipeline config keys"),
        ({"ticket_mode": "sticky"}, "ticket_mode"),
    ],
)
def test_bad_configs_fail_before_any_training(monkeypatch, tmp_path, change, match):
    monkeypatch.setattr(stages, "train", lambda *a, **k: pytest.fail("training started"))
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


def test_cli_pipeline_never_overwrites_a_run_unasked(capsys, tmp_path):
    (tmp_path / "pipeline_config.json").write_text("{}")
    assert cli.main(["pipeline", "--demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already holds a pipeline run: resume=True (--resume) continues it" in err and "(--overwrite) starts afresh" in err
    assert cli.main(["pipeline", "--demo", "--out", str(tmp_path), "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["pipeline", "--demo", "--out", str(tmp_path), "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err
