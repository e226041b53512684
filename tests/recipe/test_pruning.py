"""lotus_kernels.recipe.method (was lotus_kernels.pruning): one-shot counts, the knee, ISP vote semantics and exact target, held masks, projection.

Everything runs on CPU on the 2-block vit_micro_cifar preset (about 98 k
prunable weights) with random images; training is a cheap stand-in except
where the default ``make_train_fn`` itself is under test.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from lotus_kernels import SparseLinear, sparsity_summary
from lotus_kernels.recipe.data import ImageSet
from lotus_kernels.masks import num_pruned
from lotus_kernels.recipe.method import (
    EssentialSparsityResult,
    InstantSoupConfig,
    apply_masks_,
    count_pruned,
    essential_sparsity_sweep,
    find_knee,
    global_sparsity,
    held_masks,
    hold_masks_,
    ingredient_subsets,
    instant_soup_prune,
    layer_sparsity,
    make_train_fn,
    masks_held,
    merge_masks,
    one_shot_masks,
    plot_essential_sparsity,
    plot_instant_soup,
    project_masks,
    prunable_weights,
    prune_among_kept,
    prune_one_shot_,
    release_masks_,
    sparsify_masked_,
    vote_counts,
    weight_sparsity,
)
from lotus_kernels.recipe.engine import TrainConfig, build_model

PRUNABLE_SUFFIXES = {"qkv", "proj", "fc1", "fc2"}


def micro_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(TrainConfig(model="vit_micro_cifar", drop_path=0.0), 10)
    with torch.no_grad():
        # The preset's jax init zeroes the head; random values make the logits depend on the weights.
        model.head.weight.normal_(0, 0.02)
    return model.eval()


def random_images(n: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageSet(images, labels, tuple(f"c{i}" for i in range(10)), "random", (0.5,) * 3, (0.25,) * 3)


def random_masks(shapes: dict, p: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=g) >= p for name, shape in shapes.items()}


def reference_global_masks(weights: dict, sparsity: float) -> dict:
    """Stable argsort of all |w| (float32): the lowest first, ties to the earliest position."""
    flat = torch.cat([w.detach().abs().float().flatten() for w in weights.values()])
    k = num_pruned(flat.numel(), sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:k]] = False
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = keep[start : start + w.numel()].reshape(w.shape)
        start += w.numel()
    return out


def never_train(model, subset, masks):
    pytest.fail("train_fn was called although the configuration is invalid")


# ---------------------------------------------------------------------------
# one-shot global magnitude pruning
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 1 / 3, 0.5, 0.9])
def test_one_shot_exact_counts_and_untouched_layers(sparsity):
    model = micro_vit()
    before = copy.deepcopy(model.state_dict())
    weights = prunable_weights(model)
    assert {name.split(".")[-1] for name in weights} == PRUNABLE_SUFFIXES
    assert all(name.startswith("blocks.") for name in weights)
    n = sum(w.numel() for w in weights.values())

    masks = prune_one_shot_(model, sparsity)
    pruned, total = count_pruned(masks)
    assert total == n
    assert pruned == math.floor(sparsity * n + 0.5)
    assert global_sparsity(masks) == pruned / n
    # The same masks a full stable sort gives: one global threshold, ties to the lowest index.
    reference = reference_global_masks(weights, sparsity)
    for name in masks:
        assert torch.equal(masks[name], reference[name]), name

    after = model.state_dict()
    for key, value in before.items():
        layer = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and layer in masks:
            expected = value.masked_fill(~masks[layer], 0)
            assert torch.equal(after[key], expected), key
        else:  # head, patch embedding, norms, biases, tokens: bit for bit
            assert torch.equal(after[key], value), key


def test_one_shot_masks_do_not_modify_the_model_and_take_a_filter():
    model = micro_vit()
    before = copy.deepcopy(model.state_dict())
    masks = one_shot_masks(model, 0.4, filter_fn=lambda m, name: isinstance(m, nn.Linear) and name.endswith("fc1"))
    assert sorted(masks) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert count_pruned(masks) == (num_pruned(2 * 256 * 64, 0.4), 2 * 256 * 64)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------
# the knee
# ---------------------------------------------------------------------------


def test_find_knee_on_a_hand_made_curve():
    sparsities = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    # 0.80 - 0.79 is 0.010000000000000009 in floating point: a drop of exactly one point still qualifies.
    accuracies = [0.805, 0.80, 0.79, 0.785, 0.70, 0.30]
    assert find_knee(sparsities, accuracies, 0.80) == 0.3
    assert find_knee(sparsities, accuracies, 0.80, max_drop=0.015) == 0.4
    assert find_knee(sparsities, accuracies, 0.80, max_drop=0.0) == 0.2
    assert find_knee(sparsities, accuracies, 0.80, max_drop=0.5) == 0.6
    # Order does not matter; nothing qualifying gives 0.0 (dense); NaN never qualifies.
    assert find_knee(sparsities[::-1], accuracies[::-1], 0.80) == 0.3
    assert find_knee([0.5, 0.7], [0.1, 0.2], 0.80) == 0.0
    assert find_knee([0.5, 0.7], [0.80, float("nan")], 0.80) == 0.5
    with pytest.raises(ValueError, match="max_drop"):
        find_knee(sparsities, accuracies, 0.8, max_drop=-0.01)
    with pytest.raises(ValueError, match="same length"):
        find_knee(sparsities, accuracies[:-1], 0.8)


def test_sweep_restores_the_model_finds_the_knee_and_serialises(tmp_path):
    model = micro_vit()
    before = copy.deepcopy(model.state_dict())
    seen = []

    def accuracy(m):
        # A stand-in metric that sees the pruned model: flat up to 40 % zeros, then a cliff.
        s = weight_sparsity(m)
        seen.append(s)
        return 0.8 - 0.001 * s - (0.3 if s > 0.45 else 0.0)

    result = essential_sparsity_sweep(model, accuracy, [0.2, 0.4, 0.5, 0.8])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    n = result.num_prunable
    assert result.pruned_counts == [num_pruned(n, s) for s in (0.2, 0.4, 0.5, 0.8)]
    # Each evaluation saw exactly its own one-shot model (the random init holds no exact zeros).
    assert seen == [0.0] + [c / n for c in result.pruned_counts]
    assert result.knee == 0.4
    assert result.dense_accuracy == 0.8

    d = json.loads(json.dumps(result.to_dict()))
    assert EssentialSparsityResult.from_dict(d) == result
    png = plot_essential_sparsity(result, tmp_path / "es.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_restores_the_model_when_evaluation_fails():
    model = micro_vit()
    before = copy.deepcopy(model.state_dict())
    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return 0.5

    with pytest.raises(RuntimeError, match="boom"):
        essential_sparsity_sweep(model, failing, [0.3, 0.6, 0.9])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_sweep_with_an_image_set_uses_evaluate():
    model = micro_vit()
    result = essential_sparsity_sweep(model, random_images(40), [0.5, 0.9])
    assert len(result.accuracies) == 2
    assert all(0.0 <= a <= 1.0 for a in [result.dense_accuracy, *result.accuracies])


def test_sweep_bad_arguments():
    model = micro_vit()
    with pytest.raises(ValueError, match=r"sparsities\[1\] must be in \[0, 1\), got 1.0"):
        essential_sparsity_sweep(model, lambda m: 0.5, [0.5, 1.0])
    with pytest.raises(ValueError, match="sparsities must be a non-empty"):
        essential_sparsity_sweep(model, lambda m: 0.5, [])
    with pytest.raises(TypeError, match="eval_data must be an ImageSet or a callable"):
        essential_sparsity_sweep(model, "test", [0.5])
    with pytest.raises(ValueError, match="sparsity must be in \\[0, 1\\), got -0.1"):
        one_shot_masks(model, -0.1)
    with pytest.raises(ValueError, match="no prunable layers"):
        one_shot_masks(nn.Sequential(nn.Conv2d(3, 3, 1)), 0.5)


# ---------------------------------------------------------------------------
# ISP mask arithmetic
# ---------------------------------------------------------------------------


def test_merge_votes_on_hand_made_masks():
    a = {"x": torch.tensor([[1, 1, 0, 0, 1, 0]], dtype=torch.bool), "y": torch.tensor([1, 0, 0], dtype=torch.bool)}
    b = {"x": torch.tensor([[1, 0, 1, 0, 1, 0]], dtype=torch.bool), "y": torch.tensor([0, 0, 1], dtype=torch.bool)}
    c = {"x": torch.tensor([[1, 0, 0, 0, 0, 1]], dtype=torch.bool), "y": torch.tensor([1, 0, 1], dtype=torch.bool)}
    votes = vote_counts([a, b, c])
    assert torch.equal(votes["x"], torch.tensor([[3, 1, 1, 0, 2, 1]]))
    assert torch.equal(votes["y"], torch.tensor([2, 0, 2]))
    union = merge_masks([a, b, c])  # default: keep if any keeps
    assert torch.equal(union["x"], torch.tensor([[1, 1, 1, 0, 1, 1]], dtype=torch.bool))
    assert torch.equal(union["y"], torch.tensor([1, 0, 1], dtype=torch.bool))
    majority = merge_masks([a, b, c], vote_threshold=2)
    assert torch.equal(majority["x"], torch.tensor([[1, 0, 0, 0, 1, 0]], dtype=torch.bool))
    assert torch.equal(majority["y"], torch.tensor([1, 0, 1], dtype=torch.bool))
    intersection = merge_masks([a, b, c], vote_threshold=3)
    assert torch.equal(intersection["x"], torch.tensor([[1, 0, 0, 0, 0, 0]], dtype=torch.bool))
    assert torch.equal(intersection["y"], torch.tensor([0, 0, 0], dtype=torch.bool))


def test_merge_union_and_intersection_on_random_masks():
    shapes = {"l0": (24, 16), "l1": (8, 40)}
    masks = [random_masks(shapes, p, seed) for seed, p in enumerate((0.3, 0.5, 0.7, 0.4, 0.6))]
    union = merge_masks(masks, 1)
    intersection = merge_masks(masks, 5)
    for name in shapes:
        stacked = torch.stack([m[name] for m in masks])
        assert torch.equal(union[name], stacked.any(0))
        assert torch.equal(intersection[name], stacked.all(0))
    with pytest.raises(ValueError, match=r"vote_threshold must be in \[1, 5\].*got 6"):
        merge_masks(masks, 6)
    with pytest.raises(ValueError, match=r"vote_threshold must be in \[1, 5\].*got 0"):
        merge_masks(masks, 0)
    with pytest.raises(ValueError, match="shape"):
        merge_masks([masks[0], {"l0": masks[1]["l0"], "l1": masks[1]["l1"][:, :8]}])


def test_prune_among_kept_prunes_a_superset_to_the_exact_count():
    g = torch.Generator().manual_seed(1)
    weights = {"a": torch.randn(32, 16, generator=g), "b": torch.randn(16, 48, generator=g)}
    start = random_masks({k: w.shape for k, w in weights.items()}, 0.2, seed=3)
    pruned0, total = count_pruned(start)
    new = prune_among_kept(weights, start, 0.45)
    assert count_pruned(new) == (num_pruned(total, 0.45), total)
    for name in weights:
        assert not bool((new[name] & ~start[name]).any())  # nothing pruned comes back
    # The newly pruned are the smallest |w| among the kept.
    newly = torch.cat([weights[k].abs()[start[k] & ~new[k]] for k in weights])
    still = torch.cat([weights[k].abs()[new[k]] for k in weights])
    assert newly.max() <= still.min()
    with pytest.raises(ValueError, match="cannot come back"):
        prune_among_kept(weights, start, 0.05)


def test_ingredient_subsets_are_seeded_and_disjoint_when_possible():
    subsets = ingredient_subsets(1000, 5, 0.1, seed=7, round_index=2)
    assert [len(s) for s in subsets] == [100] * 5
    assert len(torch.cat(subsets).unique()) == 500
    again = ingredient_subsets(1000, 5, 0.1, seed=7, round_index=2)
    assert all(torch.equal(a, b) for a, b in zip(subsets, again))
    other_round = ingredient_subsets(1000, 5, 0.1, seed=7, round_index=3)
    assert not torch.equal(subsets[0], other_round[0])
    # 5 x 30 % cannot be disjoint: every sample is used, overlaps are as small as the sizes allow.
    big = ingredient_subsets(100, 5, 0.3)
    assert len(torch.cat(big).unique()) == 100
    assert all(len(s.unique()) == 30 for s in big)


# ---------------------------------------------------------------------------
# Instant Soup Pruning end to end (stand-in training)
# ---------------------------------------------------------------------------


class StandInTrain:
    """Two SGD steps with momentum and weight decay on the subset; records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, subset, masks):
        # The masks are held while training runs.
        assert sorted(held_masks(model)) == sorted(masks)
        self.calls.append((len(subset), global_sparsity(masks)))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
        x = (subset.images[:16].permute(0, 3, 1, 2).float() - 128) / 64
        y = subset.labels[:16]
        model.train()
        for _ in range(2):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()


