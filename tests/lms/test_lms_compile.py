"""LMS under torch.compile (NOTE [LMS under torch.compile] in lms/runtime.py).

The ``aot_eager`` backend keeps these fast: Dynamo's tracing and AOTAutograd's
handling of saved tensors, which is where LMS meets the compiler, are the same as
with inductor; only the kernels differ. (A CPU check with inductor gave the same
results: bitwise equal for activations, and the refusal for weights.)
"""

import copy

import pytest
import torch
from torch import nn

import lms

pytestmark = pytest.mark.filterwarnings("ignore")


def model_and_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.Tanh())
    return model, copy.deepcopy(model)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_activation_swapping_under_compile_is_bitwise_equal_to_compile_alone():
    model, base = model_and_copy()
    x = torch.randn(32, 64)
    torch.compile(base, backend="aot_eager")(x).square().sum().backward()
    with lms.enable(model, limit=0, min_size=0, weights=False) as handle:
        torch.compile(model, backend="aot_eager")(x).square().sum().backward()
        assert handle.stats().swap_outs > 0  # the compiled forward's saves went out
        assert handle.stats().swap_ins == handle.stats().swap_outs
    for a, b in zip(grads(base), grads(model)):
        assert torch.equal(a, b)


def test_weight_paging_under_compile_is_refused_and_eager_still_works():
    model, base = model_and_copy()
    x = torch.randn(32, 64)
    with lms.enable(model, limit="160KiB", min_size="32KiB", weights=True) as handle:
        assert handle.weights is not None and handle.weights.paged_names
        with pytest.raises(lms.LMSError, match="weight paging does not work under torch.compile"):
            torch.compile(model, backend="aot_eager")(x)
        torch._dynamo.reset()
        model(x).square().sum().backward()  # the refusal left nothing half-done
        base(x).square().sum().backward()
    for a, b in zip(grads(base), grads(model)):
        assert torch.equal(a, b)
