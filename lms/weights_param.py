"""One paged parameter's state: where its data points, and where its shell's storage is.

Plain records that the pager (lms/weights.py) and its gradient side
(lms/weights_backward.py) update; the rules they follow are NOTE [Weight paging]
in lms/weights.py.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

from .pool import HostBlock
from .transfer import Copy
from .weights_grads import typed_view
from .weights_guard import guardable

__all__ = ["PagedParam", "Phase", "Residency", "Where"]


class Phase(enum.Enum):
    """Where paged parameters point (NOTE [Weight paging] Rule 1)."""

    HOST = "host"
    DEVICE = "device"


class Where(enum.Enum):
    """State of one shell's storage."""

    OUT = "out"  # 0 bytes on the device
    FILLING = "filling"  # allocated, host-to-device copy in flight
    RESIDENT = "resident"  # filled, and the compute stream has waited for it


class PagedParam:
    """One paged parameter: its master, shell, accumulator and residency."""

    def __init__(
        self, name: str, param: nn.Parameter, master_block: HostBlock, shell: torch.Tensor
    ) -> None:
        self.name = name
        self.param = param
        self.nbytes = param.numel() * param.element_size()
        self.master_block = master_block
        self.master = typed_view(master_block, param)
        self.shell = shell
        self.where = Where.OUT
        self.fill: Copy | None = None
        self.fwd_users = 0  # forward modules using it now (Rule 4)
        self.owners = 0  # modules whose hooks fetch it and may cast it; 2+: tied (Rule 19)
        self.held = False  # needed by backward: only the grad hook or its end releases
        self.acc_block: HostBlock | None = None
        self.acc: torch.Tensor | None = None  # host gradient accumulator
        self.acc_valid = False  # whether acc holds a gradient (``.grad`` is not None)
        self.grad_taken = False  # _take_grad moved ``.grad`` aside in this DEVICE phase
        # Rule 18: the zero placeholder ``.grad`` shows once the gradient is sent, the
        # placeholder's version then, and whether it is shown now.
        self.stand_in: torch.Tensor | None = None
        self.stand_in_version = 0
        self.stand_in_shown = False
        self.armed = False  # its gradient hooks are installed (Rule 5)
        # Rule 17: the parameter's version when its shell was last filled, and whether
        # it was handed out through ``.data`` (whose writes bump no version) since.
        self.version = 0
        self.data_taken = False
        # NOTE [Guarded parameters] Rule 4: the class it has whenever it is not guarded.
        self.own_class = type(param)
        self.guardable = guardable(self.own_class)

    def storage(self) -> torch.UntypedStorage:
        return self.shell.untyped_storage()


class Residency:
    """Per-module residency, computed on demand for ``prefetch_targets``.

    As ``sizes``: bytes a module would still bring in. As ``skip``: whether all of
    its parameters are resident or in flight.
    """

    def __init__(
        self, module_params: list[list[PagedParam]], unneeded: frozenset[int] | set[int]
    ) -> None:
        self.module_params = module_params
        self.unneeded = unneeded  # modules whose backward reads no weight (Rule 11)

    def get(self, m: int, default: int = 0) -> int:
        return sum(pp.nbytes for pp in self.module_params[m] if pp.where is Where.OUT)

    def __contains__(self, m: object) -> bool:
        if m in self.unneeded:
            return True
        return all(pp.where is not Where.OUT for pp in self.module_params[m])  # type: ignore[index]
