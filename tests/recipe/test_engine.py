"""lotus_kernels.recipe.engine (was lotus_kernels.train): config, a tiny run that learns, determinism, exact
resume, sparse models, mixup/cutmix, atomic checkpoints, 2-process DDP on
gloo, the files a run writes, and bad input. CPU only, vit_micro_cifar."""

import dataclasses
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import lotus_kernels as lk
from lotus_kernels.recipe.engine import (
    PRESETS,
    TIMING_KEYS,
    TrainConfig,
    build_data,
    build_model,
    evaluate,
    load_checkpoint,
    lr_at_step,
    mix_batch,
    model_from_checkpoint,
    param_groups,
    train,
)

# Small and fast: 512 images, batch 64 -> 8 steps an epoch, well under a second on 2 CPU cores.
TINY = dict(
    model="vit_micro_cifar",
    synthetic_train=512,
    synthetic_test=256,
    batch_size=64,
    epochs=2,
    progress=False,
    device="cpu",
)
METRIC_KEYS = {"epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "images_per_s"}


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


def without_timing(history):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history]


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    """Stands in for the process dying."""


def kill_at(epoch_to_die):
    def on_epoch_end(epoch, model, metrics):
        # Raised before epoch `epoch_to_die` is checkpointed: like a crash during that epoch.
        if epoch == epoch_to_die:
            raise Killed

    return on_epoch_end


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------


def test_config_round_trip():
    config = tiny(mixup=0.8, init_from=None, holdout=32)
    d = config.to_dict()
    assert TrainConfig.from_dict(d) == config
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == config
    assert set(d) == {f.name for f in dataclasses.fields(TrainConfig)}
    # ints coerce to floats; path-likes to str
    coerced = TrainConfig.from_dict({"lr": 1, "data_path": Path("/x/y"), "model": "vit_micro_cifar"})
    assert coerced.lr == 1.0 and isinstance(coerced.lr, float) and coerced.data_path == "/x/y"
    assert TrainConfig.from_dict({}) == TrainConfig()
    assert TrainConfig(warmup_epochs=2).warmup_epochs == 2.0  # direct construction coerces too


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown config keys: bogus, lr_max"):
        TrainConfig.from_dict({"lr_max": 1.0, "bogus": 2, "lr": 1e-3})
    with pytest.raises(TypeError, match="epochs must be an int"):
        TrainConfig.from_dict({"epochs": 2.5})
    with pytest.raises(TypeError, match="augment must be a bool"):
        TrainConfig.from_dict({"augment": 1})
    with pytest.raises(TypeError, match="lr must be a float"):
        TrainConfig.from_dict({"lr": "fast"})
    with pytest.raises(TypeError, match="d must be a mapping"):
        TrainConfig.from_dict([("lr", 1.0)])


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"model": "no_such_model"}, ValueError, r"preset \(vit_lite_cifar, vit_micro_cifar, vit_small_cifar, vit_tiny_cifar\) or a timm"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"epochs": 0}, ValueError, "epochs must be >= 1"),
        ({"amp": "fp8"}, ValueError, "amp must be one of"),
        ({"dataset": "imagenet"}, ValueError, "dataset must be one of"),
        ({"device": "tpu"}, ValueError, "device must be"),
        ({"lr": -1.0}, ValueError, "lr must be"),
        ({"lr": 0.0}, ValueError, "lr must be > 0"),
        ({"min_lr": 1.0, "lr": 0.1}, ValueError, "min_lr must be <= lr"),
        ({"label_smoothing": 1.0}, ValueError, "label_smoothing must lie in"),
        ({"drop_path": -0.1}, ValueError, "drop_path must lie in"),
        ({"holdout": -1}, ValueError, "holdout must be >= 0"),
        ({"eval_every": 0}, ValueError, "eval_every must be >= 1"),
        ({"mixup": float("nan")}, ValueError, "mixup must be a finite number"),
        ({"pretrained": True}, ValueError, "has no pretrained weights"),
        ({"model": ""}, ValueError, "model must not be empty"),
        ({"init_from": 3}, TypeError, "init_from must be a str or None"),
        ({"dynamic_2to4_every": -1}, ValueError, "dynamic_2to4_every must be >= 0"),
        ({"dynamic_2to4_lr_scale": -1.0}, ValueError, "dynamic_2to4_lr_scale must be"),
        ({"compile": "yes"}, TypeError, "compile must be True, False or 'auto', got str 'yes'"),
        ({"compile": 1}, TypeError, "compile must be True, False or 'auto'"),
        ({"compile_mode": "fastest"}, ValueError, "compile_mode must be one of"),
        ({"ema": 1.0}, ValueError, r"ema must be 0 \(off\) or a decay in \(0, 1\)"),
        ({"ema": -0.5}, ValueError, "ema must be 0"),
        ({"ema": 0.99, "dynamic_2to4_every": 10}, ValueError, "ema must be 0 with dynamic_2to4_every"),
        ({"tta_flip": "yes"}, TypeError, "tta_flip must be a bool"),
    ],
)
def test_config_bad_values(overrides, error, message):
    with pytest.raises(error, match=message):
        tiny(**overrides)