@pytest.mark.parametrize("vote_threshold", [1, 3])
def test_isp_reaches_the_exact_target(tmp_path, vote_threshold):
    model = micro_vit()
    data = random_images(200)
    train_fn = StandInTrain()
    config = InstantSoupConfig(
        target_sparsity=0.3, ingredients=3, subset_fraction=0.1, prune_step=0.15,
        vote_threshold=vote_threshold, tolerance=0.0, max_rounds=6, seed=1,
    )
    result = instant_soup_prune(model, data, config, train_fn=train_fn, eval_data=lambda m: 1.0 - weight_sparsity(m))

    n = result.num_prunable
    target = num_pruned(n, 0.3)
    assert result.final_pruned == target
    assert count_pruned(result.masks) == (target, n)
    assert result.final_sparsity == target / n
    # Pruned weights are exact zeros in the returned (plain, fine-tuned) model.
    assert held_masks(model) == {}
    for name, w in prunable_weights(model).items():
        assert bool((w[~result.masks[name]] == 0).all()), name
    # History: round 0, then rounds whose merged sparsity grows and never passes the target.
    assert result.history[0].round == 0 and result.history[0].sparsity == 0.0
    pruned = [r.pruned for r in result.history]
    assert pruned == sorted(pruned) and pruned[-1] <= target
    for r in result.history[1:]:
        assert len(r.ingredient_sparsities) == 3
        assert all(s <= target / n for s in r.ingredient_sparsities)
        if vote_threshold == 1:  # the union prunes no more than any ingredient
            assert r.sparsity <= min(r.ingredient_sparsities)
        assert r.accuracy == pytest.approx(1.0 - r.sparsity, abs=1e-12)
    assert result.oneshot_accuracy == pytest.approx(1.0 - target / n, abs=1e-12)
    # 3 ingredients per round, 20-sample subsets, then fine-tuning on all 200.
    assert len(train_fn.calls) == 3 * result.rounds + 1
    assert [c[0] for c in train_fn.calls[:-1]] == [20] * (3 * result.rounds)
    assert train_fn.calls[-1] == (200, target / n)

    d = json.loads(json.dumps(result.to_dict()))
    assert d["final_pruned"] == target and d["rounds"] == result.rounds
    assert set(d["layer_sparsity"]) == set(result.masks)
    png = plot_instant_soup(result, tmp_path / "isp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_isp_starts_from_initial_masks_and_can_stop_early():
    model = micro_vit()
    knee = one_shot_masks(model, 0.2)
    train_fn = StandInTrain()
    config = {"target_sparsity": 0.35, "ingredients": 2, "max_rounds": 1, "finetune": False, "main_fraction": 0.25}
    result = instant_soup_prune(model, random_images(100), config, train_fn=train_fn, initial_masks=knee)
    assert result.history[0].pruned == count_pruned(knee)[0]
    assert result.rounds == 1 and result.stopped == "max_rounds"
    assert result.final_pruned == num_pruned(result.num_prunable, 0.35)
    # The main model's share first, then the two ingredients; no fine-tuning.
    assert [c[0] for c in train_fn.calls] == [25, 10, 10]
    for name, mask in knee.items():  # everything the start pruned stays pruned
        assert not bool((result.masks[name] & ~mask).any())


# ---------------------------------------------------------------------------
# masks held through training
# ---------------------------------------------------------------------------


def test_held_masks_keep_weights_zero_under_stale_adamw_state():
    model = micro_vit()
    data = random_images(32)
    x = (data.images.permute(0, 3, 1, 2).float() - 128) / 64
    # The optimizer is built and stepped before the mask exists: its momentum would move pruned weights.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), data.labels).backward()
        opt.step()
    shapes = {k: w.shape for k, w in prunable_weights(model).items()}
    masks = random_masks(shapes, 0.6, seed=5)
    hold_masks_(model, masks)
    before = {k: w.clone() for k, w in prunable_weights(model).items()}
    model.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), data.labels).backward()
        for name, layer in ((n, model.get_submodule(n)) for n in masks):
            grad = layer.parametrizations.weight.original.grad
            assert bool((grad[~masks[name]] == 0).all()), name
        opt.step()
        for name, w in prunable_weights(model).items():
            assert bool((w[~masks[name]] == 0).all()), name
    assert all(torch.equal(held_masks(model)[k], masks[k]) for k in masks)
    release_masks_(model)
    assert held_masks(model) == {}
    for name, w in prunable_weights(model).items():
        assert isinstance(model.get_submodule(name).weight, nn.Parameter)
        assert bool((w[~masks[name]] == 0).all()), name
        assert not torch.equal(w[masks[name]], before[name][masks[name]]), name  # kept weights did train
    assert layer_sparsity(masks) == {k: 1 - int(m.sum()) / m.numel() for k, m in masks.items()}


