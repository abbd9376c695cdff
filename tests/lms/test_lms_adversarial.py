"""Adversarial checks: autograd corner cases that LMS must not get silently wrong.

Each test runs the same step with and without LMS and asserts bitwise equal
results, or, where PyTorch raises without LMS, the same error with it. Saved-
tensor hooks switch off some of autograd's own checks (the in-place version
check among them), so LMS has to keep those promises itself.
"""

import gc

import pytest
import torch
from torch import nn

import lms

# 0 sends everything out at once; 48 KiB keeps the newest few and evicts older ones
# later (copies taken after more of the forward has run); 1 GiB moves nothing.
LIMITS = [0, 48 * 1024, "1GiB"]
INPLACE_ERROR = "modified by an inplace operation"


@pytest.fixture(autouse=True)
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def same(want, got):
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def parity(make, step, limit, **kw):
    """Run ``step(model)`` on two equal models, without and with LMS; returns both results."""
    want_model, lms_model = make(), make()
    want = step(want_model)
    with lms.enable(lms_model, limit=limit, min_size=0, weights=False, **kw) as handle:
        got = step(lms_model)
        assert_clean_after_step(handle)
    return want, got, handle


def assert_clean_after_step(handle):
    gc.collect()
    assert handle.activations.live_entries() == 0
    assert handle.stats().resident_bytes == 0
    assert handle.runtime.pool.in_use_bytes == 0


class MLP(nn.Module):
    def __init__(self, width=64, depth=3):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def data(rows=64, width=64, seed=1):
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


# -- in-place modification of saved tensors ----------------------------------


class ModifiesSaved(nn.Module):
    """Saves a tensor (sigmoid saves its output), then modifies it in place."""

    def __init__(self, where):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 64)
        self.where = where

    def forward(self, x):
        h = torch.sigmoid(self.lin(x))
        if self.where == "forward":
            h.mul_(2)
        return h


@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("where", ["forward", "after"])
def test_inplace_on_a_saved_tensor_raises_as_without_lms(limit, where):
    # Saved-tensor hooks turn off autograd's version check; LMS must do it instead.
    for use_lms in (False, True):
        model = ModifiesSaved(where)
        handle = lms.enable(model, limit=limit, min_size=0, weights=False) if use_lms else None
        out = model(data())
        if where == "after":
            out.add_(1)  # the user modifies the returned (and saved) tensor
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            out.sum().backward()
        if handle is not None:
            del out
            assert_clean_after_step(handle)
            handle.remove()


@pytest.mark.parametrize("limit", LIMITS)
def test_inplace_under_no_grad_between_forward_and_backward_raises(limit):
    for use_lms in (False, True):
        model = ModifiesSaved("none")
        handle = lms.enable(model, limit=limit, min_size=0, weights=False) if use_lms else None
        out = model(data())
        with torch.no_grad():
            out.view(-1)[0] = 0.0  # through a view: one version counter for all views
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            out.sum().backward()
        if handle is not None:
            handle.remove()


class SaveModifySave(nn.Module):
    """One storage saved, modified in place, then saved again at its new version.

    The first save is only needed for ``aux``, which the loss never uses, so
    PyTorch does not complain; the second save must see the modified values.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        h = self.lin(x)
        aux = h * h  # saves h at version 0
        big = torch.tanh(self.lin(x))  # later tensors push h out under a small limit
        h.mul_(3)  # version 1
        out = h * self.lin.weight.sum()  # saves h again, at version 1
        return out + big, aux


@pytest.mark.parametrize("limit", LIMITS)
def test_a_storage_saved_again_after_an_inplace_change_uses_the_new_values(limit):
    def step(model):
        out, aux = model(data())
        out.sum().backward()
        return grads(model)

    want, got, _ = parity(SaveModifySave, step, limit)
    same(want, got)
