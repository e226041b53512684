"""Dynamic2to4: the straight-through gradient, the re-prune, the in-place rewrite and its bookkeeping.

Masks, slots, metadata and untouched tensors are compared exactly; gradients
against autograd on an equivalent dense nn.Linear (float64, tight tolerance).
All on CPU with the reference backend.
"""

import copy
import os
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from lotus_kernels.nn.dynamic_2to4 import Dynamic2to4
from lotus_kernels.layouts import check_2to4_metadata, unpack_2to4_slots
from lotus_kernels.masks import nm_mask
from lotus_kernels.nn import SparseLinear


def sparse(in_features, out_features, *, seed=0, dtype=torch.float32, activation="none", bias=True):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    return SparseLinear.from_dense(linear, "2:4", backend="reference", activation=activation)


def two_layer_model(seed=0):
    # Awkward widths: 20 and 36 are multiples of 4 but not of 32 (a partial metadata word).
    return nn.Sequential(sparse(20, 36, seed=seed, activation="gelu"), sparse(36, 12, seed=seed + 1))


def groups_keep_two(layer: SparseLinear) -> bool:
    return bool((layer.mask().reshape(layer.out_features, -1, 4).sum(-1) == 2).all())


def train_step(model, optimizer, hook, step, x, target):
    optimizer.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x), target)
    loss.backward()
    optimizer.step()
    result = hook(step, model, optimizer) if hook is not None else None
    return loss.item(), result


# --------------------------------------------------------------------------- construction


def test_initial_shadow_is_the_masked_weight_and_not_model_state():
    model = two_layer_model()
    hook = Dynamic2to4(model, every=5)
    assert hook.layer_names == ["0", "1"]
    for name, layer in model.named_children():
        shadow = hook.shadows[name]
        assert shadow.dtype == torch.float32 and not isinstance(shadow, nn.Parameter)
        assert torch.equal(shadow, layer.to_dense().detach())
    assert all(not k.startswith("shadow") for k in model.state_dict())
    assert len(list(model.parameters())) == 4  # values + bias per layer: nothing added


def test_dense_weights_fill_the_pruned_positions():
    layer = sparse(16, 8)
    dense = torch.randn(8, 16)
    hook = Dynamic2to4(nn.Sequential(layer), every=1, dense_weights={"0": dense})
    keep = layer.mask()
    expected = torch.where(keep, layer.to_dense().detach(), dense)
    assert torch.equal(hook.shadows["0"], expected)