def test_timm_names_accepted():
    config = tiny(model="vit_tiny_patch16_224")  # any registered timm name validates
    assert config.model == "vit_tiny_patch16_224"


def test_presets_build_the_documented_vits():
    for name, (dim, depth, heads) in {"vit_micro_cifar": (64, 2, 2), "vit_tiny_cifar": (192, 12, 3), "vit_small_cifar": (384, 12, 6)}.items():
        assert (PRESETS[name]["embed_dim"], PRESETS[name]["depth"], PRESETS[name]["num_heads"]) == (dim, depth, heads)
    model = build_model(tiny(), num_classes=7)
    assert model.pos_embed.shape == (1, 65, 64)  # 64 patches of 4x4 + CLS
    assert len(model.blocks) == 2 and model.head.out_features == 7
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        build_model(tiny(), num_classes=0)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        build_model({"model": "vit_micro_cifar"}, num_classes=10)


def test_build_data_holdout():
    train_set, evals = build_data(tiny(holdout=100))
    assert len(train_set) == 412 and len(evals["val"]) == 100 and len(evals["test"]) == 256
    assert set(build_data(tiny())[1]) == {"test"}
    with pytest.raises(ValueError, match="holdout must be <"):
        build_data(tiny(holdout=512))


# ---------------------------------------------------------------------------
# schedule, parameter groups, mixing
# ---------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=13)
    lrs = [lr_at_step(s, **kw) for s in range(13)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and math.isclose(lrs[-1], 0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # decays monotonically
    assert math.isclose(lrs[8], 0.55)  # halfway through the cosine: the mean of lr and min_lr
    assert lr_at_step(0, lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=1) == 1.0


def test_param_groups_decay_matrices_only():
    model = build_model(tiny(), 10)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed and "head.weight" in decayed
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"} <= kept
    assert len(decayed) + len(kept) == len(names)
    # SparseLinear's compact values are decayed even when stored flat (unstructured: 1-D).
    lk.sparsify_(model, lk.SparsityConfig("unstructured", sparsity=0.5))
    decay, _ = param_groups(model, 0.05)
    assert any(p is model.blocks[0].attn.qkv.values for p in decay["params"])
    assert model.blocks[0].attn.qkv.values.ndim == 1


def test_mix_batch_soft_targets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g)
    y = torch.arange(16) % 10
    # No mixing: the input as is, smoothed one-hot targets.
    same, t, lam = mix_batch(x, y, 10, label_smoothing=0.1, generator=g)
    assert same is x and lam == 1.0
    assert torch.allclose(t.sum(1), torch.ones(16)) and torch.allclose(t[0, 0], torch.tensor(0.91))

    # Mixup: x_mixed = lam x + (1 - lam) x[perm]; the targets carry lam on y.
    mixed, t, lam = mix_batch(x, y, 10, mixup_alpha=0.8, generator=torch.Generator().manual_seed(1))
    assert mixed.shape == x.shape and t.shape == (16, 10) and t.dtype == torch.float32
    assert torch.allclose(t.sum(1), torch.ones(16))
    assert torch.allclose(t[torch.arange(16), y].clamp(max=1.0), t.gather(1, y[:, None]).squeeze(1))
    assert (t[torch.arange(16), y] >= lam - 1e-6).all()
    partner = (mixed - lam * x) / (1 - lam)  # rows of x, permuted
    assert all(any(torch.allclose(partner[i], x[j], atol=1e-4) for j in range(16)) for i in range(16))

    # CutMix: a box of other images' pixels; lam is the exact kept area.
    mixed, t, lam = mix_batch(x, y, 10, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(2))
    changed = (mixed != x).any(1).flatten(1).sum(1)  # pixels replaced, per image
    moved = changed > 0
    assert moved.any()
    assert (changed[moved] == round((1 - lam) * 32 * 32)).all()
    assert torch.allclose(t.sum(1), torch.ones(16))

    # Deterministic for a given generator seed.
    a = mix_batch(x, y, 10, mixup_alpha=0.8, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(5))
    b = mix_batch(x, y, 10, mixup_alpha=0.8, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 9),
    mixup=st.sampled_from([0.0, 0.2, 1.0]),
    cutmix=st.sampled_from([0.0, 0.5, 1.0]),
    smoothing=st.sampled_from([0.0, 0.1, 0.3]),
    seed=st.integers(0, 2**31),
)
def test_mix_batch_targets_are_distributions(batch, mixup, cutmix, smoothing, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (batch,), generator=g)
    mixed, t, lam = mix_batch(x, y, 5, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, generator=g)
    assert mixed.shape == x.shape and 0.0 <= lam <= 1.0
    assert (t >= 0).all() and torch.allclose(t.sum(1), torch.ones(batch), atol=1e-6)


