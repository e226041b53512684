"""engine.presets: the documented ViT shapes, LayerScale on deep presets from scratch (and not with hub
weights), the quick recipe."""


import pytest
import torch

from lotus_kernels.recipe.engine import PRESETS, TrainConfig, build_model

from tiny_runs import tiny


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

    from lotus_kernels.recipe.engine.checkpoint import (
        load_init_weights as _load_init_weights,
    )

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
