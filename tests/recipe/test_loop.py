"""engine.loop.train: a tiny run that learns, determinism, exact resume, the files a run writes, sparse
and dynamic 2:4 models, init_from and token hooks, evaluation, bf16 on CPU, bad arguments. CPU only,
vit_micro_cifar."""

import dataclasses
import json
import math

import pytest
import torch

import lotus_kernels as lk
from lotus_kernels.recipe.engine import (
    TrainConfig,
    build_data,
    build_model,
    evaluate,
    load_checkpoint,
    model_from_checkpoint,
    train,
)

from tiny_runs import (
    METRIC_KEYS,
    TINY,
    Killed,
    assert_same_state,
    kill_at,
    read_metrics,
    tiny,
    without_timing,
)


def test_micro_run_learns(tmp_path):
    # 4096 images x 3 epochs = 192 steps: measured 42-50 % test accuracy over
    # seeds 0-4 (chance 10 %; the binomial noise on 512 test images is ~2 %).
    config = tiny(synthetic_train=4096, synthetic_test=512, epochs=3, lr=2e-3, warmup_epochs=0.3, drop_path=0.0, augment=False)
    result = train(config, tmp_path)
    accuracies = [m["test_acc"] for m in result.history]
    assert accuracies[-1] > 0.30, accuracies
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] - 0.3
    assert not result.model.training


def test_same_config_same_weights(tmp_path):
    # Every random thing on: augmentation, drop-path, mixup and cutmix.
    config = tiny(mixup=0.8, cutmix=1.0, drop_path=0.1, augment=True)
    a = train(config, tmp_path / "a")
    b = train(config, tmp_path / "b")
    assert_same_state(a.model.state_dict(), b.model.state_dict())
    assert without_timing(a.history) == without_timing(b.history)
    c = train(dataclasses.replace(config, seed=1), tmp_path / "c")
    assert not torch.equal(a.model.state_dict()["head.weight"], c.model.state_dict()["head.weight"])


def test_resume_equals_uninterrupted_run(tmp_path):
    # Checkpoints every 2 epochs; the run dies during epoch 4, so the resume
    # starts from epoch 2 and redoes epoch 3, whose metrics line already exists.
    config = tiny(epochs=4, mixup=0.8, cutmix=1.0, drop_path=0.1, holdout=64, checkpoint_every=2)
    straight = train(config, tmp_path / "straight", extra_state={"keep": torch.arange(5)})

    run = tmp_path / "interrupted"
    with pytest.raises(Killed):
        train(config, run, on_epoch_end=kill_at(4), extra_state={"keep": torch.arange(5)})
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert len(read_metrics(run)) == 3
    resumed = train(config, run, resume=True)
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3, 4]  # epoch 3 redone, not duplicated

    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    assert without_timing(straight.history) == without_timing(resumed.history)
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(tmp_path / "straight"))
    # the optimizer state too, and extra_state comes back from the checkpoint
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(run / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4 * 7  # (512 - 64 held out) // 64 = 7 steps an epoch
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_state(sa, sb)
    assert torch.equal(resumed.extra["keep"], torch.arange(5))
    assert torch.equal(b["extra"]["keep"], torch.arange(5))


def test_resume_checks(tmp_path):
    config = tiny(epochs=1)
    train(config, tmp_path)
    with pytest.raises(ValueError, match=r"different config \(batch_size: saved 64 vs now 32, lr: saved"):
        train(dataclasses.replace(config, lr=5e-4, batch_size=32), tmp_path, resume=True)
    with pytest.raises(ValueError, match="already holds a run"):
        train(config, tmp_path)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(config, tmp_path / "empty", resume=True)
    # Extending epochs is allowed (display settings too), and continues from epoch 1.
    result = train(dataclasses.replace(config, epochs=2, progress=True), tmp_path, resume=True)
    assert [m["epoch"] for m in result.history] == [1, 2]
    with pytest.raises(ValueError, match="epochs must be >= the 2 epochs"):
        train(config, tmp_path, resume=True)
    # A fresh run over it needs overwrite=True.
    assert [m["epoch"] for m in train(config, tmp_path, overwrite=True).history] == [1]


def test_files_and_metrics(tmp_path):
    def add_metric(epoch, model, metrics):
        metrics["custom"] = torch.tensor(epoch * 1.5)  # tensors are written as numbers

    config = tiny(epochs=2, holdout=64, eval_every=2)
    result = train(config, tmp_path, on_epoch_end=add_metric)
    assert result.out_dir == tmp_path and result.final_checkpoint == tmp_path / "checkpoints" / "last.pt"
    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == config
    lines = read_metrics(tmp_path)
    assert len(lines) == 2 == len(result.history)
    for line in lines:
        assert METRIC_KEYS | {"val_loss", "val_acc", "custom"} <= set(line)
        assert line["images_per_s"] > 0 and 0 <= line["train_acc"] <= 1
    assert lines[0]["test_acc"] is None and lines[0]["val_acc"] is None  # eval_every=2 skips epoch 1
    assert 0 <= lines[1]["val_acc"] <= 1 and lines[1]["custom"] == 3.0
    assert without_timing(lines) == without_timing(json.loads(json.dumps(result.history, default=float)))

    ckpt = load_checkpoint(result.final_checkpoint)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "config", "extra", "format_version"):
        assert key in ckpt
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert ckpt["model_source"] == "config" and ckpt["config"] == config.to_dict()
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["best"]["metric"] == "val_acc" and best["best"]["epoch"] == 2

    # The checkpoint rebuilds the model.
    rebuilt = model_from_checkpoint(result.final_checkpoint)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.model(x))


