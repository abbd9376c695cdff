"""Helpers for the weight-paging tests: a model and its copy, and paging that must engage.

Test modules in this directory import it by plain name, as they do ``failing_backward``.
"""

import copy

import torch

import lms


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
