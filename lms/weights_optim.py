"""The optimizer side of weight paging: the user's optimizer steps paged parameters on the host.

# NOTE [Host optimizer step]
# 1. Where the step runs. The user's own ``torch.optim`` optimizer steps the host
#    masters of paged parameters between backward and the next forward (NOTE
#    [Weight paging] Rule 1); its state is created on the host next to them and
#    never visits the device. Resident parameters step on the device as usual:
#    ``torch.optim`` groups tensors by device.
# 2. Why there, from measurements. On this repository's CI machine (2 cores, 32M
#    fp32 parameters, AdamW) the host step ran at 0.27 Gparam/s with the default
#    for-loop, 0.17 with ``foreach=True`` and 1.42 with ``fused=True`` (the CPU
#    fused kernel of torch >= 2.4, the analogue of DeepSpeed's vectorized CPU
#    Adam). A device step would move 28 B per parameter over the link (parameter,
#    gradient and two moments in; parameter and moments out): about 2-3 Gparam/s
#    at the ANCHORS' ~50 GB/s per direction with both directions overlapped, and
#    it needs device memory for the working set. The fused host step is in the
#    same range on two cores, grows with host cores, and costs no link time and no
#    device memory, so the step runs on the host. Not yet measured on the GPU
#    machine: benchmarks/model_size.py reports the optimizer time apart.
# 3. Advice, once. Stepping paged parameters without ``fused=True`` works but is
#    about 5x slower, so LMS warns once per optimizer that offers the option.
# 4. Optimizers made before ``lms.enable`` keep working: they hold the same
#    Parameter objects, and the first step after enable moves any state they
#    already keep on the device to the host, tensors in lists too (LBFGS's
#    history); ``remove()`` moves it back.
#    ``capturable=True`` needs device parameters and is refused with advice.
# 5. One device per LBFGS. ``torch.optim.LBFGS`` concatenates every gradient and
#    update into one flat vector, so its parameters must share a device; a mix of
#    paged (host) and resident (device) ones would fail inside ``torch.cat``, so it
#    is refused with advice instead. The other ``torch.optim`` rules group tensors
#    by device (Rule 1).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .errors import LMSError

__all__ = ["check_host_step", "move_state", "warn_if_unfused"]


def _groups_with(opt: torch.optim.Optimizer, paged: Mapping[int, Any]) -> list[dict]:
    return [g for g in opt.param_groups if any(id(p) in paged for p in g["params"])]


def check_host_step(opt: torch.optim.Optimizer, paged: Mapping[int, Any]) -> None:
    """Refuse settings that cannot step parameters on the host (Rules 4 and 5).

    Args:
        opt: the optimizer about to step.
        paged: ``id(param) -> anything`` for the paged parameters.

    Raises:
        LMSError: for a ``capturable=True`` group holding paged parameters, or an
            ``LBFGS`` whose parameters are on more than one device.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> check_host_step(torch.optim.SGD([p], lr=0.1), {id(p): None})
    """
    for group in _groups_with(opt, paged):
        if group.get("capturable"):
            raise LMSError(
                f"{type(opt).__name__}(capturable=True) cannot step parameters LMS keeps on "
                "the host; create the optimizer with capturable=False"
            )
    if isinstance(opt, torch.optim.LBFGS):
        # Called in phase HOST: paged parameters are on the host, resident ones not.
        devices = {p.device for g in opt.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise LMSError(
                f"LBFGS flattens all its parameters into one vector, but LMS pages some of "
                f"them to the host and keeps others on the device ({sorted(map(str, devices))}); "
                "page all of them (weights=True, min_size=0) or none (weights=False)"
            )


def _moved(v: Any, dev: torch.device, keep_scalars: bool) -> Any:
    if not isinstance(v, torch.Tensor) or v.device == dev:
        return v
    if keep_scalars and v.dim() == 0:
        return v
    return v.to(dev)


def move_state(
    opt: torch.optim.Optimizer,
    paged: Mapping[int, Any],
    target: Callable[[torch.Tensor], torch.device],
    to_host: bool,
) -> None:
    """Move ``opt``'s state of paged parameters to the host, or back (Rule 4).

    Args:
        opt: the optimizer.
        paged: ``id(param) -> anything`` for the paged parameters.
        target: the device a parameter's state belongs on.
        to_host: moving to the host (every tensor) or back to the device (scalars such
            as Adam's ``step`` stay on the CPU unless the group is fused or capturable,
            which is where ``torch.optim`` itself keeps them).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.ones(2)
        >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9); opt.step()
        >>> move_state(opt, {id(p): None}, lambda p: torch.device("cpu"), to_host=True)
    """
    for group in _groups_with(opt, paged):
        device_scalars = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = opt.state.get(p)
            if id(p) not in paged or not state:
                continue
            dev = target(p)
            keep_scalars = not to_host and not device_scalars
            for k, v in list(state.items()):
                # LBFGS keeps its history as lists of tensors ("old_dirs", "ro", ...).
                if isinstance(v, list):
                    state[k] = [_moved(t, dev, keep_scalars) for t in v]
                else:
                    state[k] = _moved(v, dev, keep_scalars)


def warn_if_unfused(opt: torch.optim.Optimizer, paged: Mapping[int, Any]) -> None:
    """Warn when paged parameters step without the fused host kernel (Rule 3).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> warn_if_unfused(torch.optim.AdamW([p], fused=True), {id(p): None})
    """
    slow = [g for g in _groups_with(opt, paged) if "fused" in g and not g.get("fused")]
    if slow:
        warnings.warn(
            f"{type(opt).__name__} steps LMS-paged parameters on the host without "
            "fused=True; pass fused=True (torch >= 2.4) for the vectorized host kernel "
            "(about 5x faster than the default in our CPU measurements, NOTE [Host "
            "optimizer step] in lms/weights_optim.py)",
            stacklevel=4,
        )