def test_sparse_model_trains_and_checkpoints(tmp_path):
    config = tiny(epochs=1)
    torch.manual_seed(0)
    model = lk.sparsify_(build_model(config, 10), "2:4")
    qkv = model.blocks[0].attn.qkv
    mask_before, values_before = qkv.mask().clone(), qkv.values.detach().clone()

    result = train(config, tmp_path, model=model)
    assert result.model is model
    assert torch.equal(qkv.mask(), mask_before)  # the pattern is fixed...
    assert (qkv.to_dense()[~mask_before] == 0).all()  # ...pruned weights stay exactly zero
    assert not torch.equal(qkv.values, values_before)  # and the kept ones trained

    ckpt = load_checkpoint(result.final_checkpoint)
    keys = set(ckpt["model"])
    assert {"blocks.0.attn.qkv.values", "blocks.0.attn.qkv.metadata", "blocks.1.mlp.fc2.values"} <= keys
    assert "blocks.0.attn.qkv.weight" not in keys
    assert ckpt["model_source"] == "argument" and ckpt["model_class"].endswith("VisionTransformer")

    fresh = lk.sparsify_(build_model(config, 10), "2:4")
    fresh.load_state_dict(ckpt["model"])
    fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), result.model(x))
    # A sparsified model comes back with its SparseLinear layers (sparsify_like_).
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(result.final_checkpoint)(x), result.model(x))
    # Resuming it needs the model again.
    with pytest.raises(ValueError, match="pass a model built the same way"):
        train(dataclasses.replace(config, epochs=2), tmp_path, resume=True)
    resumed = train(dataclasses.replace(config, epochs=2), tmp_path, resume=True, model=fresh)
    assert [m["epoch"] for m in resumed.history] == [1, 2]


def test_dynamic_2to4_reprunes_during_training_and_resumes_exactly(tmp_path):
    # Pruned weights start at 0 and learn by plain SGD at lr * scale (AdamW's lr
    # is small for SGD): a large scale so masks visibly move within 16 steps.
    config = tiny(epochs=2, dynamic_2to4_every=3, dynamic_2to4_lr_scale=1e5, checkpoint_every=1)

    def sparse_model():
        torch.manual_seed(0)
        return lk.sparsify_(build_model(config, 10), "2:4")

    steps = []
    straight = train(config, tmp_path / "straight", model=sparse_model(), on_step_end=lambda step, m, opt: steps.append(step))
    assert steps == list(range(1, 17))  # 8 steps an epoch, 2 epochs
    changed = [m["dynamic_2to4_changed"] for m in straight.history]
    assert all(0 <= c <= 1 for c in changed) and sum(changed) > 0
    for layer in (m for m in straight.model.modules() if isinstance(m, lk.SparseLinear)):
        groups = layer.mask().view(layer.out_features, -1, 4).sum(-1)
        assert bool((groups == 2).all())  # still exactly 2:4 after re-pruning
    ckpt = load_checkpoint(straight.final_checkpoint)
    assert ckpt["dynamic_2to4"]["last_step"] == 16

    run = tmp_path / "interrupted"
    with pytest.raises(Killed):
        train(config, run, model=sparse_model(), on_epoch_end=kill_at(2))
    resumed = train(config, run, resume=True, model=sparse_model())
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    assert without_timing(straight.history) == without_timing(resumed.history)


