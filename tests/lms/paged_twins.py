"""Helpers for the weight-paging tests: a small model, its copy, and paging that must engage.

Test modules in this directory import it by plain name, as they do ``failing_backward``.
"""

import copy

import torch
from torch import nn

import lms


class MLP(nn.Module):
    """Tanh layers and a head: every module pages its weight and bias at ``limit=0``."""

    def __init__(self, d=16, n=3, out=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.head = nn.Linear(d, out)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def twins(make, seed=0):
    """``make()`` under ``seed``, and a deep copy: one runs plain, the other under LMS."""
    torch.manual_seed(seed)
    base = make()
    return base, copy.deepcopy(base)


def enable_paging(model, limit=0, min_size=0):
    """``lms.enable`` with weight paging, checking that some parameter is really paged."""
    handle = lms.enable(model, limit=limit, min_size=min_size, weights=True)
    assert handle.weights is not None and handle.weights.paged_names
    return handle
