"""An autograd Function whose backward raises on demand, for tests of failed backwards.

Test modules in this directory import it by plain name, as they do ``recording_streams``.
"""

import torch


class FailsInBackward(torch.autograd.Function):
    """The identity in forward; backward raises ``ValueError("backward failed")`` while
    ``FailsInBackward.fail`` is set (a custom Function, a hook or an OOM failing mid-way)."""

    fail = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if FailsInBackward.fail:
            raise ValueError("backward failed")
        return grad
