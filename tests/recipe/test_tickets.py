"""Data lottery tickets: selection against hand-computed attention, rollout, the fixed-ticket mapping,
and a student trained on online / random tickets through the training engine."""

import pytest
import timm
import torch

from lotus_kernels.recipe.method import tickets as T
from lotus_kernels.nn.patch_dropping import num_kept
from lotus_kernels.recipe.engine import TrainConfig, evaluate, train
from lotus_kernels.recipe.data import synthetic_dataset


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
        T.ticket_hooks(None, "sticky")
    with pytest.raises(TypeError, match="TicketSelector"):
        T.ticket_hooks(None, "online")
    with pytest.raises(TypeError, match="FixedTickets"):
        T.ticket_hooks(T.TicketSelector(model, 0.5), "fixed")
    with pytest.raises(ValueError, match="scores must be"):
        T.FixedTickets(torch.zeros(3, 15), (4, 4), 8, 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_map_scores_follows_crop_flip_exactly(seed):
    # Patch-aligned crops (offsets that are multiples of the patch size): paint
    # each patch of an image with its score, augment the image with
    # data.crop_flip, and the augmented patches carry the mapped scores; the
    # padding (painted 0) is where map_scores says -inf.
    from lotus_kernels.recipe.data import crop_flip

    g = torch.Generator().manual_seed(seed)
    b, rows, cols, patch, padding = 6, 4, 4, 8, 8
    scores = torch.rand(b, rows * cols, generator=g) + 1  # > 0: padding paints 0
    offsets = torch.randint(0, 3, (b, 2), generator=g) * patch  # in {0, 8, 16} = 2 * padding max
    flips = torch.randint(0, 2, (b,), generator=g).bool()
    painted = scores.view(b, rows, cols, 1).repeat_interleave(patch, 1).repeat_interleave(patch, 2)  # [B, H, W, C]
    augmented = crop_flip(painted, offsets, flips, padding)[:, patch // 2 :: patch, patch // 2 :: patch, 0]
    mapped = T.map_scores(scores, (rows, cols), patch, offsets, flips, padding)
    expected = augmented.reshape(b, -1).masked_fill(augmented.reshape(b, -1) == 0, float("-inf"))
    assert torch.equal(mapped, expected)


def test_top_mapped_scores_are_the_mapped_tickets_when_none_is_lost():
    # CIFAR's setting: 4-pixel patches, padding 4. Shifts of exactly half a patch
    # (offsets 2 and 6) put ticket centres on patch borders, where the two
    # mappings may fairly pick different neighbours: left out here.
    g = torch.Generator().manual_seed(0)
    n, grid, patch, k = 400, (8, 8), 4, 20
    scores = torch.rand(n, 64, generator=g)
    allowed = torch.tensor([0, 1, 3, 4, 5, 7, 8])
    offsets = allowed[torch.randint(0, len(allowed), (n, 2), generator=g)]
    flips = torch.randint(0, 2, (n,), generator=g).bool()
    via_tickets = T.map_tickets(T.top_patches(scores, k), grid, patch, offsets, flips, 4)
    top = T.top_patches(T.map_scores(scores, grid, patch, offsets, flips, 4), k)
    via_scores = torch.zeros(n, 64, dtype=torch.bool).scatter_(1, top, True)
    complete = via_tickets.sum(1) == k  # rows whose tickets all stayed in the image
    assert 50 < complete.sum() < n
    assert torch.equal(via_scores[complete], via_tickets[complete])
    # Where some moved out, every surviving ticket patch is still chosen, topped up to k.
    assert bool((via_scores | ~via_tickets).all()) and bool((via_scores.sum(1) == k).all())


def test_student_trains_on_fixed_tickets_following_the_augmentation(tmp_path):
    from lotus_kernels.recipe.engine import build_data, build_model

    config = TrainConfig(model="vit_micro_cifar", epochs=1, batch_size=32, synthetic_train=64, synthetic_test=64, progress=False, seed=0, augment=True)
    selector = T.TicketSelector(build_model(config, 10), 0.5)
    train_set, _ = build_data(config)
    fixed = T.FixedTickets.from_selector(selector, train_set)
    assert fixed.scores.shape == (64, 64) and fixed.grid == (8, 8) and fixed.patch == 4
    # The stored scores are the selector's on un-augmented, normalised images.
    from lotus_kernels.recipe.data import DeviceLoader

    x0, _ = next(iter(DeviceLoader(train_set, 8, shuffle=False)))
    assert torch.allclose(fixed.scores[:8], selector.scores(x0), atol=1e-6)

    on_tickets, all_patches, tickets_eval = T.ticket_hooks(selector, "fixed", fixed)
    assert on_tickets is fixed and on_tickets.needs_draws
    seen_draws, seen_tokens = [], []

    class Recording(T.FixedTickets):
        def __call__(self, student, x, draws):
            seen_draws.append(draws)
            expected = T.top_patches(T.map_scores(fixed.scores[draws.indices], (8, 8), 4, draws.offsets, draws.flips, 4), 32)
            assert torch.equal(self.tickets(draws), expected)
            return super().__call__(student, x, draws)

    hook = Recording(fixed.scores, fixed.grid, fixed.patch, 0.5)
    student = T.prepare_student_(build_model(config, 10), 0.5, "fixed")
    student.blocks[0].register_forward_pre_hook(lambda m, args: seen_tokens.append(args[0].shape[1]))
    result = train(config, tmp_path / "fixed", model=student, token_hook=hook, eval_token_hook=all_patches)
    assert result.history[-1]["test_acc"] is not None
    # The engine handed over each batch's draws: the epoch's plan, batch by batch.
    loader = DeviceLoader(train_set, 32, drop_last=True, augment=True, seed=0)
    plan = loader.plan(0)
    assert len(seen_draws) == 2
    assert torch.equal(torch.cat([d.indices for d in seen_draws]), plan.indices[:64])
    assert torch.equal(torch.cat([d.offsets for d in seen_draws]), plan.offsets[:64])
    assert torch.equal(torch.cat([d.flips for d in seen_draws]), plan.flips[:64])
    assert 1 + 32 in seen_tokens and 1 + 64 in seen_tokens


@pytest.mark.parametrize("mode", ["online", "random"])
def test_student_trains_on_tickets_and_evaluates_both_ways(tmp_path, mode):
    config = TrainConfig(model="vit_micro_cifar", epochs=1, batch_size=32, synthetic_train=64, synthetic_test=64, progress=False, seed=0)
    from lotus_kernels.recipe.engine import build_model

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
