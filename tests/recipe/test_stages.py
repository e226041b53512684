"""`lotus prune` and `lotus finetune`: one pipeline stage at a time, on checkpoints (CPU, seconds)."""

import copy
import json

import pytest
import torch

from lotus_kernels.recipe import cli, stages
from lotus_kernels.recipe import engine
from lotus_kernels.masks import num_pruned
from lotus_kernels.nn import SparseLinear
from lotus_kernels.recipe.stages import load_exported
from lotus_kernels.recipe.method import find_knee, one_shot_masks

DENSE = {
    "model": "vit_micro_cifar", "dataset": "synthetic", "synthetic_train": 320, "synthetic_test": 128, "holdout": 64,
    "batch_size": 64, "epochs": 1, "lr": 2e-3, "warmup_epochs": 0.5, "progress": False,
}
CHECKPOINT_KEYS = {
    "format", "format_version", "model", "model_source", "model_class", "num_classes", "optimizer", "scheduler", "scaler",
    "epoch", "step", "rng", "config", "extra", "history", "best", "world_size", "versions",
}
QUIET = {"log": lambda *a: None}
ISP_TINY = {"ingredients": 2, "subset_fraction": 0.25, "prune_step": 0.3}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The micro model gains nothing from intra-op threads, and on a busy two-core CI machine their
    # spin-waits made this file 5x slower; restored for the other test files.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A dense checkpoint written by `lotus train` (with a holdout, so decisions are measured on val)."""
    run = tmp_path_factory.mktemp("dense")
    args = ["train", "--out", str(run)] + [a for k, v in DENSE.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert cli.main(args) == 0
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def one_shot(dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_shot")
    return out, stages.prune_checkpoint(dense, out, method="one-shot", sparsity=0.5, **QUIET)


def _counts(model):
    masks = stages.sparse_masks(model)
    total = sum(m.numel() for m in masks.values())
    return total - sum(int(m.sum()) for m in masks.values()), total


def test_one_shot_prunes_exactly_the_smallest_half_into_an_engine_checkpoint(dense, one_shot):
    out, result = one_shot
    rebuilt = engine.model_from_checkpoint(out / "pruned.pt")
    layers = {n: m for n, m in rebuilt.named_modules() if isinstance(m, SparseLinear)}
    assert len(layers) == 4 * 2 and all(m.pattern == "unstructured" for m in layers.values())
    pruned, total = _counts(rebuilt)
    assert pruned == num_pruned(total, 0.5) == result["pruned"] and total == result["prunable"]
    # Exactly the global-magnitude mask of the dense weights, and the same function as dense weights * mask.
    reference = engine.model_from_checkpoint(dense)
    expected = one_shot_masks(reference, 0.5)
    masks = stages.sparse_masks(rebuilt)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], expected[k]) for k in masks)
    with torch.no_grad():
        for name, mask in expected.items():
            reference.get_submodule(name).weight.masked_fill_(~mask, 0)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), reference(x), atol=1e-5, rtol=1e-5)
    # The engine's checkpoint format: the keys train() documents (train may add optional ones, read with .get).
    ckpt = engine.load_checkpoint(out / "pruned.pt")
    assert CHECKPOINT_KEYS <= set(ckpt) and CHECKPOINT_KEYS <= set(engine.load_checkpoint(dense))
    assert ckpt["model_source"] == "argument" and ckpt["epoch"] == 0 and ckpt["history"] == []
    assert ckpt["extra"]["pruning"]["method"] == "one-shot" and ckpt["extra"]["pruning"]["pruned"] == pruned
    # prune.json: what, how far, measured where, under what.
    saved = json.loads((out / "prune.json").read_text())
    assert saved["eval_split"] == "val" and set(saved["accuracy"]["pruned"]) == {"val", "test"}
    assert saved["arguments"]["method"] == "one-shot" and saved["arguments"]["sparsity"] == 0.5
    assert saved["environment"]["versions"]["torch"] == torch.__version__ and saved["environment"]["date"]


