"""Autocast's saved weight casts are dropped and cast again, never copied.

NOTE [Activation swapping] Rule 10 and NOTE [Swap policy] Rule 5. The model is
small enough that every count is known: with an input that needs no gradient,
autocast saves exactly one weight cast, the second Linear's (512 x 256 bf16 =
256 KiB), and the activations around it.
"""

import pytest
import torch
from torch import nn

import lms

CAST_BYTES = 512 * 256 * 2


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))


def batch():
    return torch.randn(64, 256, generator=torch.Generator().manual_seed(1))


def step(model, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def assert_same_grads_with_lms(train, limit, weights=False):
    """Run ``train(model, x)`` without LMS, then with it; gradients must match bitwise.

    Returns the stats and the names of the parameters LMS paged.
    """
    model, x = mlp(), batch()
    train(model, x)
    want = grads(model)
    model.zero_grad(set_to_none=True)
    with lms.enable(model, limit=limit, min_size=0, weights=weights) as handle:
        train(model, x)
        s = handle.stats()
        paged = handle.weights.paged_names if handle.weights else []
    assert all(torch.equal(a, b) for a, b in zip(want, grads(model), strict=True))
    return s, paged


def test_limit_zero_recasts_the_weight_and_copies_only_activations():
    s, _ = assert_same_grads_with_lms(step, limit=0)
    assert (s.recasts, s.recast_bytes) == (1, CAST_BYTES)
    # What crossed is the activations only: the bf16 input of each Linear (64 x 256
    # and 64 x 512) and GELU's input (64 x 512); the weight's cast did not.
    assert s.swapped_out_bytes == 2 * (64 * 256 + 64 * 512 + 64 * 512)
    assert s.swapped_in_bytes == s.swapped_out_bytes


def test_casts_stay_resident_while_they_fit():
    model, x = mlp(), batch()
    with lms.enable(model, limit="1GiB", min_size=0, weights=False) as handle:
        step(model, x)
    s = handle.stats()
    assert (s.recasts, s.swap_outs) == (0, 0)


def test_casts_are_evicted_before_older_activations():
    # With an input that needs a gradient, both weights' casts are saved: x (32
    # KiB), W1's cast (256 KiB), GELU's input (64 KiB), Linear2's input (64 KiB),
    # W2's cast (256 KiB). Under 352 KiB, Linear2's input does not fit: by age
    # alone x would be copied out first (NOTE [Swap policy] Rule 1), but dropping
    # W1's cast is free and enough (Rule 5); W2's cast then does not fit and is
    # dropped at once. So the forward copies nothing.
    model, x = mlp(), batch().requires_grad_(True)
    step(model, x)
    want = [*grads(model), x.grad.clone()]
    model.zero_grad(set_to_none=True)
    x.grad = None
    limit = 352 * 1024
    with lms.enable(model, limit=limit, min_size=0, weights=False) as handle:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        after_forward = handle.stats()
        loss.backward()
        s = handle.stats()
    assert after_forward.swap_outs == 0
    assert after_forward.peak_resident_bytes <= limit
    assert (s.recasts, s.recast_bytes) == (2, 2 * CAST_BYTES)
    got = [*grads(model), x.grad]
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_parameter_changed_between_forward_and_backward_raises_and_recovers():
    model, x = mlp(), batch()
    with lms.enable(model, limit=0, min_size=0, weights=False) as handle:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        with torch.no_grad():
            model[2].weight.add_(1.0)  # an optimizer step before backward
        with pytest.raises(lms.LMSError, match="modified in place between forward and backward"):
            loss.backward()
        del loss
        model.zero_grad(set_to_none=True)
        step(model, x)  # the next step trains as usual
        assert handle.activations.live_entries() == 0
    got = grads(model)
    model.zero_grad(set_to_none=True)
    step(model, x)
    assert all(torch.equal(a, b) for a, b in zip(grads(model), got, strict=True))


def test_double_backward_through_a_recast_weight_matches():
    # A gradient penalty differentiates through the saved cast: the cast made
    # again must lead back to the parameter exactly like the one autocast saved.
    def penalised(model, x):
        x = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x).float().square().mean()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        (out + gx.square().sum()).backward()

    s, _ = assert_same_grads_with_lms(penalised, limit=0)
    assert s.recasts > 0


