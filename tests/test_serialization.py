"""save_sparse / load_sparse: safetensors with the layouts in the header, loadable into a fresh timm model."""

import pytest
import timm
import torch
import torch.nn as nn

import lotus_kernels as lk
from lotus_kernels import SparseLinear, SparsityConfig, serialization, sparsify_
from lotus_kernels.recipe.stages import export_safetensors, load_exported

KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}


def dense_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS).eval()


def mixed_sparse_vit():
    """fc1/fc2 2:4 with the GELU fused, qkv block (16, 32) at 0.75, proj unstructured 0.5."""
    model = dense_vit()
    sparsify_(model, SparsityConfig("2:4", fuse_gelu=True), lambda m, n: n.endswith(("fc1", "fc2")))
    sparsify_(model, SparsityConfig("block", 0.75, block_size=(16, 32)), lambda m, n: n.endswith("qkv"))
    sparsify_(model, SparsityConfig("unstructured", 0.5), lambda m, n: n.endswith("proj") and n.startswith("blocks"))
    return model


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block", "mixed"])
def test_round_trip_bit_for_bit_into_a_fresh_timm_model(tmp_path, pattern):
    if pattern == "mixed":
        sparse = mixed_sparse_vit()
    else:
        sparse = sparsify_(dense_vit(), SparsityConfig(pattern, 0.5, block_size=32))
    path = lk.save_sparse(sparse, tmp_path / "model.safetensors", model_kwargs=KWARGS)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # written whole, no temporary left
    for loaded in (
        lk.load_sparse(dense_vit(seed=1), path),  # a model of the architecture, other weights
        lk.load_sparse(None, path),  # the name and kwargs the file records
        lk.load_sparse("vit_tiny_patch16_224", path, **KWARGS),
    ):
        assert_same_state(loaded, sparse)
        x = torch.randn(2, 3, 32, 32)
        with torch.inference_mode():
            assert torch.equal(loaded(x), sparse(x))
    kinds = {type(m).__name__ for n, m in lk.load_sparse(None, path).named_modules() if n.endswith(("qkv", "fc1"))}
    assert kinds == {"SparseLinear"}


def test_the_header_names_format_layouts_model_and_metadata(tmp_path):
    sparse = mixed_sparse_vit()
    path = lk.save_sparse(sparse, tmp_path / "m.safetensors", metadata={"note": "a test", "epochs": 3})
    header = serialization.read_header(path)
    assert (header["format"], header["version"]) == ("lotus_kernels.sparse", 1)
    assert header["model"] == {"name": "vit_tiny_patch16_224", "kwargs": {"num_classes": 10}}  # timm's record, by default
    assert (header["note"], header["epochs"]) == ("a test", 3)
    layouts = {k.removesuffix("._extra_state"): v["pattern"] for k, v in header["extra_state"].items()}
    assert layouts["blocks.0.attn.qkv"] == "block" and layouts["blocks.1.mlp.fc1"] == "2:4" and layouts["blocks.0.attn.proj"] == "unstructured"
    assert header["extra_state"]["blocks.0.mlp.fc1._extra_state"]["activation"] == "gelu"


def test_exported_files_and_saved_files_are_one_format(tmp_path):
    from lotus_kernels.recipe.engine import TrainConfig, build_model

    config = TrainConfig(model="vit_micro_cifar", dataset="synthetic")
    model = sparsify_(build_model(config, 10), "2:4")
    exported = export_safetensors(model, tmp_path / "e.safetensors", {"train_config": config.to_dict(), "num_classes": 10})
    assert_same_state(load_exported(exported), model)
    assert_same_state(lk.load_sparse(build_model(config, 10), exported), model)
    # A save_sparse file carries no training config: load_exported says how to load it instead.
    saved = lk.save_sparse(model, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match=r"records no training config: load it with lotus_kernels.load_sparse"):
        load_exported(saved)


def test_clear_errors(tmp_path):
    from safetensors.torch import save_file

    sparse = sparsify_(dense_vit(), "2:4")
    with pytest.raises(ValueError, match="is a folder"):
        lk.save_sparse(sparse, tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        lk.save_sparse(sparse, tmp_path / "nowhere" / "m.safetensors")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lk.save_sparse({"a": 1}, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        lk.load_sparse(None, tmp_path / "missing.safetensors")
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        lk.load_sparse(None, tmp_path / "text.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="without lotus_kernels' header"):
        lk.load_sparse(None, tmp_path / "plain.safetensors")
    path = lk.save_sparse(sparse, tmp_path / "m.safetensors", model_name=None, model_kwargs={})
    with pytest.raises(TypeError, match="path is required"):
        lk.load_sparse(None)
    with pytest.raises(TypeError, match="model must be an nn.Module, a timm model name or None"):
        lk.load_sparse(3, path)
    # Loading into another architecture fails as load_state_dict does, naming the problem.
    with pytest.raises(ValueError, match="do not fit this VisionTransformer: (size mismatch|Missing key|Unexpected key)"):
        lk.load_sparse(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10), path)


def test_a_state_that_json_cannot_hold_is_refused_by_name(tmp_path):
    class Odd(nn.Module):
        def get_extra_state(self):
            return object()

        def set_extra_state(self, state):
            pass

    model = nn.Sequential(SparseLinear.from_dense(nn.Linear(8, 8), "2:4"), Odd())
    with pytest.raises(TypeError, match=r"state_dict entry '1._extra_state' is a object that JSON cannot hold"):
        lk.save_sparse(model, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_lotus_eval_takes_a_saved_or_exported_safetensors_file(tmp_path, capsys):
    import json

    from lotus_kernels.recipe import cli

    path = lk.save_sparse(sparsify_(dense_vit(), "2:4"), tmp_path / "m.safetensors", model_kwargs=KWARGS)
    data = ["--set", "dataset=synthetic", "--set", "synthetic_train=64", "--set", "synthetic_test=32"]
    assert cli.main(["eval", "--checkpoint", str(path), *data]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n"] == 32 and 0 <= line["acc"] <= 1
    # Simple mistakes are one line: a folder, data the model cannot take.
    assert cli.main(["eval", "--checkpoint", str(tmp_path), *data]) == 2
    assert "is a folder; give a checkpoint file" in capsys.readouterr().err
    big = lk.save_sparse(sparsify_(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10), "2:4"), tmp_path / "b.safetensors")
    assert cli.main(["eval", "--checkpoint", str(big), *data]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lotus eval: error: the model of") and "cannot run" in err and err.count("\n") == 1