def test_mix_batch_bad_input():
    x, y = torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match="x must be a float tensor"):
        mix_batch(x[0], y, 10, mixup_alpha=1.0)
    with pytest.raises(TypeError, match="y must be an int64 tensor"):
        mix_batch(x, y.int(), 10, mixup_alpha=1.0)
    with pytest.raises(ValueError, match="mixup_alpha must be"):
        mix_batch(x, y, 10, mixup_alpha=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        mix_batch(x, y, 10, label_smoothing=1.5)


# ---------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------


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


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    config = tiny(epochs=2)
    real_save = torch.save
    armed = {"on": False}

    def crashing_save(obj, f, *args, **kwargs):
        if armed["on"]:
            f.write(b"PK\x03\x04 half a checkpoint")  # a torn write...
            raise OSError("No space left on device")  # ...then the crash
        return real_save(obj, f, *args, **kwargs)

    def arm(epoch, model, metrics):
        armed["on"] = epoch == 2

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space left"):
        train(config, tmp_path, on_epoch_end=arm)
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]  # no temp file left behind
    assert load_checkpoint(ckpt_dir / "last.pt")["epoch"] == 1  # the previous good one

    monkeypatch.setattr(torch, "save", real_save)
    result = train(config, tmp_path, resume=True)
    assert [m["epoch"] for m in result.history] == [1, 2]
    assert load_checkpoint(ckpt_dir / "last.pt")["epoch"] == 2


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


# ---------------------------------------------------------------------------
# DistributedDataParallel: 2 gloo processes on the CPU
# ---------------------------------------------------------------------------

