"""Parameters weight paging cannot move stay resident (NOTE [Weight paging plan] Rule 2).

A parameter whose data is a tensor subclass (a wrapper such as DTensor or a quantized
tensor keeps its values in inner tensors) has no single dense storage to resize and
copy. Paged anyway, a model trained on silently wrong values.
"""

import torch
from paged_twins import MLP, twins
from torch import nn
from torch.testing._internal.two_tensor import TwoTensor

from lms.config import LMSConfig
from lms.runtime import Runtime
from lms.weights import attach_weight_paging
from lms.weights_plan import ParamInfo, plan_weights
from lms.weights_torch import movable


def wrapped_first_layer():
    model = MLP()
    w = model.layers[0].weight.detach()
    model.layers[0].weight = nn.Parameter(TwoTensor(w.clone(), w.clone()))
    return model


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
    xs = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for model in (base, paged):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
        for x in xs:
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(base.named_parameters(), paged.parameters()):
        assert type(a) is type(b), name
        assert torch.equal(a.detach(), b.detach()), name
    handle.remove()
