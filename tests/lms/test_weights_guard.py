"""Reads of paged parameters by code LMS does not hook (NOTE [Guarded parameters]).

Between a forward and the end of its backward a paged parameter's device storage is
released. Such reads used to crash the process (segmentation fault on the CPU); now
they fetch the parameter and must give exactly what plain PyTorch gives.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from paged_twins import MLP, enable_paging, twins
from torch import nn

from lms.weights_guard import guardable
from lms.weights_param import Phase, Where

pytestmark = pytest.mark.filterwarnings("ignore:.*without fused=True")

FETCHED = "LMS fetched paged parameter"


class ParentReads(nn.Module):
    """A parent whose forward reads its child's weight (a tied output head)."""

    def __init__(self, vocab=32, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def forward(self, idx):
        return torch.tanh(self.mix(self.emb(idx))) @ self.emb.weight.T


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 16, generator=g), torch.randint(4, (8,), generator=g)) for _ in range(n)
    ]


def assert_same(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def l2_step(model, opt, x, y):
    """A step with an explicit L2 penalty computed after the forward."""
    loss = F.cross_entropy(model(x), y)
    loss = loss + 1e-2 * sum(p.pow(2).sum() for p in model.parameters())
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def test_l2_penalty_over_parameters_between_forward_and_backward():
    # Was: a segmentation fault (the penalty read released device storage).
    base, paged = twins(MLP)
    handle = enable_paging(paged)
    losses = {}
    for name, model in (("base", base), ("paged", paged)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            losses[name] = [l2_step(model, opt, x, y) for x, y in data(3)]
        fetched = [w for w in seen if FETCHED in str(w.message)]
    assert all(torch.equal(a, b) for a, b in zip(losses["base"], losses["paged"]))
    assert_same(base, paged)
    assert len(fetched) == 1  # once per pager, at the user's line
    assert fetched[0].filename == __file__
    assert handle.weights.phase is Phase.HOST
    assert handle.runtime.budget.resident_bytes == 0


def test_reads_for_logging_give_the_real_values_and_training_is_unchanged():
    base, paged = twins(MLP)
    handle = enable_paging(paged)
    logged = {"base": [], "paged": []}
    for name, model in (("base", base), ("paged", paged)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in data(3):
            loss = F.cross_entropy(model(x), y)
            w = model.layers[1].weight
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                logged[name] += [w.norm(), w.detach().clone(), w.data[0].clone(), w[2, 3].item()]
                logged[name].append(repr(w))
            loss.backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(logged["base"], logged["paged"]):
        assert a == b if isinstance(a, (str, float)) else torch.equal(a, b)
    assert_same(base, paged)
    assert handle.runtime.budget.resident_bytes == 0


def test_metadata_reads_and_zero_grad_between_forward_and_backward_fetch_nothing():
    base, paged = twins(MLP)
    enable_paging(paged)
    w = paged.layers[0].weight
    for model in (base, paged):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = data(1)[0]
        loss = F.cross_entropy(model(x), y)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fetch would warn
            opt.zero_grad()
            p = model.layers[0].weight
            meta = (p.shape, p.dtype, p.device, p.requires_grad, p.is_leaf, p.grad, p.numel())
            assert meta[:2] == (torch.Size([16, 16]), torch.float32) and meta[5] is None
            assert torch.zeros_like(p).shape == p.shape
            assert torch.empty(256).view_as(p).shape == p.shape
            if model is paged:
                assert w.untyped_storage().nbytes() == 0  # still released
            torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        loss.backward()
        opt.step()
    assert_same(base, paged)


def test_the_guard_is_only_worn_while_the_storage_is_released():
    _, paged = twins(MLP)
    handle = enable_paging(paged)
    w = paged.layers[0].weight
    assert type(w) is nn.Parameter  # between steps: the master, always readable
    x, y = data(1)[0]
    loss = F.cross_entropy(paged(x), y)
    assert type(w) is not nn.Parameter and isinstance(w, nn.Parameter)
    with pytest.warns(UserWarning, match=FETCHED):
        w.sum()
    assert type(w) is nn.Parameter  # resident and held now
    assert w.untyped_storage().nbytes() == w.numel() * 4
    loss.backward()
    assert type(w) is nn.Parameter and handle.weights.phase is Phase.HOST
    F.cross_entropy(paged(x), y)  # a forward whose backward never comes
    handle.remove()
    assert all(type(p) is nn.Parameter for p in paged.parameters())


def test_deepcopy_and_state_dict_of_a_guarded_parameter():
    base, paged = twins(MLP)
    enable_paging(paged)
    x, y = data(1)[0]
    loss = F.cross_entropy(paged(x), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # state_dict reads the masters, fetches nothing
        sd = paged.state_dict()
        kept = paged.state_dict(keep_vars=True)
    assert all(torch.equal(sd[k], v) for k, v in base.state_dict().items())
    assert type(kept["layers.0.weight"]) is not nn.Parameter  # the parameter itself, guarded
    with pytest.warns(UserWarning, match=FETCHED):
        one = copy.deepcopy(paged.layers[2].weight)
    assert type(one) is nn.Parameter and torch.equal(one, base.layers[2].weight)
    loss.backward()


def test_a_parent_reading_its_childs_weight_without_declaring_it():
    # Was: "out of bounds for storage of size 0" (or a crash, depending on the op).
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(32, (8,), generator=g), torch.randint(32, (8,), generator=g))] * 3
    base, paged = twins(ParentReads)
    handle = enable_paging(paged)
    losses = {}
    for name, model in (("base", base), ("paged", paged)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[name] = []
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for x, y in batches:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses[name].append(loss.detach())
    assert any(FETCHED in str(w.message) for w in seen)
    assert all(torch.equal(a, b) for a, b in zip(losses["base"], losses["paged"]))
    assert_same(base, paged)
    assert handle.runtime.budget.resident_bytes == 0


def test_accumulation_with_a_penalty_after_each_forward():
    base, paged = twins(MLP)
    enable_paging(paged)
    for model in (base, paged):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for chunk in (data(2, seed=5), data(2, seed=6)):
            for x, y in chunk:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loss = F.cross_entropy(model(x), y) + 1e-2 * model.layers[0].weight.abs().sum()
                loss.backward()
            opt.step()
            opt.zero_grad()
    assert_same(base, paged)


def test_a_frozen_parameter_read_after_the_forward_is_released_by_the_backward():
    base, paged = twins(MLP)
    for model in (base, paged):
        model.layers[1].requires_grad_(False)
    handle = enable_paging(paged)
    for model in (base, paged):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        x, y = data(1)[0]
        loss = F.cross_entropy(model(x), y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = loss * model.layers[1].weight.mean().abs()
        loss.backward()
        opt.step()
    assert_same(base, paged)
    assert handle.weights.phase is Phase.HOST
    assert all(pp.where is Where.OUT for pp in handle.weights.paged)
    assert handle.runtime.budget.resident_bytes == 0


class Tagged(nn.Parameter):
    """A parameter subclass that only tags (as libraries mark shards or experts)."""


class Traced(nn.Parameter):
    """A parameter subclass with its own ``__torch_function__``: never guarded (Rule 4)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def tag(model):
    for layer in model.layers:
        layer.weight = Tagged(layer.weight.detach().clone())
    return model


def test_a_tagging_parameter_subclass_is_guarded_and_keeps_its_class():
    # Was: a segmentation fault, like a plain nn.Parameter before its guard (only exact
    # nn.Parameter was guarded).
    base, paged = twins(lambda: tag(MLP()))
    handle = enable_paging(paged)
    for model in (base, paged):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in data(3):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                l2_step(model, opt, x, y)
    assert_same(base, paged)
    assert all(type(layer.weight) is Tagged for layer in paged.layers)
    x, y = data(1)[0]
    loss = F.cross_entropy(paged(x), y)
    guarded = paged.layers[0].weight
    assert type(guarded) is not Tagged and isinstance(guarded, Tagged)  # wearing the guard
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        copied = copy.deepcopy(guarded)
    assert type(copied) is Tagged and torch.equal(copied, base.layers[0].weight)
    loss.backward()
    assert type(guarded) is Tagged
    assert handle.weights.phase is Phase.HOST
    assert guardable(Tagged) and not guardable(Traced)
