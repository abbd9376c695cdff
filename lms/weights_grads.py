"""Gradients of paged parameters on their way from the device into host accumulators.

The mechanism behind NOTE [Weight paging] Rule 5 (in lms/weights.py): a final device
gradient is copied out on the d2h stream, straight into the parameter's host
accumulator when that is empty, else into a staging block whose contents are added
to the accumulator once the copy's event has completed. The device gradient is
dropped only after that event (NOTE [Copy ordering] rule 3). Adds run on one helper
thread, so a large add does not hold up the autograd thread's kernel launches, and
one thread keeps the adds into one accumulator in issue order.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from .errors import LMSError
from .pool import HostBlock
from .transfer import Copy

if TYPE_CHECKING:
    from .weights_param import PagedParam

__all__ = ["STAGING_SLOTS", "GradOffload", "paged_strides", "typed_view"]

# Staging blocks for gradients added to their accumulator on the host: enough to
# keep copies and adds overlapping, allocated once (the largest parameter each).
STAGING_SLOTS = 4


def paged_strides(like: torch.Tensor) -> tuple[int, ...]:
    """The strides of every paged copy of ``like``: its own where it is dense, else contiguous.

    A parameter laid out densely in another order (``channels_last``, a transposed
    weight) keeps that layout in its master, shell and gradient buffers: kernels
    chosen by layout see what they see without LMS, and copies stay flat memcpys.
    Dense means no gaps and no overlap: each dimension's stride, smallest first,
    is the product of the sizes before it (dimensions of size 1 do not count).
    """
    dims = sorted((st, sz) for st, sz in zip(like.stride(), like.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            break
        expected *= sz
    else:
        return tuple(like.stride())
    contiguous, size = [], 1
    for sz in reversed(like.shape):
        contiguous.append(size)
        size *= max(sz, 1)
    return tuple(reversed(contiguous))


def typed_view(block: HostBlock, like: torch.Tensor) -> torch.Tensor:
    """The first bytes of ``block`` as a tensor shaped like ``like``, with ``paged_strides``."""
    nbytes = like.numel() * like.element_size()
    return block.view(nbytes).view(like.dtype).as_strided(like.shape, paged_strides(like))


class _GradCopy:
    """A gradient on its way to host: the device tensor is kept until ``event``."""

    __slots__ = ("pp", "grad", "event", "tmp", "slot")

    def __init__(
        self,
        pp: PagedParam,
        grad: torch.Tensor,
        event: Any,
        tmp: torch.Tensor | None,
        slot: _Slot | None,
    ) -> None:
        self.pp, self.grad, self.event = pp, grad, event
        self.tmp, self.slot = tmp, slot


class _Slot:
    """A staging block for a gradient that is added to its accumulator on the host.

    Reused in a ring (``STAGING_SLOTS``), so accumulation allocates host memory once
    and no more: a slot is handed out again only after its copy and its add are done.
    """

    __slots__ = ("block", "copy", "add")

    def __init__(self, block: HostBlock) -> None:
        self.block = block
        self.copy: _GradCopy | None = None  # copy into it, not yet reaped
        self.add: Future | None = None  # its add on the adder thread


class GradOffload:
    """Moves final device gradients into the host accumulators of paged parameters.

    Args:
        runtime: the ``lms.runtime.Runtime`` (transfers, host pool, budget).
        slot_bytes: size of a staging block: the largest paged parameter's bytes.

    The caller holds the runtime's lock around every call.
    """

    def __init__(self, runtime: Any, slot_bytes: int) -> None:
        self.rt = runtime
        self.slot_bytes = slot_bytes
        self.pending: list[_GradCopy] = []  # copies whose event has not been seen done
        self._slots: list[_Slot] = []  # allocated on the first accumulation
        self._next_slot = 0
        self._adder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lms-weights-acc")
        self._adds: list[Future] = []

    def send(self, pp: PagedParam) -> None:
        """Start copying ``pp.param.grad`` to the host and set ``.grad`` to None."""
        p = pp.param
        grad = p.grad
        if grad is None:
            return
        if pp.acc is None:
            raise LMSError(f"parameter {pp.name!r} got a gradient but was frozen at enable")
        tmp = slot = None
        if pp.acc_valid:
            slot = self._free_slot()
            tmp = typed_view(slot.block, p)
            dst = tmp
        else:
            dst = pp.acc
            pp.acc_valid = True
        with torch.profiler.record_function("lms::weights::grad_d2h"):
            # Sent straight out: never counted as kept (NOTE [Memory budget] Rule 4).
            self.rt.budget.charge(pp.nbytes, leaving=True)
            event = self.rt.transfers.copy_out(dst, grad).event
        p.grad = None
        gc = _GradCopy(pp, grad, event, tmp, slot)
        if slot is not None:
            slot.copy = gc
        self.pending.append(gc)
        self.reap(block=False)

    def fold(self, pp: PagedParam) -> None:
        """Add the host-accumulated gradient into the device ``.grad`` (Rule 8).

        ``new + old`` on the device is the same single add AccumulateGrad would have
        done (``old + new``), so a reducer sees bitwise the gradient it sees without
        LMS; the accumulator is then overwritten by the next :meth:`send`.
        """
        tr = self.rt.transfers
        grad = pp.param.grad
        self.reap(block=True)  # the accumulator must hold every earlier add
        with torch.profiler.record_function("lms::weights::fold_h2d"):
            old = tr.copy_in(torch.empty_like(grad), pp.acc)  # allocated on compute
        with torch.no_grad():
            grad.add_(tr.wait(old))
        pp.acc_valid = False

    def reap(self, block: bool) -> None:
        """Finish the copies that are done (all of them, and their adds, if ``block``)."""
        keep = []
        for gc in self.pending:
            if block:
                self.rt.transfers.block_on(Copy(gc.grad, gc.event))
            elif not gc.event.query():
                keep.append(gc)
                continue
            if gc.slot is not None:
                gc.slot.copy = None
                gc.slot.add = self._adder.submit(_add_on_host, gc)
                self._adds.append(gc.slot.add)
            self.rt.budget.release(gc.pp.nbytes, leaving=True)
        self.pending = keep
        if block:
            adds, self._adds = self._adds, []
            for f in adds:
                f.result()  # re-raises the first error of an add

    def close(self) -> None:
        """Finish everything in flight, give the staging blocks back, stop the thread."""
        self.reap(block=True)
        for slot in self._slots:
            self.rt.pool.release(slot.block)
        self._slots.clear()
        self._adder.shutdown(wait=True)

    def _free_slot(self) -> _Slot:
        """The next staging slot, once its previous copy and add are done."""
        if not self._slots:
            pool = self.rt.pool
            self._slots = [_Slot(pool.acquire(self.slot_bytes)) for _ in range(STAGING_SLOTS)]
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        if slot.copy is not None:
            self.rt.transfers.block_on(Copy(slot.copy.grad, slot.copy.event))
            self.reap(block=False)  # submits its add
        if slot.add is not None:
            slot.add.result()
            slot.add = None
        return slot


def _add_on_host(gc: _GradCopy) -> None:
    """On the adder thread: accumulate one copied gradient (Rule 5)."""
    with torch.no_grad():
        gc.pp.acc.add_(gc.tmp)  # the add AccumulateGrad would have done