@pytest.mark.parametrize("pattern,block_size", [("2:4", 32), ("block", 16)])
def test_pattern_projection(dense, tmp_path, pattern, block_size):
    result = stages.prune_checkpoint(dense, tmp_path, method="one-shot", sparsity=0.5, pattern=pattern, block_size=block_size, **QUIET)
    rebuilt = engine.model_from_checkpoint(tmp_path / "pruned.pt")
    masks = stages.sparse_masks(rebuilt)
    assert all(m.pattern == pattern for m in rebuilt.modules() if isinstance(m, SparseLinear))
    for name, mask in masks.items():
        out_f, in_f = mask.shape
        if pattern == "2:4":
            assert bool((mask.reshape(out_f, in_f // 4, 4).sum(-1) == 2).all()), name
        else:
            blocks = mask.reshape(out_f // 16, 16, in_f // 16, 16)
            assert bool((blocks.all(3).all(1) | ~blocks.any(3).any(1)).all()), name
    pruned, total = _counts(rebuilt)
    assert pruned == result["pruned"] and (pattern != "2:4" or pruned == total // 2)
    assert "before_projection" in result["accuracy"]


def test_essential_prunes_at_the_knee_of_a_sweep_capped_by_sparsity(dense, tmp_path):
    result = stages.prune_checkpoint(dense, tmp_path, method="essential", sparsity=0.6, es_sparsities=[0.2, 0.4, 0.8], **QUIET)
    es = result["essential_sparsity"]
    assert [s for s, _ in es["curve"]] == [0.2, 0.4, 0.6]  # 0.8 is above the cap; the cap itself is swept
    assert es["knee"] == find_knee([s for s, _ in es["curve"]], [a for _, a in es["curve"]], es["dense_accuracy"], 0.01)
    assert result["pruned"] == num_pruned(result["prunable"], es["knee"]) and result["mask_sparsity"] == es["knee"]
    assert (tmp_path / "essential_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    # Any drop allowed: the knee is the cap.
    loose = stages.prune_checkpoint(dense, tmp_path / "loose", method="essential", sparsity=0.6, es_max_drop=1.0, **QUIET)
    assert loose["essential_sparsity"]["knee"] == 0.6 and loose["pruned"] == num_pruned(loose["prunable"], 0.6)
    assert engine.load_checkpoint(tmp_path / "loose" / "pruned.pt")["extra"]["pruning"]["knee"] == 0.6


def test_instant_soup_with_tiny_settings(dense, tmp_path):
    result = stages.prune_checkpoint(dense, tmp_path, method="instant-soup", sparsity=0.5, **ISP_TINY, **QUIET)
    isp = result["instant_soup"]
    assert isp["rounds"] >= 1 and isp["final_pruned"] == num_pruned(isp["num_prunable"], 0.5) and isp["config"]["finetune"] is False
    assert isp["start"] in ("knee", "dense") and "essential_sparsity" in result
    assert _counts(engine.model_from_checkpoint(tmp_path / "pruned.pt")) == (isp["final_pruned"], isp["num_prunable"])
    for name in ("instant_soup.png", "essential_sparsity.png", "prune.json"):
        assert (tmp_path / name).is_file(), name
    dense_start = stages.prune_checkpoint(dense, tmp_path / "d", sparsity=0.3, isp_start="dense", **ISP_TINY, **QUIET)
    assert dense_start["instant_soup"]["start"] == "dense" and "essential_sparsity" not in dense_start


def test_the_instant_soup_plot_ends_at_the_projected_models_accuracy(dense, tmp_path, monkeypatch):
    drawn = []
    real = stages.plot_instant_soup
    monkeypatch.setattr(stages, "plot_instant_soup", lambda *a, **k: drawn.append(k) or real(*a, **k))
    result = stages.prune_checkpoint(dense, tmp_path, method="instant-soup", sparsity=0.5, pattern="2:4", **ISP_TINY, **QUIET)
    split = result["eval_split"]
    (kwargs,) = drawn
    # The 2:4 result, not the unstructured mask's accuracy before the projection.
    assert kwargs["projected"] == ("after 2:4 projection", result["accuracy"]["pruned"][split]) and kwargs["split"] == split
    assert (tmp_path / "instant_soup.png").is_file()


def _masks_and_values(path):
    model = engine.model_from_checkpoint(path)
    return stages.sparse_masks(model), {n: m.values.detach().clone() for n, m in model.named_modules() if isinstance(m, SparseLinear)}


@pytest.mark.parametrize("tickets", [None, {"keep_ratio": 0.5, "mode": "random"}])
def test_finetune_keeps_the_mask_exactly(one_shot, tmp_path, capsys, tickets):
    pruned_path = one_shot[0] / "pruned.pt"
    before, values_before = _masks_and_values(pruned_path)
    result = stages.finetune_checkpoint(pruned_path, tmp_path, epochs=1, overrides={"progress": False}, **(tickets or {}), **QUIET)
    last = tmp_path / "checkpoints" / "last.pt"
    assert result["checkpoint"] == str(last)
    after, values_after = _masks_and_values(last)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(values_before[k], values_after[k]) for k in values_before)  # it did train
    rebuilt = engine.model_from_checkpoint(last)
    assert all(bool((m.to_dense()[~m.mask()] == 0).all()) for m in rebuilt.modules() if isinstance(m, SparseLinear))
    assert result["sparsity"] == 0.5 and result["masks_fixed"] and result["lr"] == pytest.approx(DENSE["lr"] * 0.5)
    assert ("test_tickets_acc" in result["metrics"]) == (tickets is not None)
    assert (tmp_path / "report.md").is_file() and (tmp_path / "finetune.json").is_file()
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(last)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["acc"] == pytest.approx(result["metrics"]["test_acc"], abs=1e-6)


def test_finetune_on_fixed_tickets(dense, one_shot, tmp_path):
    pruned_path = one_shot[0] / "pruned.pt"
    before, _ = _masks_and_values(pruned_path)
    result = stages.finetune_checkpoint(
        pruned_path, tmp_path, epochs=1, keep_ratio=0.5, mode="fixed", selector_checkpoint=dense, overrides={"progress": False}, **QUIET
    )
    after, _ = _masks_and_values(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "test_tickets_acc" in result["metrics"] and result["tickets"]["mode"] == "fixed"


def test_cli_prune_finetune_online_eval_export(dense, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert cli.main(["prune", "--checkpoint", str(dense), "--out", str(pruned), "--method", "one-shot", "--pattern", "2:4"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-3])
    assert line["sparsity"] == 0.5 and line["pattern"] == "2:4" and line["eval_split"] == "val"
    tuned = tmp_path / "tuned"
    assert cli.main([
        "finetune", "--checkpoint", str(pruned / "pruned.pt"), "--out", str(tuned), "--epochs", "1",
        "--keep-ratio", "0.5", "--selector", str(dense), "--set", "progress=false",
    ]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-4])
    assert {"test_acc", "test_tickets_acc", "val_acc"} <= set(metrics)
    before, _ = _masks_and_values(pruned / "pruned.pt")
    after, _ = _masks_and_values(tuned / "checkpoints" / "last.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)
    x = torch.randn(2, 3, 32, 32)
    for checkpoint in (pruned / "pruned.pt", tuned / "checkpoints" / "last.pt"):
        assert cli.main(["eval", "--checkpoint", str(checkpoint), "--split", "val"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == DENSE["holdout"]
        exported = checkpoint.with_suffix(".safetensors")
        assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(exported)]) == 0
        model = load_exported(exported)
        assert isinstance(model.blocks[0].mlp.fc1, SparseLinear) and model.blocks[0].mlp.fc1.pattern == "2:4"
        torch.testing.assert_close(model(x), engine.model_from_checkpoint(checkpoint)(x))
        # lotus eval takes the export too, and gives the checkpoint's accuracy.
        capsys.readouterr()
        assert cli.main(["eval", "--checkpoint", str(exported), "--split", "val"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == DENSE["holdout"]
    # Simple mistakes end in one line, not a traceback.
    for out, says in ((tmp_path / "nowhere" / "m.safetensors", "does not exist"), (tmp_path, "is a folder")):
        assert cli.main(["export", "--checkpoint", str(pruned / "pruned.pt"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lotus export: error: ") and says in err and err.count("\n") == 1, err


def _no_work(monkeypatch):
    def fail(*a, **k):
        pytest.fail("work started before the arguments were checked")

    for name in ("train", "instant_soup_prune", "essential_sparsity_sweep", "one_shot_masks", "sparsify_masked_"):
        monkeypatch.setattr(stages, name, fail)


@pytest.mark.parametrize(
    "args,match",
    [
        (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        (["--method", "magic"], "method must be one of"),
        (["--pattern", "3:8"], "pattern must be one of"),
        (["--pattern", "2:4", "--sparsity", "0.3"], "use sparsity=0.5"),
        (["--pattern", "block", "--block-size", "48"], "divisible by block_size"),
        (["--ingredients", "0"], "ingredients"),
        (["--vote-threshold", "9"], "vote_threshold"),
        (["--isp-lr", "0"], "lr must be > 0"),
        (["--max-drop", "2"], "es_max_drop must be in"),
        (["--es-max-drop", "-1"], "es_max_drop must be in"),
        (["--isp-start", "middle"], "isp_start"),
        (["--set", "no_such_field=1"], "unknown config keys"),
        (["--checkpoint", "MISSING"], "does not exist"),
        (["--checkpoint", "PRUNED"], "already holds 8 SparseLinear layers"),
        (["--out", "PRUNED_DIR"], "already exists; pass overwrite=True (--overwrite)"),
    ],
)
def test_prune_rejects_bad_input_before_any_work(dense, one_shot, tmp_path, monkeypatch, capsys, args, match):
    _no_work(monkeypatch)
    paths = {"MISSING": str(tmp_path / "nope.pt"), "PRUNED": str(one_shot[0] / "pruned.pt"), "PRUNED_DIR": str(one_shot[0])}
    args = [paths.get(a, a) for a in args]
    out = tmp_path / "out"
    base = ["prune", "--checkpoint", str(dense), "--out", str(out)]
    assert cli.main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lotus prune: error: ") and match in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--keep-ratio", "0"], "keep_ratio must be a number in (0, 1]"),
        (["--keep-ratio", "1.5"], "keep_ratio must be a number in (0, 1]"),
        (["--keep-ratio", "0.5"], "mode='online' needs selector_checkpoint (--selector)"),
        (["--keep-ratio", "0.5", "--mode", "sideways"], "mode must be one of"),
        (["--keep-ratio", "0.5", "--mode", "fixed"], "mode='fixed' needs selector_checkpoint (--selector)"),
        (["--keep-ratio", "0.5", "--mode", "random", "--selector", "DENSE"], "only used with mode='online'"),
        (["--selector", "DENSE"], "only used with keep_ratio"),
        (["--mode", "bogus"], "--mode bogus chooses tickets: give --keep-ratio too"),
        (["--mode", "random"], "--mode random chooses tickets: give --keep-ratio too"),
        (["--keep-ratio", "0.5", "--selector", "MISSING"], "does not exist"),
        (["--keep-ratio", "0.5", "--selector", "DENSE", "--layer", "7"], "layer must be a block index"),
        (["--layer", "top"], "--layer must be a block index or 'rollout'"),
        (["--lr", "-1"], "lr must be a positive number"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--set", "init_from=nope.pt", "--set", "no_such_field=1"], "unknown config keys"),
        (["--checkpoint", "MISSING"], "does not exist"),
    ],
)
def test_finetune_rejects_bad_input_before_any_training(dense, one_shot, tmp_path, monkeypatch, capsys, args, match):
    _no_work(monkeypatch)
    paths = {"MISSING": str(tmp_path / "nope.pt"), "DENSE": str(dense)}
    args = [paths.get(a, a) for a in args]
    out = tmp_path / "out"
    assert cli.main(["finetune", "--checkpoint", str(one_shot[0] / "pruned.pt"), "--out", str(out)] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lotus finetune: error: ") and match in err and err.count("\n") == 1, err
    assert not out.exists()


def test_finetune_does_not_overwrite_a_run(one_shot, tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match="already holds a run"):
        stages.finetune_checkpoint(one_shot[0] / "pruned.pt", tmp_path, **QUIET)


def test_a_patch_dropping_student_saves_a_rebuildable_state(one_shot):
    # finetune_checkpoint's ticket runs save the student with patch dropping on: same state_dict keys as the plain model.
    from lotus_kernels.recipe.method.tickets import prepare_student_

    model = engine.model_from_checkpoint(one_shot[0] / "pruned.pt")
    student = prepare_student_(copy.deepcopy(model), 0.5, "random")
    assert list(student.state_dict()) == list(model.state_dict())