DDP_CONFIG = dict(TINY, epochs=1, drop_path=0.0, mixup=0.0, cutmix=0.0, augment=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, base: str, port: int) -> None:
    # What torchrun would set.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on two cores
    out = Path(base) / ("run" if rank == 0 else "run_as_seen_by_rank1")
    result = train(TrainConfig(**DDP_CONFIG), out)
    torch.save({"state": result.model.state_dict(), "history": result.history}, Path(base) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    single = train(TrainConfig(**DDP_CONFIG), tmp_path / "single")

    mp.spawn(_ddp_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)

    # Only rank 0 wrote the run; rank 1 (given its own out_dir here, to tell) wrote nothing.
    assert not (tmp_path / "run_as_seen_by_rank1").exists()
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.json", "metrics.jsonl", "checkpoints"}
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # DDP applies the same averaged gradient on both ranks: identical weights, identical reduced metrics.
    assert_same_state(r0["state"], r1["state"])
    assert without_timing(r0["history"]) == without_timing(r1["history"])
    assert without_timing(read_metrics(tmp_path / "run")) == without_timing(r0["history"])

    # Against one process with the same global batch: each rank's 32 samples
    # are exactly half of the single run's 64, so only the float summation
    # order differs (two half-batch means averaged by DDP vs one mean, and
    # matmuls over 32 vs 64 rows). Over 8 AdamW steps that leaves ~1e-6-size
    # differences, while every weight moves ~lr * steps = 8e-3; atol 1e-4 is
    # >10x the observed difference and <2% of the training movement.
    ddp, ref = r0["state"], single.model.state_dict()
    worst = max((ddp[k] - ref[k]).abs().max().item() for k in ref if ref[k].is_floating_point())
    assert worst < 1e-4, worst
    moved = (ref["blocks.0.attn.qkv.weight"] - single_initial_qkv(tmp_path)).abs().max().item()
    assert moved > 50 * worst
    # Evaluation is sharded without padding and summed: every test image counted once.
    h_single, h_ddp = single.history[0], r0["history"][0]
    assert math.isclose(h_ddp["test_loss"], h_single["test_loss"], rel_tol=1e-4)
    assert abs(h_ddp["test_acc"] - h_single["test_acc"]) <= 2 / 256
    assert math.isclose(h_ddp["train_loss"], h_single["train_loss"], rel_tol=1e-4)


def single_initial_qkv(tmp_path):
    """The single-process run's initial qkv weight (train seeds with config.seed, then builds)."""
    torch.manual_seed(DDP_CONFIG.get("seed", 0))
    return build_model(TrainConfig(**DDP_CONFIG), 10).blocks[0].attn.qkv.weight.detach()


def test_deep_presets_use_layer_scale_from_scratch_and_not_with_hub_weights(monkeypatch):
    import timm

    model = build_model(TrainConfig(model="vit_tiny_cifar"), 10)
    gammas = [name for name, _ in model.named_parameters() if name.endswith((".ls1.gamma", ".ls2.gamma"))]
    assert len(gammas) == 2 * 12
    assert all(torch.all(p == 1e-3) for n, p in model.named_parameters() if n in gammas)
    assert not any(n.endswith("gamma") for n, _ in build_model(TrainConfig(model="vit_micro_cifar"), 10).named_parameters())

    # Hub weights have no LayerScale and their own init: a pretrained build passes neither key to timm.
    seen = {}
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: seen.update(name=name, **kw))
    build_model(TrainConfig(model="vit_small_cifar", pretrained=True), 10)
    assert seen["name"] == "vit_small_patch16_224" and seen["pretrained"] is True
    assert "init_values" not in seen and "weight_init" not in seen
    build_model(TrainConfig(model="vit_small_cifar"), 10)
    assert seen["init_values"] == 1e-3 and seen["weight_init"] == "jax"


def test_weights_without_layer_scale_load_as_the_identity(tmp_path):
    import timm

    from lotus_kernels.recipe.engine.checkpoint import load_init_weights as _load_init_weights

    # A plain ViT of the preset's shape, as hub or older checkpoints have it (no ls*.gamma).
    shape = {k: v for k, v in PRESETS["vit_tiny_cifar"].items() if k not in ("timm_name", "init_values", "weight_init")}
    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=10, **shape).eval()
    path = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), path)

    model = build_model(TrainConfig(model="vit_tiny_cifar", drop_path=0.0), 10)
    _load_init_weights(model, str(path))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), plain(x), rtol=0, atol=0)
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if n.endswith("gamma"))

    # Any other missing key is still an error naming the file.
    state = plain.state_dict()
    del state["head.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not fit the model"):
        _load_init_weights(model, str(path))


