"""engine.mixing: Mixup / CutMix soft targets and bad input."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lotus_kernels.recipe.engine import mix_batch


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