def test_bad_arguments_raise_with_clear_messages():
    model = nn.Sequential(sparse(16, 8))
    for every in (0, -3):
        with pytest.raises(ValueError, match=rf"every must be an int >= 1.*got {every}"):
            Dynamic2to4(model, every)
    for every in (1.5, True, "4"):
        with pytest.raises(TypeError, match="every must be an int >= 1"):
            Dynamic2to4(model, every)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got Tensor"):
        Dynamic2to4(torch.zeros(3), 1)
    unstructured = SparseLinear.from_dense(nn.Linear(16, 8), "unstructured", sparsity=0.5, backend="reference")
    with pytest.raises(ValueError, match=r"no SparseLinear layer with pattern '2:4'.*\['unstructured'\]"):
        Dynamic2to4(nn.Sequential(unstructured, nn.Linear(8, 8)), 1)
    with pytest.raises(ValueError, match="no SparseLinear at all"):
        Dynamic2to4(nn.Linear(4, 4), 1)
    with pytest.raises(ValueError, match=r"dense_weights\['0'\] must have the layer's shape \(out, in\) = \(8, 16\), got \(16, 8\)"):
        Dynamic2to4(model, 1, dense_weights={"0": torch.zeros(16, 8)})
    with pytest.raises(ValueError, match=r"not 2:4 SparseLinear layers of model: \['fc9'\]"):
        Dynamic2to4(model, 1, dense_weights={"fc9": torch.zeros(8, 16)})
    for scale in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="pruned_lr_scale must be a finite number >= 0"):
            Dynamic2to4(model, 1, pruned_lr_scale=scale)

    hook = Dynamic2to4(model, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, error in ((0, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match="step must be"):
            hook(step, model, optimizer)
    model(torch.randn(3, 16)).sum().backward()
    other = torch.optim.SGD([model[0].bias], lr=0.1)
    with pytest.raises(ValueError, match="values of layer '0' are not in the optimizer's param groups"):
        hook(1, model, other)


# --------------------------------------------------------------------------- gradient


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_accumulated_gradient_is_dense_autograd_weight_gradient(activation):
    # float64 end to end: the only difference to autograd is the summation order.
    layer = sparse(20, 12, dtype=torch.float64, activation=activation)
    hook = Dynamic2to4(nn.Sequential(layer), every=1)
    dense = nn.Linear(20, 12, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.to_dense())
        dense.bias.copy_(layer.bias)
    act = F.gelu if activation == "gelu" else (lambda t: t)
    torch.manual_seed(1)
    # The layer runs twice per step on inputs of different leading shapes: the gradients add up.
    x1, x2 = torch.randn(3, 7, 20, dtype=torch.float64), torch.randn(5, 20, dtype=torch.float64)
    w1, w2 = torch.randn(3, 7, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    ((layer(x1) * w1).sum() + (layer(x2) * w2).sum()).backward()
    ((act(dense(x1)) * w1).sum() + (act(dense(x2)) * w2).sum()).backward()
    got = hook.pending_grads["0"]
    torch.testing.assert_close(got, dense.weight.grad, rtol=1e-12, atol=1e-12)
    # At kept positions it is the gradient of values itself.
    keep = layer.mask()
    # (values is laid out row by row, kept columns ascending: the order boolean indexing reads them in.)
    torch.testing.assert_close(got[keep], layer.values.grad.reshape(-1), rtol=1e-12, atol=1e-12)


def test_no_grad_evaluation_keeps_nothing_and_eval_mode_call_is_skipped():
    model = two_layer_model()
    hook = Dynamic2to4(model, every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        model(torch.randn(4, 20))
    with torch.inference_mode():
        model(torch.randn(4, 20))
    assert hook.pending_grads == {}
    model(torch.randn(4, 20))  # a graph freed without a backward leaves nothing either
    assert hook.pending_grads == {}
    with pytest.warns(RuntimeWarning, match="no backward pass reached the 2:4 layers"):
        assert hook(1, model, optimizer).skipped == "no backward"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert hook(2, model, optimizer).skipped == "no backward"
    model(torch.randn(4, 20)).sum().backward()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    result = hook(3, model, optimizer)
    assert result.skipped == "eval mode" and not result.repruned
    assert set(hook.pending_grads) == {"0", "1"}  # kept for the next training-mode call
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_remove_detaches_the_hooks():
    model = two_layer_model()
    hook = Dynamic2to4(model, every=1)
    out = model(torch.randn(4, 20))
    hook.remove()
    out.sum().backward()  # the gradient hook registered before remove() is a no-op
    model(torch.randn(4, 20)).sum().backward()
    assert hook.pending_grads == {}
    with pytest.raises(RuntimeError, match="removed"):
        hook(1, model, torch.optim.SGD(model.parameters(), lr=0.1))


# --------------------------------------------------------------------------- re-prune


def test_forced_reprune_mask_is_top2_of_shadow_and_values_are_the_shadow():
    layer = sparse(36, 10)
    torch.manual_seed(2)
    hook = Dynamic2to4(nn.Sequential(layer), every=3, dense_weights={"0": torch.randn(10, 36)})
    model = nn.Sequential(layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    old_mask, old_slots = layer.mask(), unpack_2to4_slots(layer.metadata, 36)
    for step in (1, 2, 3):
        model(torch.randn(6, 36)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 3:
            # What the re-prune must see: the SGD-updated pruned positions, the current values at kept ones.
            grad = hook.pending_grads["0"]
            shadow = torch.where(old_mask, layer.to_dense().detach(), hook.shadows["0"] - 0.05 * grad)
        result = hook(step, model, optimizer)
        assert result.repruned == (step == 3)
        if step < 3:
            assert torch.equal(layer.mask(), old_mask)
    expected_mask = nm_mask(shadow, 2, 4)
    assert torch.equal(hook.shadows["0"], shadow)
    assert torch.equal(layer.mask(), expected_mask)
    assert groups_keep_two(layer)
    check_2to4_metadata(layer.metadata, 36)
    assert torch.equal(layer.to_dense().detach(), torch.where(expected_mask, shadow, 0.0))
    changed = (unpack_2to4_slots(layer.metadata, 36) != old_slots).any(-1)
    assert result.changed_groups == int(changed.sum()) > 0 and result.total_groups == 10 * 9
    assert result.layers == {"0": result.changed_groups} and hook.history == [result]
    assert hook.changed_fraction == result.changed_groups / 90


def test_a_reprune_moves_the_version_counter_so_cached_weights_follow():
    # The dense and cuSPARSELt backends keep copies keyed on values' version; a re-prune
    # that wrote through .data would leave them serving the old weights.
    layer = sparse(36, 16)
    layer.backend = "dense"
    model = nn.Sequential(layer)
    hook = Dynamic2to4(model, every=1, dense_weights={"0": torch.randn(16, 36)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(4, 36)
    with torch.no_grad():
        model(x)  # fills the cache
    model(torch.randn(6, 36)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    version = layer.values._version
    assert hook(1, model, optimizer).changed_groups > 0
    assert layer.values._version > version
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(x, layer.to_dense(), layer.bias))


def test_exact_ties_keep_the_current_slots():
    # Row: |-0.5| (pruned, slot 0) ties with 0.5 (kept, slot 1). nm_mask would take the earlier slot 0.
    layer = SparseLinear.from_dense(nn.Linear(4, 1, bias=False), "2:4", backend="reference")
    weight = torch.tensor([[0.0, 0.5, 0.9, 0.0]])
    layer.set_weight_(weight, weight != 0)
    model = nn.Sequential(layer)
    hook = Dynamic2to4(model, every=1, dense_weights={"0": torch.tensor([[-0.5, 0.0, 0.0, 0.1]])})
    assert torch.equal(nm_mask(hook.shadows["0"]), torch.tensor([[True, False, True, False]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model(torch.randn(2, 4)).sum().backward()
    result = hook(1, model, optimizer)
    assert result.repruned and result.changed_groups == 0
    assert torch.equal(layer.mask(), weight != 0)


def test_input_modified_in_place_after_forward_raises():
    layer = sparse(16, 8)
    Dynamic2to4(nn.Sequential(layer), every=1)
    x = torch.randn(3, 16)
    y = layer(x)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="input of layer '0' was modified in place"):
        y.sum().backward()


def growing_pruned_weight_setup(every):
    """One row [0.9, 0.5, 0, 0 | ...]: a constant gradient -1 at (0, 2) makes the pruned weight grow by lr a step."""
    layer = SparseLinear.from_dense(nn.Linear(8, 1, bias=False), "2:4", backend="reference")
    weight = torch.tensor([[0.9, 0.5, 0.0, 0.0, 0.3, 0.0, -0.2, 0.0]])
    layer.set_weight_(weight, weight != 0)
    model = nn.Sequential(layer)
    hook = Dynamic2to4(model, every=every)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    x = torch.zeros(1, 8)
    x[0, 2] = 1.0  # only column 2 (pruned) sees an input: values get a zero gradient and do not move
    return layer, model, hook, optimizer, x


def test_pruned_weight_that_outgrows_a_kept_one_swaps_in_after_every_steps_not_before():
    layer, model, hook, optimizer, x = growing_pruned_weight_setup(every=4)
    values = layer.values
    kept_before = layer.mask().clone()
    for step in range(1, 5):
        optimizer.zero_grad()
        (-model(x).sum()).backward()
        optimizer.step()
        result = hook(step, model, optimizer)
        assert hook.shadows["0"][0, 2].item() == pytest.approx(0.3 * step)
        if step < 4:
            # From step 2 on |shadow[0, 2]| = 0.6 > 0.5, but no re-prune before step 4.
            assert not result.repruned and torch.equal(layer.mask(), kept_before)
    assert result.repruned and result.changed_groups == 1
    expected = kept_before.clone()
    expected[0, 1], expected[0, 2] = False, True
    assert torch.equal(layer.mask(), expected)
    assert layer.values is values  # the same Parameter object the optimizer holds
    assert torch.equal(layer.to_dense().detach(), torch.where(expected, hook.shadows["0"], 0.0))
    # The swapped-out weight keeps its value in the shadow.
    assert hook.shadows["0"][0, 1] == 0.5
    # The optimizer keeps stepping the same Parameter: now column 2 is kept and gets the gradient.
    before = values.detach().clone()
    optimizer.zero_grad()
    (-model(x).sum()).backward()
    optimizer.step()
    assert values.grad[0, 1] == -1.0 and values[0, 1] == before[0, 1] + 0.3
    assert optimizer.param_groups[0]["params"][0] is values


def hand_remap(state, old_slots, new_slots):
    """Expected optimizer state after a re-prune, by plain loops: a slot keeps the state of its column if the column was kept."""
    rows, groups, _ = old_slots.shape
    expected = torch.zeros_like(state)
    for r in range(rows):
        for g in range(groups):
            old = old_slots[r, g].tolist()
            for k, column in enumerate(new_slots[r, g].tolist()):
                if column in old:
                    expected[r, 2 * g + k] = state[r, 2 * g + old.index(column)]
    return expected


def test_optimizer_state_follows_columns_and_is_zero_for_new_ones():
    torch.manual_seed(3)
    layer = sparse(16, 6)
    model = nn.Sequential(layer)
    # Pruned weights 4x larger than typical kept ones: many groups change, in all the ways a group can.
    hook = Dynamic2to4(model, every=2, dense_weights={"0": 4 * torch.randn(6, 16)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in (1, 2):
        optimizer.zero_grad()
        model(torch.randn(5, 16)).square().mean().backward()
        optimizer.step()
        if step == 2:
            old_slots = unpack_2to4_slots(layer.metadata, 16)
            state = {k: v.clone() for k, v in optimizer.state[layer.values].items()}
            bias_state = {k: v.clone() for k, v in optimizer.state[layer.bias].items()}
            grad = layer.values.grad.clone()
        result = hook(step, model, optimizer)
    new_slots = unpack_2to4_slots(layer.metadata, 16)
    assert result.changed_groups > 0
    same_slot = (new_slots == old_slots).reshape(6, -1)
    new_column = ~(new_slots[..., :, None] == old_slots[..., None, :]).any(-1).reshape(6, -1)
    moved = ~same_slot & ~new_column  # a column still kept, in the other slot of its group
    assert same_slot.any() and new_column.any() and moved.any()
    after = optimizer.state[layer.values]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(after[key], hand_remap(state[key], old_slots, new_slots))
        assert torch.equal(after[key][same_slot], state[key][same_slot])  # untouched
        assert bool((after[key][new_column] == 0).all())
    assert torch.equal(after["step"], state["step"])
    assert torch.equal(layer.values.grad, hand_remap(grad, old_slots, new_slots))
    for key, value in bias_state.items():
        assert torch.equal(optimizer.state[layer.bias][key], value)


def test_without_a_reprune_the_hook_changes_nothing():
    torch.manual_seed(4)
    data = [(torch.randn(8, 20), torch.randn(8, 12)) for _ in range(6)]
    runs = []
    for with_hook in (False, True):
        model = two_layer_model(seed=5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        hook = Dynamic2to4(model, every=1000) if with_hook else None
        for step, (x, y) in enumerate(data, start=1):
            _, result = train_step(model, optimizer, hook, step, x, y)
            if hook is not None:
                assert not result.repruned and result.changed_groups == 0
        runs.append(model)
    for (name, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    x = torch.randn(3, 20)
    assert torch.equal(runs[0](x), runs[1](x))


def test_short_training_run_learns_and_stays_2to4():
    torch.manual_seed(6)
    teacher = nn.Sequential(nn.Linear(20, 36), nn.GELU(), nn.Linear(36, 12))
    model = two_layer_model(seed=7)
    hook = Dynamic2to4(model, every=3, pruned_lr_scale=50.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    values = [m.values for m in model]
    losses, changed = [], 0
    for step in range(1, 31):
        x = torch.randn(32, 20)
        with torch.no_grad():
            y = teacher(x)
        loss, result = train_step(model, optimizer, hook, step, x, y)
        losses.append(loss)
        changed += result.changed_groups
        assert result.repruned == (step % 3 == 0)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert changed > 0 and len(hook.history) == 10
    for layer, v in zip(model, values):
        assert layer.values is v and groups_keep_two(layer)
        check_2to4_metadata(layer.metadata, layer.in_features)
        keep = layer.mask()
        # Right after a call the kept shadow positions are the values, exactly.
        name = str(list(model).index(layer))
        assert torch.equal(hook.shadows[name][keep], layer.to_dense().detach()[keep])


def test_state_dict_round_trip_reproduces_the_next_reprune():
    torch.manual_seed(8)
    data = [(torch.randn(8, 20), torch.randn(8, 12)) for _ in range(8)]
    model = two_layer_model(seed=9)
    hook = Dynamic2to4(model, every=4, pruned_lr_scale=100.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in (1, 2):
        train_step(model, optimizer, hook, step, *data[step - 1])
    # Checkpoint mid-step: after the backward, before the optimizer step and the hook's call.
    optimizer.zero_grad()
    F.mse_loss(model(data[2][0]), data[2][1]).backward()
    saved = copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict(), "hook": hook.state_dict()})
    grads = [p.grad.clone() for p in model.parameters()]

    resumed = two_layer_model(seed=100)  # other weights and masks, overwritten by the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed_hook = Dynamic2to4(resumed, every=4, pruned_lr_scale=100.0)
    resumed_hook.load_state_dict(saved["hook"])
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_opt.load_state_dict(saved["opt"])
    for p, g in zip(resumed.parameters(), grads):
        p.grad = g.clone()

    results = []
    for m, opt, h in ((model, optimizer, hook), (resumed, resumed_opt, resumed_hook)):
        opt.step()
        out = [h(3, m, opt)]
        for step in range(4, 9):
            out.append(train_step(m, opt, h, step, *data[step - 1])[1])
        results.append(out)
    assert results[0] == results[1] and results[0][1].repruned and results[0][1].changed_groups > 0
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert all(torch.equal(hook.shadows[n], resumed_hook.shadows[n]) for n in hook.layer_names)
    assert resumed_hook.num_updates == hook.num_updates and resumed_hook.history == hook.history

    with pytest.raises(ValueError, match=r"state holds shadows for layers \['0', '1'\], this hook has \['0'\]"):
        Dynamic2to4(nn.Sequential(sparse(20, 36)), 4).load_state_dict(saved["hook"])


def test_fp16_values_fp32_shadow():
    torch.manual_seed(10)
    layer = sparse(16, 8, dtype=torch.float16)
    model = nn.Sequential(layer)
    hook = Dynamic2to4(model, every=2, dense_weights={"0": torch.randn(8, 16)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 16, dtype=torch.float16)
    for step in (1, 2):
        optimizer.zero_grad()
        model(x).float().square().mean().backward()
        grad = hook.pending_grads["0"]
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, dense_weight_grad(layer, x, torch.float32), rtol=1e-2, atol=1e-3)
        optimizer.step()
        result = hook(step, model, optimizer)
    shadow = hook.shadows["0"]
    assert shadow.dtype == torch.float32 and layer.values.dtype == torch.float16
    assert result.repruned and result.changed_groups > 0 and groups_keep_two(layer)
    keep = layer.mask()
    assert torch.equal(layer.to_dense().detach(), torch.where(keep, shadow, 0.0).half())


def dense_weight_grad(layer, x, dtype):
    """Autograd's gradient of mean(layer(x)^2) w.r.t. the dense weight [out, in], computed in dtype."""
    weight = layer.to_dense().detach().to(dtype).requires_grad_()
    F.linear(x.to(dtype), weight, layer.bias.detach().to(dtype)).square().mean().backward()
    return weight.grad


def test_grad_scaler_is_unscaled_and_skipped_steps_leave_the_shadow():
    layer = sparse(16, 8, dtype=torch.float64)
    model = nn.Sequential(layer)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    hook = Dynamic2to4(model, every=100, grad_scaler=scaler)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(4, 16, dtype=torch.float64)
    scaler.scale(model(x).square().mean()).backward()
    expected = dense_weight_grad(layer, x, torch.float64)
    torch.testing.assert_close(hook.pending_grads["0"], expected, rtol=1e-12, atol=1e-12)
    before = hook.shadows["0"].clone()
    scaler.step(optimizer)
    scaler.update()
    hook(1, model, optimizer)
    pruned = ~layer.mask()
    torch.testing.assert_close(hook.shadows["0"][pruned], before[pruned] - 0.5 * expected[pruned], rtol=1e-12, atol=1e-12)

    # An inf gradient in another parameter: the scaler skips the step (and lowers its scale); so does
    # the hook, although this layer's gradient is finite.
    other = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer.add_param_group({"params": [other]})
    for step, bad in ((2, other), (3, None)):
        before = hook.shadows["0"].clone()
        values = layer.values.detach().clone()
        optimizer.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if bad is not None:
            bad.grad = torch.full_like(bad, float("inf"))
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        assert (scaler.get_scale() < scale) == (bad is not None)
        assert torch.equal(layer.values.detach(), values) == (bad is not None)
        hook(step, model, optimizer)
        assert torch.equal(hook.shadows["0"], before) == (bad is not None)


# --------------------------------------------------------------------------- torch.compile, DDP


def test_compiled_model_accumulates_the_same_gradient_and_sees_the_reprune():
    x = torch.randn(5, 20)
    grads = []
    for compiled in (False, True):
        model = two_layer_model(seed=11)
        hook = Dynamic2to4(model, every=1, dense_weights={"0": 5 * torch.randn(36, 20)})
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        forward(x).square().mean().backward()
        grads.append(dict(hook.pending_grads))
    assert set(grads[1]) == {"0", "1"}
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])
    # The compiled graph reads the rewritten values and metadata (in place, same shapes).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    optimizer.step()
    assert hook(1, forward, optimizer).changed_groups > 0
    assert torch.equal(forward(x), model(x))


def test_hooks_added_after_compiling_are_not_run_and_the_masks_stay_fixed():
    # Whether dynamo reuses a hook-less graph depends on its cache (a graph compiled with hooks by an
    # earlier test is picked up by the guards): start from an empty one.
    torch._dynamo.reset()
    model = two_layer_model(seed=12)
    forward = torch.compile(model, backend="aot_eager")
    x = torch.randn(5, 20)
    forward(x).sum().backward()
    hook = Dynamic2to4(model, every=1, dense_weights={"0": 5 * torch.randn(36, 20)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    masks = [layer.mask() for layer in model]
    forward(x).sum().backward()
    optimizer.step()
    with pytest.warns(RuntimeWarning, match="torch.compile"):
        result = hook(1, forward, optimizer)
    assert result.skipped == "no backward" and not result.repruned
    assert all(torch.equal(layer.mask(), mask) for layer, mask in zip(model, masks))


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.Sequential(sparse(16, 8, seed=0))
        hook = Dynamic2to4(model, every=2, dense_weights={"0": torch.randn(8, 16, generator=torch.Generator().manual_seed(0))})
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in (1, 2):
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(100 * step + rank))  # different data per rank
            optimizer.zero_grad()
            ddp(x).square().mean().backward()
            optimizer.step()
            hook(step, ddp, optimizer)
        torch.save({"shadow": hook.shadows["0"], "metadata": model[0].metadata, "values": model[0].values.detach()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_reprune_identically_from_the_averaged_gradient(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    # fork: no fresh interpreter to import torch into (spawn takes ~10 s); CPU only, nothing that fork breaks.
    context = mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP workers did not finish within 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ("shadow", "metadata", "values"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key

    # The same two steps in one process on both ranks' data (the DDP gradient is the mean).
    model = nn.Sequential(sparse(16, 8, seed=0))
    hook = Dynamic2to4(model, every=2, dense_weights={"0": torch.randn(8, 16, generator=torch.Generator().manual_seed(0))})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (1, 2):
        xs = [torch.randn(4, 16, generator=torch.Generator().manual_seed(100 * step + r)) for r in range(2)]
        optimizer.zero_grad()
        (sum(model(x).square().mean() for x in xs) / 2).backward()
        optimizer.step()
        hook(step, model, optimizer)
    assert torch.equal(model[0].metadata, ranks[0]["metadata"])
    torch.testing.assert_close(hook.shadows["0"], ranks[0]["shadow"])
