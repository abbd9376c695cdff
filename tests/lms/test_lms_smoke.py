"""First check of the public face: GPT gradients are bitwise equal with LMS swapping everything."""

import torch

import lms
from examples.gpt import GPT, GPTConfig, synthetic_batch


def test_gpt_grads_bitwise_with_everything_swapped():
    cfg = GPTConfig()
    torch.manual_seed(0)
    model = GPT(cfg)
    x, y = synthetic_batch(cfg, 8, torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        model(x, y).backward()
        return [p.grad.clone() for p in model.parameters()]

    want = grads()
    with lms.enable(model, limit=0, min_size=0) as handle:
        got = grads()
    assert handle.stats().swap_outs > 0
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