def test_paged_weights_casts_are_swapped_not_recast():
    # Paged shells are empty in backward (NOTE [Weight paging] Rule 11): their
    # casts are copied like any activation, and the result is still exact.
    s, paged = assert_same_grads_with_lms(step, limit=2 << 20, weights=True)
    assert "0.weight" in paged and "2.weight" in paged
    assert s.recasts == 0 and s.swap_outs > 0


def test_a_stale_cast_from_autocasts_cache_is_copied_not_recast():
    # Autocast caches a weight's cast for the whole autocast region, not per
    # forward: with the loop inside one region, step 2 reuses the cast of the
    # weights before step 1's optimizer step, and so its gradients do too.
    # Casting again from the updated parameter would give other values: the
    # stale cast must be copied like an activation (Rule 10).
    def loop_inside_autocast(model, x):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        got = []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(2):
                model(x).float().square().mean().backward()
                got += grads(model)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return got

    model, x = mlp(), batch()
    want = loop_inside_autocast(model, x)
    for limit in (0, 300 * 1024):
        model = mlp()
        with lms.enable(model, limit=limit, min_size=0, weights=False) as handle:
            got = loop_inside_autocast(model, x)
            assert handle.activations.live_entries() == 0
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        assert handle.stats().recasts == 1  # step 1's, fresh


def test_a_cast_made_before_its_parameter_changed_in_forward_is_copied_not_recast():
    # The first call makes and caches the cast without saving it (its input needs
    # no gradient); the weight then changes in place; the second call saves the
    # cached cast, of the old values.
    class UpdatedInForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(256, 256)

        def forward(self, x):
            h = torch.nn.functional.gelu(self.lin(x))
            with torch.no_grad():
                self.lin.weight.mul_(0.5)
            return self.lin(h)

    torch.manual_seed(0)
    model = UpdatedInForward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, batch())
    want = grads(model)
    for limit in (0, 300 * 1024):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        with lms.enable(model, limit=limit, min_size=0, weights=False) as handle:
            step(model, batch())
            assert handle.activations.live_entries() == 0
        assert all(torch.equal(a, b) for a, b in zip(want, grads(model), strict=True))
        assert handle.stats().recasts == 0


def test_a_cast_modified_in_place_before_it_is_saved_is_copied_not_recast():
    # A user's own cast, scaled in place under no_grad: its history still says
    # ToCopyBackward0, but its values are no longer a cast of the weight.
    class ScaledCast(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(256, 256))

        def forward(self, x):
            w = self.weight.to(torch.bfloat16)
            with torch.no_grad():
                w.mul_(2)
            return (x.bfloat16() @ w).relu() @ w

    def train(model, x):
        model(x).float().square().mean().backward()

    torch.manual_seed(0)
    model = ScaledCast()
    train(model, batch())
    want = grads(model)
    model.zero_grad(set_to_none=True)
    with lms.enable(model, limit=0, min_size=0, weights=False) as handle:
        train(model, batch())
        assert handle.activations.live_entries() == 0
    assert all(torch.equal(a, b) for a, b in zip(want, grads(model), strict=True))
    assert handle.stats().recasts == 0


def test_parameter_data_replaced_between_forward_and_backward_raises():
    # ``param.data = ...`` (also what model.half() does) bumps no version, but
    # the cast made again from the new data would not be the one autocast saved.
    model, x = mlp(), batch()
    with lms.enable(model, limit=0, min_size=0, weights=False) as handle:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        model[2].weight.data = model[2].weight.data * 0.5
        with pytest.raises(lms.LMSError, match="data replaced .* between forward and backward"):
            loss.backward()
        del loss
        assert handle.activations.live_entries() == 0
