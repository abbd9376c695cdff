"""Weight paging over parameters of unusual kinds: wrapped data, other memory layouts.

A parameter whose data is a tensor subclass (a wrapper such as DTensor or a quantized
tensor keeps its values in inner tensors) has no single dense storage to resize and
copy: it stays resident (NOTE [Weight paging plan] Rule 2). A parameter laid out
densely in another order (``channels_last``, a transposed weight) keeps that layout
while paged (``paged_strides`` in lms/weights_grads.py).
"""

import pytest
import torch
from paged_twins import MLP, twins
from torch import nn
from torch.testing._internal.two_tensor import TwoTensor

import lms
from lms.config import LMSConfig
from lms.runtime import Runtime
from lms.weights import attach_weight_paging
from lms.weights_param import Phase
from lms.weights_plan import ParamInfo, plan_weights
from lms.weights_torch import movable


def wrapped_first_layer():
    model = MLP()
    w = model.layers[0].weight.detach()
    model.layers[0].weight = nn.Parameter(TwoTensor(w.clone(), w.clone()))
    return model


def train_both(base, paged, steps=3):
    """The same SGD steps on both models (fused: one kernel for wrapped and plain data)."""
    xs = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(steps)]
    for model in (base, paged):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
        for x in xs:
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()


def test_the_plan_never_pages_an_unmovable_parameter():
    params = [ParamInfo("wrapped", 1000, movable=False), ParamInfo("plain", 1000)]
    assert plan_weights(params, limit=0, min_size=0, mode=True).paged == {"plain"}
    assert plan_weights(params, limit=100, min_size=0).paged == {"plain"}


def test_a_wrapper_subclass_parameter_stays_resident_and_training_is_unchanged():
    # Was: paged like the others, and all four parameters differed from plain PyTorch
    # after three SGD steps.
    base, paged = twins(wrapped_first_layer)
    assert not movable(paged.layers[0].weight) and movable(paged.layers[1].weight)
    handle = attach_weight_paging(
        paged, Runtime(torch.device("cpu"), LMSConfig(limit=0, min_size=0, weights=True))
    )
    assert "layers.0.weight" not in handle.paged_names and "layers.1.weight" in handle.paged_names
    train_both(base, paged)
    for (name, a), b in zip(base.named_parameters(), paged.parameters()):
        assert type(a) is type(b) and torch.equal(a.detach(), b.detach()), name
    handle.remove()


@pytest.mark.parametrize("weights", [True, False])
def test_lms_enable_on_a_model_with_a_wrapper_subclass_parameter_matches(weights):
    # Was: RuntimeError "Attempted to access the data pointer on an invalid python
    # storage" at the first forward, from the activation path's list of parameter
    # storages (a wrapper subclass has none of its own).
    base, paged = twins(wrapped_first_layer)
    handle = lms.enable(paged, limit=0, min_size=0, weights=weights)
    train_both(base, paged)
    for (name, a), b in zip(base.named_parameters(), paged.parameters()):
        assert type(a) is type(b) and torch.equal(a.detach(), b.detach()), name
    assert handle.stats().swap_outs > 0  # the plain activations still moved
    handle.remove()


class ConvNet(nn.Module):
    """Convolutions in ``channels_last`` and a head whose weight is stored transposed."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.head_t = nn.Parameter(torch.randn(4, 32).t())  # (32, 4), strides (1, 32)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return h.mean((2, 3)) @ self.head_t


def test_channels_last_and_transposed_parameters_keep_their_layout_while_paged():
    # Was: masters, shells and gradients were made contiguous, so a channels_last
    # model's convolutions ran on contiguous weights (another kernel on a GPU), and
    # remove() handed back contiguous parameters.
    def make():
        return ConvNet().to(memory_format=torch.channels_last)

    base, paged = twins(make)
    strides = {n: p.stride() for n, p in base.named_parameters()}
    assert strides["c1.weight"] != base.c1.weight.contiguous().stride()
    handle = attach_weight_paging(
        paged, Runtime(torch.device("cpu"), LMSConfig(limit=0, min_size=0, weights=True))
    )
    assert {"c1.weight", "head_t"} <= set(handle.paged_names)
    seen = []
    paged.c1.register_forward_hook(lambda m, a, o: seen.append(m.weight.stride()))
    xs = [torch.randn(4, 8, 8, 8).to(memory_format=torch.channels_last) for _ in range(3)]
    for model in (base, paged):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        for x in xs:
            model(x).pow(2).sum().backward()
            opt.step()
    assert handle.phase is Phase.HOST
    assert seen == [strides["c1.weight"]] * 3  # the shell, as the convolution saw it
    for (name, a), b in zip(base.named_parameters(), paged.parameters()):
        assert b.stride() == strides[name] and b.grad.stride() == a.grad.stride(), name
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad), name
    handle.remove()
    assert {n: p.stride() for n, p in paged.named_parameters()} == strides