def test_default_train_fn_trains_with_masks_fixed():
    model = micro_vit()
    masks = one_shot_masks(model, 0.5)
    before = {k: w.clone() for k, w in prunable_weights(model).items()}
    train_fn = make_train_fn(epochs=2, batch_size=16, lr=1e-3, weight_decay=0.1)
    with masks_held(model, masks):
        train_fn(model, random_images(48), masks)
    assert held_masks(model) == {}
    for name, w in prunable_weights(model).items():
        assert bool((w[~masks[name]] == 0).all()), name
        assert not torch.equal(w[masks[name]], before[name][masks[name]]), name



def test_train_fn_runs_every_forward_through_its_token_hook():
    # A ticket student's ingredients must train on its tickets: the hook replaces model(x), batch by batch.
    model = micro_vit()
    seen = []

    def hook(m, x):
        seen.append(x.shape[0])
        return m(x)

    make_train_fn(epochs=2, batch_size=16, lr=1e-3, token_hook=hook)(model, random_images(40), {})
    # The training engine's batches: full ones only (the last 8 of each epoch's order are dropped).
    assert seen == [16, 16] * 2
    with pytest.raises(TypeError, match="token_hook must be callable"):
        make_train_fn(token_hook="tickets")

# ---------------------------------------------------------------------------
# projection to kernel patterns
# ---------------------------------------------------------------------------


