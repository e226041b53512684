"""The tickets x pruning ablation on synthetic data (CPU, seconds): every variant, reuse of a pipeline run, bad input."""

import json

import pytest

from lotus_kernels.recipe import cli
from lotus_kernels.recipe.ablation import VARIANTS, check_variants, rewrite_ablation_report, run_ablation
from lotus_kernels.recipe.pipeline import PipelineConfig, run_pipeline

TINY = dict(
    train=dict(model="vit_micro_cifar", dataset="synthetic", epochs=2, batch_size=64, synthetic_train=512, synthetic_test=256,
               holdout=128, lr=2e-3, progress=False),
    ticket_epochs=1, finetune_epochs=2, ingredients=2, subset_fraction=0.2, target_sparsity=0.5,
    es_sparsities=(0.3, 0.5, 0.7), patterns=("unstructured",), random_control=False, timing_batch=8,
)
QUIET = dict(log=lambda *a: None)


def test_every_variant_prunes_to_the_target_and_trains_the_stated_epochs(tmp_path):
    summary = run_ablation(PipelineConfig(**TINY), tmp_path, **QUIET)
    rows = {r["variant"]: r for r in summary["rows"]}
    assert list(rows) == list(VARIANTS)
    for name, r in rows.items():
        v = VARIANTS[name]
        # Exactly the target among the mask, and the model holds those zeros (a kept weight is never exactly 0 here).
        assert r["mask_sparsity"] == 0.5 and r["weight_sparsity"] == 0.5, name
        # Matched recovery: a ticket student has had ticket_epochs already, a pruned dense model gets them now.
        expected = 0 if not v.recover else TINY["finetune_epochs"] + (TINY["ticket_epochs"] if v.source == "dense" else 0)
        assert r["recovery_epochs"] == expected, name
        assert 0 <= r["acc_all_patches"] <= 1 and 0 <= r["acc_tickets"] <= 1
        assert r["drop_vs_dense_on_tickets"] == pytest.approx(summary["reference"]["dense"]["acc_all_patches"] - r["acc_tickets"])
        if v.recover:
            history = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            assert len(history) == expected and "test_tickets_acc" in history[-1]
        else:
            assert not (tmp_path / name).exists()
    overlap = summary["selector_overlap"]
    assert overlap["random_expected"] == 0.5 and 0 <= overlap["dense_isp"] <= 1 and set(overlap) == {"random_expected", "dense_isp"}
    for name in ("report.md", "ablation.json", "recovery.png"):
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {name} |" in report for name in VARIANTS) and "How much pruning moves the tickets" in report
    # A finished folder's report is redrawn from its own files, identically.
    (tmp_path / "report.md").unlink()
    rewrite_ablation_report(tmp_path)
    assert (tmp_path / "report.md").read_text() == report


def test_ours_reuses_a_pipeline_run_and_reproduces_its_combined_row(tmp_path):
    # The ablation's "ours" is the pipeline's own combination: from the same run, the same numbers.
    pipeline = run_pipeline(PipelineConfig(**TINY), tmp_path / "pipeline", **QUIET)
    summary = run_ablation(None, tmp_path / "ablation", from_run=tmp_path / "pipeline", variants=["ours", "ours_no_recovery"], **QUIET)
    rows = {r["stage"]: r for r in pipeline["rows"]}
    assert summary["reference"]["dense"]["acc_all_patches"] == rows["dense"]["acc_all_patches"]
    assert summary["reference"]["tickets"] == {k: rows["tickets"][k] for k in ("acc_all_patches", "acc_tickets")}
    ours = summary["rows"][0]
    combined = rows["tickets + unstructured pruning"]
    # The pipeline evaluates compact SparseLinear layers, the ablation the dense weights with zeros: one image may flip.
    assert ours["acc_tickets"] == pytest.approx(combined["acc_tickets"], abs=1 / 256)
    assert ours["acc_all_patches"] == pytest.approx(combined["acc_all_patches"], abs=1 / 256)
    assert [r["variant"] for r in summary["rows"]] == ["ours", "ours_no_recovery"]
    # Pruning settings may change against the run; what its models were made with may not.
    changed = PipelineConfig(**{**TINY, "target_sparsity": 0.7, "patterns": ("unstructured",)})
    summary = run_ablation(changed, tmp_path / "ablation70", from_run=tmp_path / "pipeline", variants=["one_shot_no_recovery"], **QUIET)
    assert summary["rows"][0]["weight_sparsity"] == pytest.approx(0.7, abs=1e-5)
    with pytest.raises(ValueError, match=r"keep_ratio"):
        run_ablation(PipelineConfig(**{**TINY, "keep_ratio": 0.25}), tmp_path / "x", from_run=tmp_path / "pipeline", **QUIET)


@pytest.mark.parametrize(
    "variants,match",
    [(["ours", "no_such"], r"unknown variants \['no_such'\]"), ("ours", "non-empty list"), ([], "non-empty list")],
)
def test_bad_variants_are_refused(variants, match):
    with pytest.raises(ValueError, match=match):
        check_variants(variants)


def test_bad_sources_fail_before_any_training(tmp_path):
    with pytest.raises(ValueError, match="not a finished `lotus pipeline` run folder"):
        run_ablation(None, tmp_path / "out", from_run=tmp_path / "nothing", **QUIET)
    with pytest.raises(TypeError, match="config must be a PipelineConfig"):
        run_ablation({"train": {}}, tmp_path / "out", **QUIET)
    with pytest.raises(ValueError, match="unknown variants"):
        run_ablation(PipelineConfig(**TINY), tmp_path / "out", variants=["nope"], **QUIET)
    assert not (tmp_path / "out").exists()


def test_cli_ablate_needs_a_source_and_says_so(capsys, tmp_path):
    assert cli.main(["ablate", "--out", str(tmp_path / "x")]) == 2
    assert "give --from PIPELINE_RUN" in capsys.readouterr().err
    assert cli.main(["ablate", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "is not a `lotus pipeline` run folder" in capsys.readouterr().err
    assert cli.main(["ablate", "--demo", "--variants", "bogus", "--out", str(tmp_path / "x")]) == 2
    assert "unknown variants" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
