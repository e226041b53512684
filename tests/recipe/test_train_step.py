"""lotus_kernels.train_step and the engine's fast path, on CPU: the compiled step (inductor) gives the
eager losses and resumes bit for bit, compile="auto" falls back to eager with a warning, weight EMA,
flip test-time augmentation, training in memory on a subset, the mixup permutation drawn on the
device and the progress bar's loss read without a sync. vit_micro_cifar only."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from lotus_kernels.recipe.data import DeviceLoader
from lotus_kernels.recipe.engine import evaluation, loop, mix_batch
from lotus_kernels.recipe.data import synthetic_dataset
from lotus_kernels.recipe.engine import build_data, build_model, evaluate, load_checkpoint, model_from_checkpoint, train
from lotus_kernels.recipe.engine.train_step import TrainStep, WeightEMA

from tiny_runs import Killed, assert_same_state, kill_at, tiny, without_timing  # 512 images, batch 64: 8 steps an epoch


@pytest.fixture
def compile_calls(monkeypatch):
    """The torch.compile calls made (their keyword arguments), compiling for real."""
    calls = []
    real = torch.compile

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    return calls


# ---------------------------------------------------------------------------
# the compiled step (torch.compile with inductor, as on a GPU)
# ---------------------------------------------------------------------------


def test_compiled_step_gives_the_eager_losses(compile_calls):
    # No drop-path: compiled code draws its random numbers differently, everything else is the same math.
    config = tiny(mixup=0.8, cutmix=1.0, drop_path=0.0, holdout=64)
    eager = train(dataclasses.replace(config, compile=False), None)
    assert compile_calls == []
    compiled = train(dataclasses.replace(config, compile=True), None)
    assert {"mode": "default", "dynamic": False} in compile_calls
    for e, c in zip(eager.history, compiled.history):
        for key in ("train_loss", "test_loss", "val_loss"):
            assert math.isclose(e[key], c[key], rel_tol=1e-4), (key, e[key], c[key])
        assert abs(e["train_acc"] - c["train_acc"]) <= 2 / 448 and abs(e["test_acc"] - c["test_acc"]) <= 2 / 256
    worst = max((a - b).abs().max().item() for a, b in zip(eager.model.state_dict().values(), compiled.model.state_dict().values()))
    assert worst < 1e-4, worst


def test_compiled_run_resumes_bit_for_bit(tmp_path):
    # Every random thing on, drop-path included (drawn inside the compiled graph from torch's seeded generator).
    config = tiny(epochs=3, mixup=0.8, cutmix=1.0, drop_path=0.1, checkpoint_every=1, compile=True)
    straight = train(config, tmp_path / "straight")
    run = tmp_path / "interrupted"
    with pytest.raises(Killed):
        train(config, run, on_epoch_end=kill_at(3))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    resumed = train(config, run, resume=True)
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    assert without_timing(straight.history) == without_timing(resumed.history)


def micro_step(compile, monkeypatch=None):
    torch.manual_seed(0)
    model = build_model(tiny(drop_path=0.0), 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, TrainStep(model, optimizer, schedule=lambda step: 1e-3, label_smoothing=0.1, grad_clip=1.0, compile=compile)


def test_compile_auto_falls_back_to_eager_once_with_a_warning(monkeypatch):
    def failing_compile(module, **kwargs):
        def run(*args):
            raise RuntimeError("inductor: no C++ compiler here")

        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    _, explicit = micro_step(True)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        explicit(0, x, y, y)
    model, auto = micro_step("auto")
    before = model.head.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"torch.compile of the training step failed \(RuntimeError: inductor: no C\+\+ compiler here\); running it eagerly"):
        out = auto(0, x, y, y)
    assert not auto.compiled and math.isfinite(float(out.loss)) and not torch.equal(model.head.weight, before)
    auto(1, x, y, y)  # eager from now on, no second warning (pytest's filterwarnings would show it)

    # Evaluation under "auto" (compiled on CUDA) falls back the same way.
    monkeypatch.setattr(evaluation, "resolve_compile", lambda compile, device: True)
    monkeypatch.setattr(evaluation, "_COMPILED_EVAL", {"default": failing_compile(None)})
    _, evals = build_data(tiny())
    with pytest.warns(UserWarning, match="torch.compile of the evaluation failed"):
        fallback = evaluate(model, evals["test"], compile="auto")
    monkeypatch.setattr(evaluation, "resolve_compile", lambda compile, device: False)
    assert fallback == evaluate(model, evals["test"])


def test_train_step_arguments():
    model = build_model(tiny(), 10)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
        TrainStep(model, optimizer, schedule=lambda s: 1e-3, compile="yes")
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainStep(model, optimizer, schedule=lambda s: 1e-3, compile_mode="turbo")
    with pytest.raises(TypeError, match="schedule must be callable"):
        TrainStep(model, optimizer, schedule=1e-3)


def test_the_step_sets_the_scheduled_lr_and_returns_device_scalars():
    model, step = micro_step(False)
    step.schedule = lambda s: 1e-3 * (s + 1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = step(4, x, y, y)
    assert out.lr == pytest.approx(5e-3) and all(g["lr"] == out.lr for g in step.optimizer.param_groups)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32 and not out.loss.requires_grad
    assert out.correct.dtype == torch.int64 and 0 <= int(out.correct) <= 4
    # Soft targets (mixup/cutmix) take the loss without label smoothing on top.
    soft = torch.full((4, 10), 0.1)
    assert math.isfinite(float(step(5, x, soft, y).loss))


# ---------------------------------------------------------------------------
# EMA and flip test-time augmentation
# ---------------------------------------------------------------------------


def test_weight_ema_warms_up_then_averages():
    model = nn.Linear(2, 2)
    ema = WeightEMA(model, 0.9)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(1)  # decay min(0.9, 2 / 11): the average follows quickly at first
    torch.testing.assert_close(ema.module.weight, start + 1.0 * (1 - 2 / 11))
    ema.update(1000)  # then at the decay
    torch.testing.assert_close(ema.module.weight, start + 1.0 * (1 - 2 / 11) + (1.0 - 1.0 * (1 - 2 / 11)) * 0.1)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    with pytest.raises(ValueError, match=r"decay must be a number in \(0, 1\)"):
        WeightEMA(model, 1.0)


def test_ema_is_what_is_evaluated_checkpointed_and_returned(tmp_path):
    config = tiny(ema=0.9, checkpoint_every=1)
    seen = []
    result = train(config, tmp_path / "run", on_epoch_end=lambda epoch, model, metrics: seen.append(model))
    ckpt = load_checkpoint(result.final_checkpoint)
    assert ckpt["ema"] is not None and ckpt["ema"].keys() == ckpt["model"].keys()
    assert not torch.equal(ckpt["ema"]["head.weight"], ckpt["model"]["head.weight"])
    # The returned model holds the averaged weights; the checkpoint's model rebuilds as them too.
    torch.testing.assert_close(result.model.state_dict()["head.weight"], ckpt["ema"]["head.weight"], rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(result.final_checkpoint)(x), result.model(x))
    assert seen[0] is not result.model  # on_epoch_end got the EMA copy, the evaluated model
    for line in result.history:
        assert 0 <= line["test_acc"] <= 1 and 0 <= line["test_acc_no_ema"] <= 1
    # The average resumes exactly.
    with pytest.raises(Killed):
        train(config, tmp_path / "cut", on_epoch_end=kill_at(2))
    resumed = train(config, tmp_path / "cut", resume=True)
    assert_same_state(resumed.model.state_dict(), result.model.state_dict())
    assert without_timing(resumed.history) == without_timing(result.history)


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror():
    model = build_model(tiny(), 10).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    data = synthetic_dataset(40, split="test")
    batches = []

    def hook(m, x):
        batches.append(x)
        return m(x)

    got = evaluate(model, data, batch_size=16, tta_flip=True, token_hook=hook)
    assert [b.shape[0] for b in batches] == [32, 32, 16]  # each batch and its mirror in one forward
    torch.testing.assert_close(batches[0][16:], batches[0][:16].flip(3))
    plain = evaluate(model, data, batch_size=16)
    assert got["acc_no_flip"] == plain["acc"] and got["n"] == 40
    loader = DeviceLoader(data, 40, shuffle=False)
    x, y = next(iter(loader))
    with torch.no_grad():
        mean = (model(x) + model(x.flip(3))) / 2
    assert got["acc"] == pytest.approx((mean.argmax(1) == y).double().mean().item())
    assert math.isclose(got["loss"], torch.nn.functional.cross_entropy(mean, y).item(), rel_tol=1e-5)
    history = train(tiny(epochs=1, tta_flip=True), None).history
    assert {"test_acc", "test_acc_no_flip"} <= set(history[0])


def test_compiled_evaluation_pads_the_last_batch_and_matches_eager():
    model = build_model(tiny(), 10).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    data = synthetic_dataset(40, split="test")
    eager = evaluate(model, data, batch_size=16, tta_flip=True)
    compiled = evaluate(model, data, batch_size=16, tta_flip=True, compile=True)
    assert compiled["n"] == 40 and compiled["acc"] == eager["acc"] and compiled["acc_no_flip"] == eager["acc_no_flip"]
    assert math.isclose(compiled["loss"], eager["loss"], rel_tol=1e-5)


# ---------------------------------------------------------------------------
# in memory, on a subset, on given data
# ---------------------------------------------------------------------------


def test_train_in_memory_on_a_subset_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subset = torch.arange(0, 512, 4)  # 128 of the 512 training images
    seen = set()

    def hook(model, x, draws):
        seen.update(draws.indices.tolist())
        return model(x)

    hook.needs_draws = True
    result = train(tiny(epochs=2), None, subset=subset, token_hook=hook)
    assert list(tmp_path.iterdir()) == []
    assert result.out_dir is None and result.final_checkpoint is None
    assert [m["step"] for m in result.history] == [2, 4]  # 128 images, batch 64
    assert seen <= set(subset.tolist()) and len(seen) == 128  # draws name positions in the training set
    assert 0 <= result.history[-1]["test_acc"] <= 1

    # Given data: nothing is evaluated unless eval_data says what.
    train_set, evals = build_data(tiny())
    given = train(tiny(epochs=1), None, train_data=train_set.subset(subset))
    assert "test_acc" not in given.history[0] and given.history[0]["step"] == 2
    with_eval = train(tiny(epochs=1), None, train_data=train_set, eval_data={"test": evals["test"]})
    assert 0 <= with_eval.history[0]["test_acc"] <= 1


def test_a_resume_on_other_data_is_refused(tmp_path):
    config = tiny(epochs=1)
    train(config, tmp_path, subset=torch.arange(128))
    with pytest.raises(ValueError, match="cannot resume .* on other data"):
        train(dataclasses.replace(config, epochs=2), tmp_path, resume=True, subset=torch.arange(1, 129))
    assert [m["epoch"] for m in train(dataclasses.replace(config, epochs=2), tmp_path, resume=True, subset=torch.arange(128)).history] == [1, 2]


# ---------------------------------------------------------------------------
# no host sync in the loop
# ---------------------------------------------------------------------------


def test_mixup_permutation_is_drawn_on_the_batch_device(monkeypatch):
    calls = []
    real = torch.randperm

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randperm", recording)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8)
    mix_batch(x, y, 10, mixup_alpha=1.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and calls[0]["device"] == x.device and calls[0]["generator"].device == x.device


def test_the_progress_loss_is_read_at_most_once_per_interval(monkeypatch):
    display = loop._LossDisplay(torch.device("cpu"), every_s=10.0)
    assert display.offer(torch.tensor(1.5)) == 1.5
    assert display.offer(torch.tensor(2.5)) is None  # within the interval: not read


def test_runs_saved_before_the_new_fields_still_resume(tmp_path):
    config = tiny(epochs=1)
    train(config, tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    for key in ("compile_mode", "ema", "tta_flip"):
        del ckpt["config"][key]  # what a checkpoint of the engine before issue 17 holds
    ckpt["config"]["compile"] = False
    del ckpt["ema"], ckpt["data"]
    torch.save(ckpt, last)
    with pytest.raises(ValueError, match="compile: saved False vs now 'auto'"):
        train(dataclasses.replace(config, epochs=2), tmp_path, resume=True)
    resumed = train(dataclasses.replace(config, epochs=2, compile=False), tmp_path, resume=True)
    assert [m["epoch"] for m in resumed.history] == [1, 2]


def test_make_train_step_is_the_step_train_runs():
    from lotus_kernels.recipe.engine import lr_at_step, make_train_step

    config = tiny(lr=2e-3, warmup_epochs=1.0, epochs=4)
    model = build_model(config, 10)
    step = make_train_step(config, model, total_steps=40)  # 10 steps an epoch: warmup 10
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    assert step(3, x, y, y).lr == lr_at_step(3, lr=2e-3, min_lr=config.min_lr, warmup_steps=10, total_steps=40)
    assert not step.compiled and model.training and isinstance(step.optimizer, torch.optim.AdamW)
    assert not step.optimizer.defaults["fused"]  # eager CPU: the for-loop AdamW, as train runs it
    assert make_train_step(dataclasses.replace(config, compile=True), build_model(config, 10)).optimizer.defaults["fused"]
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        make_train_step(config, model, total_steps=0)
