"""engine.checkpoint: atomic writes, hostile checkpoints (issue #16: nothing is ever unpickled, missing keys
named, killed saves leave best and last consistent), a folder or a corrupt file given as a checkpoint."""

import dataclasses
import os

import pytest
import torch

from lotus_kernels.recipe.engine import load_checkpoint, model_from_checkpoint, train

from tiny_runs import Killed, tiny


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
