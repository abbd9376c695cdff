"""What torch's modules and autograd do that weight paging relies on.

Each answer is a fact about a torch version or a module type, kept apart from the
pager (lms/weights.py) so that it is found, and revised with torch, in one place.
Rule numbers refer to NOTE [Weight paging] in lms/weights.py.
"""

from __future__ import annotations

import torch
from torch import nn

from .weights_param import PagedParam

__all__ = [
    "autocast_on",
    "backward_reads_weights",
    "borrowed_params",
    "casts_weights",
    "graph_task_id",
    "movable",
]


def backward_reads_weights(module: nn.Module, params: list[PagedParam], device_type: str) -> bool:
    """Whether a backward through this call of ``module`` may read its paged weights.

    NOTE [Weight paging] Rule 11. Only exact ``nn.Embedding`` (without ``max_norm``)
    and exact ``nn.Linear`` under autocast with fp32 weights say no; everything else
    is fetched.
    """
    kind = type(module)
    if kind is nn.Embedding and module.max_norm is None:
        return False  # the gradient of a lookup needs the indices, not the table
    if kind is nn.Linear and autocast_on(device_type):
        # Autocast runs F.linear in low precision on a cast of the weight; the cast
        # is what autograd saves, so backward never reads the fp32 weight itself.
        return any(pp.param.dtype != torch.float32 for pp in params)
    return True


def casts_weights(module: nn.Module) -> bool:
    """Whether ``module``'s forward may have autocast cast (and cache) its weights.

    NOTE [Weight paging] Rule 19. Only exact ``nn.Embedding`` says no: ``embedding``
    is on none of autocast's lists, so the lookup reads the table in its own dtype.
    """
    return type(module) is not nn.Embedding


def borrowed_params(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that ``module``'s own forward reads although a child module owns them.

    NOTE [Weight paging] Rule 3. ``nn.MultiheadAttention`` passes
    ``out_proj.weight`` and ``out_proj.bias`` to ``F.multi_head_attention_forward``
    and never calls ``out_proj`` (an ``nn.Linear``), so its own hooks fetch them.
    """
    if isinstance(module, nn.MultiheadAttention):
        return list(module.out_proj.parameters())
    return []


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (the per-device query is torch >= 2.4)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:
        return torch.is_autocast_enabled() if device_type == "cuda" else False


def graph_task_id() -> int:
    """Id of the running backward (-1 outside one; 0 where torch cannot tell)."""
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get() if get is not None else 0


def movable(param: nn.Parameter) -> bool:
    """Whether weight paging can move ``param``'s data (NOTE [Weight paging plan] Rule 2).

    Paging resizes one dense storage and copies it whole. A tensor subclass as the
    data (a wrapper such as DTensor or a quantized tensor, whose values live in
    inner tensors) or a sparse layout has no such storage.
    """
    return type(param.data) is torch.Tensor and param.layout is torch.strided
