"""Checkpoints and the run folder's files: atomic writes, the RNG state, best/last handling,
loading (``torch.load(weights_only=True)`` only), rebuilding a model from a checkpoint
(``model_from_checkpoint``), ``init_from`` weights, and metrics.jsonl / JSON files.

A checkpoint is a dict (see ``loop.train`` for its keys), in format
``CHECKPOINT_FORMAT``; every one loads with ``torch.load(weights_only=True)``,
and nothing here loads one any other way (unpickling runs code)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import pickle
import random
import shutil
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from .build import build_model
from .train_config import TrainConfig


# The format name the engine had when it lived in lotus_kernels.train: kept, so checkpoints written before load.
CHECKPOINT_FORMAT = "lotus_kernels.train"
CHECKPOINT_VERSION = 1


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        # numpy's key as an int64 tensor, so the checkpoint loads with weights_only=True.
        "numpy": {
            "kind": np_state[0],
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    s = state["numpy"]
    np.random.set_state((s["kind"], s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _remove_stale_temp_files(directory: pathlib.Path) -> None:
    """Temp files (``atomic_write``'s ``.NAME.PID.tmp``) that killed saves left in ``directory``."""
    for tmp in directory.glob(".*.tmp"):
        pid = tmp.name[: -len(".tmp")].rpartition(".")[2]
        # Another live process's save is left alone (a pid reused since is kept too: harmless).
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def atomic_write(path: pathlib.Path, write: Callable) -> None:
    """write(file object) into a temp file beside ``path``, fsync, then os.replace it over ``path``.

    A crash at any point leaves either the old file or the new one, never a
    torn one; a kill leaves the temp file, which the next write removes.
    """
    _remove_stale_temp_files(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def save_checkpoint(path: pathlib.Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def reconcile_best(saved: dict, last_path: pathlib.Path, best_path: pathlib.Path, pending_path: pathlib.Path) -> None:
    """Make best.pt the epoch that last.pt's "best" record names, after a crash anywhere in a save.

    best.pending.pt of the recorded epoch (killed between writing last.pt and
    the rename) becomes best.pt; one of a later epoch belongs to epochs the
    resumed run redoes and is dropped. Runs saved before best.pending.pt
    existed wrote last.pt then best.pt: when the record names last.pt's own
    epoch and best.pt is not it, last.pt (the same state) is copied over.
    """
    record = (saved.get("best") or {}).get("epoch")
    if pending_path.exists():
        if record is not None and _checkpoint_epoch(pending_path) == record:
            os.replace(pending_path, best_path)
        else:
            pending_path.unlink()
        fsync_dir(best_path.parent)
    if record is None or (best_path.exists() and _checkpoint_epoch(best_path) == record):
        return
    if record == saved["epoch"]:

        def copy_last(f) -> None:
            with open(last_path, "rb") as src:
                shutil.copyfileobj(src, f)

        atomic_write(best_path, copy_last)
    else:
        warnings.warn(
            f"{best_path} does not hold epoch {record}, the best one {last_path} records; it is replaced at the "
            "next improvement",
            stacklevel=3,
        )


def is_our_checkpoint(obj) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


# What every use of a checkpoint reads (eval, export, the pipeline stages), and what resuming adds.
CHECKPOINT_KEYS = ("model", "config", "num_classes", "epoch")
RESUME_KEYS = ("optimizer", "step", "rng")

# How to turn a checkpoint that needs a full unpickle into one we load: said, never done for the user.
CONVERT_HINT = (
    "lotus_kernels loads checkpoints with torch.load(weights_only=True) only: unpickling anything else runs code. "
    "If you wrote this file yourself and trust it, convert it once: ckpt = torch.load(path, weights_only=False); "
    "replace the objects in ckpt['extra'] (or wherever the error points) by tensors, numbers, strings, None, "
    "lists or dicts of them; torch.save(ckpt, path)"
)


def load_checkpoint(path, *, map_location="cpu") -> dict:
    """A checkpoint written by ``train`` (a dict; see ``train`` for its keys).

    Loads with ``torch.load(weights_only=True)`` and nothing else: a file
    holding other objects is refused with a ValueError that says how to
    convert it (it is never unpickled). Checks the format and that the keys
    every use reads (``CHECKPOINT_KEYS``) are there.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a folder; give a checkpoint file such as {str(path / 'checkpoints' / 'last.pt')!r}")
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: say how to convert, never unpickle
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"could not load checkpoint {str(path)!r} ({first}). {CONVERT_HINT}") from e
    except Exception as e:  # a truncated or corrupt file, or not a torch file at all
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{str(path)!r} is not a readable checkpoint: corrupt, cut short or not a torch file ({type(e).__name__}: {first})") from e
    if not is_our_checkpoint(ckpt):
        raise ValueError(f"{str(path)!r} is not a lotus_kernels.train checkpoint")
    if ckpt.get("format_version", 0) > CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {ckpt['format_version']}, newer than this "
            f"code's {CHECKPOINT_VERSION}: update lotus_kernels"
        )
    check_checkpoint_keys(ckpt, path, CHECKPOINT_KEYS)
    for key, kind in (("model", Mapping), ("config", Mapping), ("num_classes", int), ("epoch", int)):
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            raise ValueError(f"checkpoint {str(path)!r}: {key!r} must be a {kind.__name__}, got {type(ckpt[key]).__name__}")
    return ckpt


def check_checkpoint_keys(ckpt: Mapping, path, keys) -> None:
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {missing} (damaged, or written by something else than train)")


def check_loads_weights_only(extra, name: str) -> None:
    """ValueError unless ``extra`` survives torch.save + torch.load(weights_only=True) (checkpoints must)."""
    buffer = io.BytesIO()
    torch.save(extra, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{name} must hold only tensors, numbers, strings, None and lists/tuples/dicts of them: it is saved in "
            f"checkpoints, which load with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e


def _checkpoint_epoch(path: pathlib.Path) -> int | None:
    """The epoch a checkpoint file holds (tensors memory-mapped, not read), or None when it cannot tell."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:
        return None


def model_from_checkpoint(path, *, map_location="cpu") -> nn.Module:
    """The trained model of a checkpoint (eval mode, on map_location): its EMA weights when the run kept
    an average (config.ema > 0: the weights its metrics describe), else its weights.

    Built from the checkpoint's config; a model that was sparsified before it
    was passed to ``train(model=...)`` gets its SparseLinear layers back from
    the layouts saved in its state (``lotus_kernels.sparsify_like_``). Any
    other model passed to train cannot be rebuilt from the config: build it
    the same way and ``load_state_dict(ckpt["model"])``.
    """
    from lotus_kernels.nn import sparsify_like_

    ckpt = load_checkpoint(path, map_location=map_location)
    config = TrainConfig.from_dict(ckpt["config"])
    config = dataclasses.replace(config, pretrained=False)  # the weights come from the checkpoint
    state = evaluated_state(ckpt)
    model = sparsify_like_(build_model(config, ckpt["num_classes"]), state)
    try:
        model.load_state_dict(_identity_layer_scale(model, state))
    except (RuntimeError, ValueError) as e:
        if ckpt.get("model_source") == "config":
            # A ValueError (the CLI's one-line error), not load_state_dict's RuntimeError.
            raise ValueError(f"checkpoint {str(path)!r}: its model state does not fit the model its config builds: {e}") from e
        raise ValueError(
            f"checkpoint {str(path)!r} holds a model passed to train(model=...) ({ckpt.get('model_class')}) "
            f"that the config does not rebuild ({str(e).splitlines()[0]}); build that model and "
            "load_state_dict(ckpt['model']) into it"
        ) from e
    return model.eval()


def evaluated_state(ckpt: Mapping) -> Mapping:
    """The weights a checkpoint's metrics describe: the EMA copy's when the run kept one."""
    return ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]


def _identity_layer_scale(model: nn.Module, state: Mapping) -> Mapping:
    """``state`` plus ones for the LayerScale gammas (timm's ``*.ls1.gamma``, ``*.ls2.gamma``)
    that ``model`` has and ``state`` lacks: weights trained without LayerScale
    (hub ViTs, checkpoints made before the presets had it) load exactly, as
    gamma = 1 is the identity. Any other missing key is left for
    ``load_state_dict`` to report."""
    missing = {
        name: torch.ones_like(param)
        for name, param in model.state_dict().items()
        if name.endswith((".ls1.gamma", ".ls2.gamma")) and name not in state
    }
    return {**state, **missing} if missing else state


def load_init_weights(model: nn.Module, path: str) -> None:
    """config.init_from: our checkpoint, or a state_dict file (.pt/.pth/.bin via torch.load, .safetensors)."""
    p = pathlib.Path(os.path.expanduser(path))
    if not p.is_file():
        raise ValueError(f"init_from {path!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"init_from {path!r} could not be loaded as a state_dict: {type(e).__name__}: {e}") from e
        if is_our_checkpoint(state):
            state = evaluated_state(state)
        elif isinstance(state, Mapping):
            # Common wrappers: {"state_dict": ...}, {"model": ...} (timm / DeiT training scripts).
            for key in ("state_dict", "model", "model_state_dict"):
                if isinstance(state.get(key), Mapping):
                    state = state[key]
                    break
    if not isinstance(state, Mapping):
        raise ValueError(f"init_from {path!r} holds a {type(state).__name__}, not a state_dict")
    # DDP / torch.compile prefixes from other trainers.
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(_identity_layer_scale(model, state))
    except RuntimeError as e:
        raise ValueError(f"init_from {path!r} does not fit the model: {e}") from e



def _json_default(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON serialisable")


def metrics_line(metrics: dict) -> str:
    return json.dumps(metrics, default=_json_default, allow_nan=True)


def write_metrics(path: pathlib.Path, history: list[dict]) -> None:
    text = "".join(metrics_line(m) + "\n" for m in history)
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: pathlib.Path, obj) -> None:
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def write_model_checkpoint(path, model: nn.Module, config: TrainConfig, num_classes: int, extra: dict, best: dict) -> pathlib.Path:
    """``model`` (moved to the CPU, eval mode) as a checkpoint in ``train``'s format at ``path``, so that
    ``load_checkpoint`` / ``model_from_checkpoint`` / ``lotus eval`` / ``lotus export`` read it.

    For a model made outside a training run (``lotus prune``'s pruned.pt): no optimizer,
    scheduler, scaler or RNG state, epoch 0 and an empty history, so it starts a new run
    (``train(model=...)``) rather than resuming one. extra holds JSON values only (the
    file loads with weights_only=True); best: {"metric", "value", "epoch"}.
    """
    import timm

    path = pathlib.Path(path)
    model = model.to("cpu").eval()
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model": model.state_dict(),  # SparseLinear layers in compact form, with their layouts
        "model_source": "argument",
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "num_classes": num_classes,
        "optimizer": None,
        "scheduler": None,
        "scaler": None,
        "epoch": 0,
        "step": 0,
        "rng": None,
        "config": config.to_dict(),
        "extra": extra,
        "history": [],
        "best": best,
        "world_size": 1,
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
    }
    save_checkpoint(path, state)
    return path