def test_quick_recipe_is_a_valid_config_and_says_what_it_measured():
    from lotus_kernels.recipe.engine import quick_recipe

    recipe = quick_recipe()
    config = TrainConfig.from_dict({"model": "vit_tiny_cifar", **recipe})
    assert config.epochs * config.synthetic_train // config.batch_size == 187  # ~188 steps (last batch partial)
    assert recipe["amp"] in ("bf16", "none")
    assert not config.augment and config.drop_path == 0 and config.label_smoothing == 0


# ---------------------------------------------------------------------------
# hostile checkpoints (issue #16)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A finished tiny(epochs=1) run folder, trained once for the tests below (they copy it)."""
    run = tmp_path_factory.mktemp("one_epoch") / "run"
    train(tiny(epochs=1), run)
    return run


def copy_run(run, to):
    import shutil

    shutil.copytree(run, to)
    return to


class _RunsAShellCommand:
    """Unpickling this runs a command (what a crafted checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_no_checkpoint_is_ever_unpickled(tmp_path, one_epoch_run):
    # Before: train(resume=True) (lotus train --resume) loaded last.pt with trusted=True, which
    # fell back to weights_only=False on any failure, so a crafted last.pt ran a shell command.
    config = tiny(epochs=1)
    copy_run(one_epoch_run, tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    marker = tmp_path / "pwned"
    ckpt["extra"] = {"payload": _RunsAShellCommand(marker)}
    torch.save(ckpt, last)
    for attempt in (
        lambda: train(dataclasses.replace(config, epochs=2), tmp_path / "run", resume=True),
        lambda: load_checkpoint(last),
        lambda: model_from_checkpoint(last),
    ):
        with pytest.raises(ValueError, match=r"weights_only=True.*convert it once"):
            attempt()
    from lotus_kernels.recipe import cli

    assert cli.main(["train", "--out", str(tmp_path / "run"), "--resume", "--set", "epochs=2"]) == 2
    assert cli.main(["eval", "--checkpoint", str(last)]) == 2
    assert not marker.exists()
    with pytest.raises(TypeError):
        load_checkpoint(last, trusted=True)  # the escape hatch is gone


def test_extra_state_that_would_need_unpickling_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="extra_state must hold only tensors"):
        train(tiny(epochs=1), tmp_path, extra_state={"selector": object()})
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("drop", ["config", "model", "num_classes", "epoch", "optimizer", "rng", "step"])
def test_a_checkpoint_missing_keys_is_a_named_error(tmp_path, capsys, one_epoch_run, drop):
    # Before: a raw KeyError from lotus eval and --resume.
    config = tiny(epochs=1)
    tmp_path = copy_run(one_epoch_run, tmp_path / "run")
    last = tmp_path / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt[drop]
    torch.save(ckpt, last)
    with pytest.raises(ValueError, match=rf"lacks \['{drop}'\]"):
        train(dataclasses.replace(config, epochs=2), tmp_path, resume=True)
    if drop in ("config", "model", "num_classes", "epoch"):
        from lotus_kernels.recipe import cli

        assert cli.main(["eval", "--checkpoint", str(last)]) == 2
        assert f"lacks ['{drop}']" in capsys.readouterr().err


def test_a_killed_save_leaves_no_temp_file_for_good(tmp_path, one_epoch_run):
    # Before: .last.pt.<pid>.tmp of a killed save stayed forever.
    config = tiny(epochs=1)
    tmp_path = copy_run(one_epoch_run, tmp_path / "run")
    ckpt_dir = tmp_path / "checkpoints"
    dead = ckpt_dir / ".last.pt.999999999.tmp"  # no such process
    alive = ckpt_dir / f".last.pt.{os.getppid()}.tmp"  # a live process's save in progress
    other = ckpt_dir / ".best.pt.999999999.tmp"
    for f in (dead, alive, other):
        f.write_bytes(b"PK half a checkpoint")
    train(dataclasses.replace(config, epochs=2), tmp_path, resume=True)
    assert not dead.exists() and not other.exists() and alive.exists()


def _epoch_of(path):
    return torch.load(path, weights_only=True, mmap=True)["epoch"]


def test_best_and_last_stay_consistent_when_a_save_is_killed(tmp_path, monkeypatch):
    # Before: last.pt was written, then best.pt: a crash in between left last.pt's "best"
    # record naming an epoch that best.pt did not hold, for good.
    from lotus_kernels.recipe.engine import loop

    config = tiny(epochs=2, holdout=64)
    real_save = loop.save_checkpoint
    epochs_done = []

    def count(epoch, model, metrics):
        epochs_done.append(epoch)

    def crash_after_last(path, state):
        real_save(path, state)
        if path.name == "last.pt" and state["epoch"] == 2:
            raise Killed  # after last.pt, before best.pt is brought in line with it

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_last)
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: {"loss": 1.0, "acc": 0.1 * len(epochs_done) + 0.1, "n": 1})
    with pytest.raises(Killed):
        train(config, tmp_path, on_epoch_end=count)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["epoch"] == 2 and last["best"]["epoch"] == 2  # every epoch improves here
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    train(config, tmp_path, resume=True)  # nothing left to train: the resume only reconciles
    ckpt_dir = tmp_path / "checkpoints"
    assert _epoch_of(ckpt_dir / "best.pt") == load_checkpoint(ckpt_dir / "last.pt")["best"]["epoch"] == 2
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]


def test_reconcile_best_after_a_crash_anywhere(tmp_path):
    from lotus_kernels.recipe.engine.checkpoint import reconcile_best as _reconcile_best

    def write(name, epoch):
        torch.save({"epoch": epoch}, tmp_path / name)

    last, best, pending = tmp_path / "last.pt", tmp_path / "best.pt", tmp_path / "best.pending.pt"
    # Killed between writing last.pt (which records epoch 4) and renaming the pending best.
    write("last.pt", 4), write("best.pt", 2), write("best.pending.pt", 4)
    _reconcile_best({"epoch": 4, "best": {"epoch": 4}}, last, best, pending)
    assert _epoch_of(best) == 4 and not pending.exists()
    # An improvement after the last checkpoint (epoch 5) belongs to epochs the resume redoes.
    write("best.pending.pt", 5)
    _reconcile_best({"epoch": 4, "best": {"epoch": 4}}, last, best, pending)
    assert _epoch_of(best) == 4 and not pending.exists()
    # A run written the old way (last.pt, then best.pt) and killed in between: last.pt is the best.
    write("best.pt", 3)
    _reconcile_best({"epoch": 4, "best": {"epoch": 4}}, last, best, pending)
    assert _epoch_of(best) == 4
    # Nothing to do, or nothing that can be done (said, not hidden).
    _reconcile_best({"epoch": 4, "best": {"epoch": None}}, last, best, pending)
    with pytest.warns(UserWarning, match="does not hold epoch 2"):
        _reconcile_best({"epoch": 4, "best": {"epoch": 2}}, last, best, pending)


def test_a_folder_or_a_corrupt_file_given_as_a_checkpoint_says_so(tmp_path):
    from lotus_kernels.recipe.engine import load_checkpoint

    with pytest.raises(ValueError, match=r"is a folder; give a checkpoint file such as .*checkpoints/last.pt"):
        load_checkpoint(tmp_path)
    corrupt = tmp_path / "last.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"is not a readable checkpoint: corrupt, cut short or not a torch file") as error:
        load_checkpoint(corrupt)
    assert "convert" not in str(error.value)  # nothing to convert: the file is broken