def test_dynamic_2to4_needs_a_2to4_model(tmp_path):
    with pytest.raises(ValueError, match="no SparseLinear layer with pattern '2:4'"):
        train(tiny(epochs=1, dynamic_2to4_every=2), tmp_path)


def test_init_from_and_token_hook(tmp_path):
    source = train(tiny(epochs=1), tmp_path / "source")
    state = source.model.state_dict()
    from safetensors.torch import save_file

    plain = {k: v.contiguous() for k, v in state.items()}
    save_file(plain, str(tmp_path / "weights.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in plain.items()}}, tmp_path / "wrapped.pth")

    for path in (source.final_checkpoint, tmp_path / "weights.safetensors", tmp_path / "wrapped.pth"):
        seen = {}

        def hook(model, x):
            # The training forward goes through the hook; its first call sees the initial weights.
            seen.setdefault("first", {k: v.detach().clone() for k, v in model.state_dict().items()})
            seen["calls"] = seen.get("calls", 0) + 1
            return model(x)

        out = tmp_path / f"init_{path.name}"
        train(tiny(epochs=1, seed=3, init_from=str(path)), out, token_hook=hook)
        assert_same_state(seen["first"], state)
        assert seen["calls"] == 8
    with pytest.raises(ValueError, match="init_from .* does not exist"):
        train(tiny(init_from=str(tmp_path / "missing.pt")), tmp_path / "x")


def test_evaluate(tmp_path):
    model = build_model(tiny(), 10)
    _, evals = build_data(tiny())
    model.train()
    model.blocks[0].eval()  # a mixed state, restored exactly
    calls = []

    def hook(m, x):
        calls.append(x.shape[0])
        return m(x)

    plain = evaluate(model, evals["test"], batch_size=100)
    hooked = evaluate(model, evals["test"], batch_size=100, token_hook=hook)
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert plain == hooked and calls == [100, 100, 56]
    assert plain["n"] == 256 and 0 <= plain["acc"] <= 1 and plain["loss"] > 0
    with pytest.raises(TypeError, match="dataset must be an ImageSet"):
        evaluate(model, [1, 2, 3])
    with pytest.raises(ValueError, match="batch_size must be"):
        evaluate(model, evals["test"], batch_size=0)
    with pytest.raises(ValueError, match="amp must be one of"):
        evaluate(model, evals["test"], amp="int8")


def test_bf16_autocast_runs_on_cpu(tmp_path):
    result = train(tiny(epochs=1, amp="bf16", synthetic_train=128), tmp_path)
    assert math.isfinite(result.history[0]["train_loss"])


def test_train_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train(TINY, tmp_path)
    with pytest.raises(TypeError, match="out_dir must be a str, os.PathLike or None"):
        train(tiny(), 3)
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        train(tiny(), None, resume=True)
    with pytest.raises(TypeError, match="train_data must be an ImageSet"):
        train(tiny(), None, train_data=[1, 2])
    with pytest.raises(TypeError, match="subset must be a 1-D sequence or tensor of integer"):
        train(tiny(), None, subset=torch.ones(4))
    with pytest.raises(ValueError, match=r"subset positions must lie in \[0, 512\)"):
        train(tiny(), None, subset=[0, 512])
    with pytest.raises(ValueError, match="eval_data must map 'test'"):
        train(tiny(), None, eval_data={"train": None})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        train(tiny(), tmp_path, model="vit")
    with pytest.raises(TypeError, match="extra_state must be a dict"):
        train(tiny(), tmp_path, extra_state=[1])
    with pytest.raises(TypeError, match="on_epoch_end must be callable"):
        train(tiny(), tmp_path, on_epoch_end=3)
    with pytest.raises(ValueError, match=r"batch_size \(1024\) is larger than the training set"):
        train(tiny(batch_size=1024), tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        train(tiny(device="cuda"), tmp_path)
