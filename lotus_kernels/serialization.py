"""Save and load sparse models as safetensors: ``save_sparse`` / ``load_sparse``.

A file holds the model's state_dict with every SparseLinear compact (values
and index buffers, exactly as stored: a round trip is bit for bit), and in
the safetensors header, under the key "lotus", one JSON document:

    {"format": "lotus_kernels.sparse", "version": 1,
     "extra_state": {"blocks.0.attn.qkv._extra_state": {"pattern": "2:4", ...}, ...},
     "model": {"name": "vit_tiny_patch16_224", "kwargs": {"num_classes": 10}},   # when known
     ...metadata given to save_sparse (lotus export adds train_config, num_classes)}

The layouts in "extra_state" let ``load_sparse`` turn the matching
nn.Linear layers of a freshly built model into empty SparseLinear layers of
the right layout before loading (``nn.sparsify_like_``), so loading needs no
lotus training config: a timm name (or a model) is enough. Safetensors holds
tensors only and never executes code on load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

FORMAT = "lotus_kernels.sparse"
VERSION = 1
HEADER_KEY = "lotus"

__all__ = ["save_sparse", "load_sparse", "read_header", "FORMAT", "VERSION"]


def _timm_name(model: nn.Module) -> str | None:
    """The timm architecture a model was created as (timm records it in pretrained_cfg), if any."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    return name if isinstance(name, str) else None


def _json_value(key: str, value):
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"save_sparse: state_dict entry {key!r} is a {type(value).__name__} that JSON cannot hold; "
            "only tensors and JSON-able extra states can be saved"
        ) from None
    return value


def save_sparse(
    model: nn.Module,
    path,
    *,
    model_name: str | None = None,
    model_kwargs: Mapping | None = None,
    metadata: Mapping | None = None,
) -> Path:
    """Write ``model`` (SparseLinear layers compact) to ``path`` as safetensors; returns the path.

    model_name / model_kwargs: how ``load_sparse(None, path)`` rebuilds the
    architecture (``timm.create_model(model_name, pretrained=False,
    **model_kwargs)``); by default timm's recorded architecture and the
    model's ``num_classes``. metadata: any JSON-able mapping, kept in the
    header. The file is written whole to a temporary name and renamed: a
    killed save never leaves a half file at ``path``.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_sparse: model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"save_sparse: {path} is a folder; give a file path such as {path / 'model.safetensors'}")
    if not path.parent.is_dir():
        raise ValueError(f"save_sparse: the folder {path.parent} does not exist")
    state = model.state_dict()
    # contiguous CPU copies: safetensors wants dense storage and no two entries sharing it.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    extra = {k: _json_value(k, v) for k, v in state.items() if not isinstance(v, torch.Tensor)}
    name = model_name or _timm_name(model)
    kwargs = dict(model_kwargs) if model_kwargs is not None else ({"num_classes": model.num_classes} if isinstance(getattr(model, "num_classes", None), int) else {})
    header = {**dict(metadata or {}), "format": FORMAT, "version": VERSION, "extra_state": extra}
    if name:
        header["model"] = {"name": name, "kwargs": _json_value("model_kwargs", kwargs)}
    text = json.dumps(header, default=_json_default)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: text})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"save_sparse: metadata value {value!r} ({type(value).__name__}) is not JSON-able")


def read_header(path) -> dict:
    """The "lotus" document of a file written by save_sparse or ``lotus export``; ValueError for any other file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with safe_open(str(path), "pt") as f:
            header = (f.metadata() or {}).get(HEADER_KEY)
    except Exception as e:  # safetensors raises its own error type for anything that is not its format
        raise ValueError(f"{path} is not a safetensors file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if header is None:
        raise ValueError(f"{path} is a safetensors file without lotus_kernels' header: it was not written by save_sparse or lotus export")
    try:
        doc = json.loads(header)
    except json.JSONDecodeError:
        raise ValueError(f"{path}: its lotus header is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("extra_state"), dict):
        raise ValueError(f"{path}: its lotus header has no layout table (extra_state)")
    if doc.get("version", VERSION) > VERSION:
        raise ValueError(f"{path} was written by a newer lotus_kernels (format version {doc['version']}; this one reads {VERSION})")
    return doc


def load_sparse(model=None, path=None, *, strict: bool = True, device="cpu", **model_kwargs) -> nn.Module:
    """A model with the sparse weights of ``path``, SparseLinear layers in place; returns it (in eval mode).

    model: an nn.Module of the saved architecture (its nn.Linear layers that
    were sparse become SparseLinear), a timm model name, or None for the
    name recorded in the file (``model_kwargs`` then override the recorded
    ones). device: where the tensors are loaded. strict: as in
    ``load_state_dict``; a SparseLinear layout is always checked in full.
    """
    from safetensors.torch import load_file

    from .nn import sparsify_like_

    if path is None:
        raise TypeError("load_sparse: path is required (load_sparse(model_or_name, path))")
    header = read_header(path)
    if model is None or isinstance(model, str):
        recorded = header.get("model") or {}
        name = model or recorded.get("name")
        if not name:
            raise ValueError(f"load_sparse: {path} records no model name; pass the model or its timm name")
        import timm

        kwargs = {**(recorded.get("kwargs") or {}), **model_kwargs} if name == recorded.get("name") else dict(model_kwargs)
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"load_sparse: model must be an nn.Module, a timm model name or None, got {type(model).__name__}")
    state = dict(load_file(str(path), device=str(device)))
    state.update(header["extra_state"])
    sparsify_like_(model, state)
    model.to(device)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:  # torch lists every missing / unexpected key and size mismatch, one per line
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        shown = "; ".join(p[:160] for p in problems[:3]) + (f"; ... {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(f"load_sparse: the tensors of {path} do not fit this {type(model).__name__}: {shown}") from None
    return model.eval()
