"""Data lottery tickets: selection against hand-computed attention, rollout, the fixed-ticket mapping,
and a student trained on online / random tickets through the training engine."""

import pytest
import timm
import torch

from lotus_kernels import tickets as T
from lotus_kernels.patch_dropping import num_kept
from lotus_kernels.train import TrainConfig, evaluate, train
from lotus_kernels.data import synthetic_dataset


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10
    ).eval()


def images(b=4, seed=1):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def attention_maps(model, x):
    """Every block's attention probabilities [B, H, N, N], by hand from timm's modules."""
    maps = []
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for block in model.blocks:
        attn = block.attn
        b, n, c = h.shape
        q, k, _ = attn.qkv(block.norm1(h)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        maps.append((q @ k.transpose(-1, -2) * attn.scale).softmax(-1))
        h = block(h)
    return maps


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_cls_attention_scores_match_hand_computed_attention(layer):
    model, x = tiny_vit(), images()
    with torch.no_grad():
        expected = attention_maps(model, x)[layer][:, :, 0, 1:].mean(1)
    got = T.cls_attention_scores(model, x, layer)
    assert got.shape == (4, 16) and torch.allclose(got, expected, atol=1e-6)
    selector = T.TicketSelector(model, 0.25, layer=layer)
    chosen = selector(x)
    assert chosen.shape == (4, 4)
    assert torch.equal(chosen, expected.topk(4, 1).indices.sort(1).values)


def test_rollout_matches_hand_computation():
    model, x = tiny_vit(), images()
    with torch.no_grad():
        rollout = None
        for a in attention_maps(model, x):
            a = 0.5 * a.mean(1) + 0.5 * torch.eye(17)
            a = a / a.sum(-1, keepdim=True)
            rollout = a if rollout is None else a @ rollout
    assert torch.allclose(T.cls_attention_scores(model, x, "rollout"), rollout[:, 0, 1:], atol=1e-6)


def test_selector_is_a_frozen_copy():
    model = tiny_vit()
    selector = T.TicketSelector(model, 0.5)
    assert selector.model is not model and not any(p.requires_grad for p in selector.model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert selector.k == num_kept(0.5, 16) == 8


def test_random_tickets_are_distinct_subsets_of_the_right_size():
    t = T.random_tickets(50, 64, 0.3)
    assert t.shape == (50, 20)
    assert torch.all(t[:, 1:] > t[:, :-1]) and t.min() >= 0 and t.max() < 64
    assert abs(T.ticket_overlap(t, T.random_tickets(50, 64, 0.3), 64) - T.expected_random_overlap(0.3, 64)) < 0.1


def test_map_tickets_through_crops_and_flips():
    # A 4x4 grid of 8-pixel patches, padding 4: offset (4, 4) is no shift.
    tickets = torch.tensor([[0, 5, 15]])
    mask = lambda off, flip: T.map_tickets(tickets, (4, 4), 8, torch.tensor([off]), torch.tensor([flip]), 4)  # noqa: E731
    assert mask((4, 4), False).nonzero()[:, 1].tolist() == [0, 5, 15]
    # Flip: column c -> 3 - c.
    assert mask((4, 4), True).nonzero()[:, 1].tolist() == [3, 6, 12]
    # Crop offset (0, 0) moves content 4 px down/right: centres (4+4)=8 -> the next patch; patch 15 leaves the image.
    assert mask((0, 0), False).nonzero()[:, 1].tolist() == [5, 10]
    # Offset (8, 8) moves content 4 px up/left: centres 4, 12, 28 -> 0, 8, 24 stay in patches 0, 1, 3 per axis.
    assert mask((8, 8), False).nonzero()[:, 1].tolist() == [0, 5, 15]
    # Offset (8, 0) with a flip: 4 px up, 4 px right, then mirrored: rows keep, columns 0, 1, 3 -> 1, 2, 4 (out) -> 2, 1.
    assert mask((8, 0), True).nonzero()[:, 1].tolist() == [2, 5]


def test_bad_arguments_raise_before_any_work():
    model = tiny_vit()
    for ratio in (0, 1.2, -1):
        with pytest.raises(ValueError, match="keep_ratio"):
            T.TicketSelector(model, ratio)
    with pytest.raises(ValueError, match="layer"):
        T.TicketSelector(model, 0.5, layer=3)
    with pytest.raises(ValueError, match="layer"):
        T.TicketSelector(model, 0.5, layer="last")
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        T.TicketSelector(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match="mode"):
        T.ticket_hooks(None, "fixed")
    with pytest.raises(TypeError, match="TicketSelector"):
        T.ticket_hooks(None, "online")


@pytest.mark.parametrize("mode", ["online", "random"])
def test_student_trains_on_tickets_and_evaluates_both_ways(tmp_path, mode):
    config = TrainConfig(model="vit_micro_cifar", epochs=1, batch_size=32, synthetic_train=64, synthetic_test=64, progress=False, seed=0)
    from lotus_kernels.train import build_model

    selector = T.TicketSelector(build_model(config, 10), 0.5) if mode == "online" else None
    student = T.prepare_student_(build_model(config, 10), 0.5, mode)
    on_tickets, all_patches, tickets_eval = T.ticket_hooks(selector, mode)
    seen = []
    student.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    result = train(config, tmp_path / mode, model=student, token_hook=on_tickets, eval_token_hook=all_patches)
    assert result.history[-1]["test_acc"] is not None
    assert 1 + 32 in seen  # trained on CLS + 32 of 64 patches
    assert 1 + 64 in seen  # evaluated on all 65 tokens
    test = synthetic_dataset(64, split="test")
    metrics = evaluate(result.model, test, token_hook=tickets_eval)
    assert 0.0 <= metrics["acc"] <= 1.0 and metrics["n"] == 64
