"""Copy streams, and each copy as a (tensor, event) pair.

# NOTE [Copy ordering]
# 1. A device-to-host copy runs on the ``d2h`` stream, which first waits for the
#    compute stream (the source was just produced there) and for the host
#    block's previous user (NOTE [Host pool], rule 3).
# 2. A host-to-device copy allocates its destination on the compute stream (so
#    the caching allocator recycles it in compute order, with no
#    ``record_stream``), then runs on the ``h2d`` stream after waiting for the
#    compute stream (the recycled memory may still be read by queued kernels)
#    and for the block's last writer.
# 3. Every copy returns ``Copy(tensor, event)``. Whoever consumes ``tensor`` on
#    the compute stream first calls ``wait(copy)``: the *stream* waits on the
#    event, the host does not. Whoever frees the source of a device-to-host copy
#    first checks ``done(copy)``; memory is released only after its event.
# 4. On the CPU the streams and events are no-ops and copies complete
#    synchronously, so the same code paths run in CI.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch

from .errors import LMSError
from .pool import HostBlock
from .stats import Stats

__all__ = ["Copy", "Transfers", "device_module"]


class Copy(NamedTuple):
    """A tensor being written by a copy, with the event that marks the copy done."""

    tensor: torch.Tensor
    event: Any


class _DoneEvent:
    """Stand-in for an event on the CPU, where every copy is synchronous."""

    def record(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def _profiling() -> bool:
    """Whether a profiler runs: only then are copies labelled (``record_function``).

    Asked before each copy instead of always entering a context manager: a no-op one
    costs about half a microsecond per copy, two copies per swapped tensor.
    """
    return getattr(torch.autograd.profiler, "_is_profiler_enabled", True)


def device_module(device: torch.device) -> Any:
    """``torch.cuda`` for a CUDA device, ``torch.cpu`` for the CPU, and so on.

    Raises:
        LMSError: for a device type without such a module (``meta``) or one this
            process cannot use (``cuda`` without a GPU or a CUDA build of torch).
    """
    mod = getattr(torch, device.type, None)
    available = getattr(mod, "is_available", None)
    # Checked here, where every runtime starts, so that a bad ``device=`` is our error
    # at enable: otherwise torch.cuda's AssertionError ("Torch not compiled with CUDA
    # enabled") or an AttributeError for torch.meta came out of LMS's setup.
    if mod is None or (device.type != "cpu" and callable(available) and not available()):
        raise LMSError(
            f"LMS cannot compute on device {str(device)!r}: this process has no usable "
            f"{device.type} device; pass device= a device that exists here (or leave it "
            "out to use the parameters' device)"
        )
    return mod


class Transfers:
    """The copy streams of one device, and the copies between it and host blocks.

    Args:
        device: the compute device.
        stats: counters to charge (bytes and counts of copies, stall time).

    Example:
        >>> t = Transfers(torch.device("cpu"), Stats())
        >>> src = torch.arange(8, dtype=torch.uint8)
        >>> block = HostBlock(torch.empty(8, dtype=torch.uint8), 0)
        >>> _ = t.wait(t.to_host(src, block))
        >>> bool(t.wait(t.to_device(block, 8)).eq(src).all())
        True
    """

    def __init__(self, device: torch.device, stats: Stats) -> None:
        self.device = device
        self.stats = stats
        self.mod = device_module(device)
        self.is_cpu = device.type == "cpu"
        if self.is_cpu:
            self.d2h = self.h2d = torch.cpu.Stream()
        else:
            self.d2h = self.mod.Stream(device=device)
            self.h2d = self.mod.Stream(device=device)
        self._timings: list[tuple[Any, Any]] = []  # (before, after) events around stalls

    # -- events and streams -------------------------------------------------

    def current_stream(self) -> Any:
        return torch.cpu.current_stream() if self.is_cpu else self.mod.current_stream(self.device)

    def new_event(self, timing: bool = False) -> Any:
        if self.is_cpu:
            return _DoneEvent()
        return self.mod.Event(enable_timing=timing)

    def done(self, copy: Copy | None) -> bool:
        """Whether ``copy`` has finished (never blocks)."""
        return copy is None or copy.event.query()

    # -- copies -------------------------------------------------------------

    def copy_out(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Copy:
        """Copy device ``src`` into host ``dst`` on the d2h stream (Rule 1), counted.

        The copy starts once compute, and the event ``after`` if given, are done.
        """
        event = self._issue(self.d2h, dst, src, after)
        self.stats.swap_outs += 1
        self.stats.swapped_out_bytes += dst.nbytes
        return Copy(dst, event)

    def copy_in(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Copy:
        """Copy host ``src`` into device ``dst`` on the h2d stream (Rule 2), counted.

        ``dst`` is allocated by the caller on the compute stream; the copy starts once
        compute, and the event ``after`` if given, are done.
        """
        event = self._issue(self.h2d, dst, src, after)
        self.stats.swap_ins += 1
        self.stats.swapped_in_bytes += dst.nbytes
        return Copy(dst, event)

    def _issue(self, stream: Any, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        stream.wait_stream(self.current_stream())
        if after is not None:
            stream.wait_event(after)
        with self.mod.stream(stream):
            dst.copy_(src, non_blocking=not self.is_cpu)
            event = self.new_event()
            event.record(stream)
        return event

    def to_host(self, src: torch.Tensor, block: HostBlock) -> Copy:
        """Start copying the flat ``uint8`` device tensor ``src`` into ``block``."""
        if _profiling():
            with torch.profiler.record_function("lms::d2h"):
                return self._to_host(src, block)
        return self._to_host(src, block)

    def _to_host(self, src: torch.Tensor, block: HostBlock) -> Copy:
        start = time.perf_counter()
        copy = self.copy_out(block.view(src.numel()), src, after=block.last_event)
        if self.is_cpu:
            # Synchronous on the CPU: the forward pass waited for this copy.
            self.stats.stall_s += time.perf_counter() - start
        block.last_event = copy.event
        return copy

    def to_device(self, block: HostBlock, nbytes: int) -> Copy:
        """Start copying the first ``nbytes`` of ``block`` into a new device tensor."""
        if _profiling():
            with torch.profiler.record_function("lms::h2d"):
                return self._to_device(block, nbytes)
        return self._to_device(block, nbytes)

    def _to_device(self, block: HostBlock, nbytes: int) -> Copy:
        start = time.perf_counter()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=self.device)  # Rule 2
        copy = self.copy_in(dst, block.view(nbytes), after=block.last_event)
        if self.is_cpu:
            self.stats.stall_s += time.perf_counter() - start
        block.last_event = copy.event
        return copy

    def wait(self, copy: Copy) -> torch.Tensor:
        """Make the compute stream wait for ``copy``; returns its tensor (Rule 3)."""
        event = copy.event
        if self.is_cpu or event.query():
            # Already done: nothing to wait for (query never blocks).
            return copy.tensor
        stream = self.current_stream()
        before, after = self.new_event(timing=True), self.new_event(timing=True)
        before.record(stream)
        stream.wait_event(event)
        after.record(stream)
        self._timings.append((before, after))
        return copy.tensor

    def block_on(self, copy: Copy) -> None:
        """Block the host until ``copy`` is done, charging the wait as stall time."""
        if copy.event.query():
            return
        start = time.perf_counter()
        copy.event.synchronize()
        self.stats.stall_s += time.perf_counter() - start

    def collect_stalls(self, block: bool = False) -> None:
        """Add finished device-side stall measurements to ``stats.stall_s``."""
        pending = []
        for before, after in self._timings:
            if block:
                after.synchronize()
            if after.query():
                self.stats.stall_s += before.elapsed_time(after) / 1e3
            else:
                pending.append((before, after))
        self._timings = pending

    def synchronize(self) -> None:
        """Wait for both copy streams (used only when LMS is removed or drained)."""
        if not self.is_cpu:
            self.d2h.synchronize()
            self.h2d.synchronize()
        self.collect_stalls(block=True)