def test_projection_to_2to4_gives_valid_masks_and_a_sparse_model():
    model = micro_vit()
    masks = prune_one_shot_(model, 0.3)
    weights = prunable_weights(model)
    projected = project_masks(weights, masks, "2:4")
    for name, mask in projected.items():
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert bool((groups.sum(-1) == 2).all()), name
        # The 2 kept of each group are the 2 largest masked magnitudes.
        score = torch.where(masks[name], weights[name].abs(), 0.0).reshape(groups.shape)
        kept_min = torch.where(groups, score, float("inf")).min(-1).values
        dropped_max = torch.where(groups, float("-inf"), score).max(-1).values
        assert bool((kept_min >= dropped_max).all()), name

    dense = copy.deepcopy(model)
    apply_masks_(dense, projected)
    sparse = sparsify_masked_(model, masks, "2:4")
    summary = sparsity_summary(sparse)
    assert len(summary) == len(masks) and {layer.pattern for layer in summary.layers} == {"2:4"}
    for name, mask in projected.items():
        assert torch.equal(sparse.get_submodule(name).mask(), mask)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-5)


def test_projection_to_blocks_keeps_each_layers_sparsity():
    model = micro_vit()
    masks = prune_one_shot_(model, 0.5)
    projected = project_masks(prunable_weights(model), masks, "block", block_size=32)
    for name, mask in projected.items():
        rows, cols = mask.shape
        blocks = mask.reshape(rows // 32, 32, cols // 32, 32)
        kept = blocks.all(3).all(1)
        assert torch.equal(kept, blocks.any(3).any(1)), name  # every block all kept or all pruned
        n_blocks = kept.numel()
        assert n_blocks - int(kept.sum()) == num_pruned(n_blocks, layer_sparsity(masks)[name]), name
    sparse = sparsify_masked_(model, masks, "block", block_size=32)
    assert all(isinstance(sparse.get_submodule(name), SparseLinear) for name in masks)
    assert isinstance(sparse.head, nn.Linear)


def test_projection_bad_pattern():
    model = micro_vit()
    masks = one_shot_masks(model, 0.3)
    with pytest.raises(ValueError, match=r"pattern must be one of .*got '3:8'"):
        project_masks(prunable_weights(model), masks, "3:8")
    with pytest.raises(ValueError, match=r"pattern must be one of .*got 'blocks'"):
        sparsify_masked_(model, masks, "blocks")


# ---------------------------------------------------------------------------
# bad configurations fail before any training
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"target_sparsity": 1.0}, ValueError, r"target_sparsity must be in \[0, 1\), got 1.0"),
        ({"target_sparsity": -0.2}, ValueError, r"target_sparsity must be in \[0, 1\), got -0.2"),
        ({"target_sparsity": "0.3"}, TypeError, "target_sparsity"),
        ({"ingredients": 0}, ValueError, "ingredients must be an int >= 1, got 0"),
        ({"ingredients": 2.5}, TypeError, "ingredients must be an int >= 1, got float 2.5"),
        ({"subset_fraction": 0.0}, ValueError, r"subset_fraction must be in \(0, 1\], got 0.0"),
        ({"subset_fraction": 1.5}, ValueError, r"subset_fraction must be in \(0, 1\], got 1.5"),
        ({"prune_step": 0.0}, ValueError, r"prune_step must be in \(0, 1\), got 0.0"),
        ({"vote_threshold": 0}, ValueError, r"vote_threshold must be in \[1, ingredients=5\].*got 0"),
        ({"vote_threshold": 6}, ValueError, r"vote_threshold must be in \[1, ingredients=5\].*got 6"),
        ({"ingredients": 2, "vote_threshold": 3}, ValueError, r"\[1, ingredients=2\].*got 3"),
        ({"max_rounds": 0}, ValueError, "max_rounds must be an int >= 1, got 0"),
        ({"tolerance": 1.0}, ValueError, r"tolerance must be in \[0, 1\), got 1.0"),
        ({"main_fraction": -0.5}, ValueError, r"main_fraction must be in \[0, 1\], got -0.5"),
        ({"rounds": 3}, ValueError, "unknown InstantSoupConfig keys: rounds"),
    ],
)
def test_bad_isp_config_raises_before_training(overrides, error, match):
    with pytest.raises(error, match=match):
        InstantSoupConfig.from_dict(overrides)
    with pytest.raises(error, match=match):
        instant_soup_prune(micro_vit(), random_images(20), overrides, train_fn=never_train)


def test_bad_isp_arguments_raise_before_training():
    model, data = micro_vit(), random_images(20)
    with pytest.raises(ValueError, match="already prune .* more than target_sparsity=0.2"):
        instant_soup_prune(model, data, {"target_sparsity": 0.2}, train_fn=never_train,
                           initial_masks=one_shot_masks(model, 0.5))
    with pytest.raises(ValueError, match="initial_masks must cover exactly the prunable layers"):
        instant_soup_prune(model, data, {"target_sparsity": 0.5}, train_fn=never_train,
                           initial_masks={"blocks.0.mlp.fc1": torch.rand(256, 64) > 0.5})
    with pytest.raises(TypeError, match="train_fn must be callable"):
        instant_soup_prune(model, data, train_fn="sgd")
    with pytest.raises(TypeError, match="train_data must be an ImageSet"):
        instant_soup_prune(model, [1, 2, 3], train_fn=never_train)
    with pytest.raises(TypeError, match="eval_data must be an ImageSet or a callable"):
        instant_soup_prune(model, data, train_fn=never_train, eval_data=3)
    with pytest.raises(TypeError, match="config must be an InstantSoupConfig"):
        instant_soup_prune(model, data, 0.3, train_fn=never_train)
