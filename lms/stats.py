"""Counters of one ``lms.enable`` call, and their short report.

# NOTE [Stats cover all paging]
# 1. One ``Stats`` per runtime counts every byte LMS moves: saved activations
#    (lms/activations.py) and, with weight paging, parameters, gradients and
#    optimizer state (lms/weights.py). Pagers add to the same fields; no pager
#    grows its own copy of a counter.
# 2. ``swap_outs``/``swapped_out_bytes`` count device-to-host copies issued;
#    ``swap_ins``/``swapped_in_bytes`` count host-to-device copies issued.
#    ``recasts``/``recast_bytes`` count parameter casts made again in backward
#    instead of being kept or copied (NOTE [Activation swapping] Rule 10): bytes
#    that did not cross the link.
# 3. ``peak_resident_bytes`` is LMS's own accounting (the memory budget's peak,
#    see NOTE [Memory budget] in lms/runtime.py); ``peak_device_bytes`` is the
#    allocator's peak (CUDA only), which also sees weights, gradients and
#    temporaries that LMS does not manage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import format_bytes

__all__ = ["Stats"]


@dataclass
class Stats:
    """What LMS moved and held, since ``enable`` (or the last ``reset_stats``).

    Attributes:
        swapped_out_bytes: bytes copied device -> host.
        swapped_in_bytes: bytes copied host -> device.
        swap_outs: number of device -> host copies.
        swap_ins: number of host -> device copies.
        recasts: saved low-precision casts of parameters (autocast's) that LMS
            dropped under the limit and cast again from the parameter in backward,
            with no copy either way.
        recast_bytes: the bytes of those casts.
        peak_resident_bytes: most bytes LMS kept resident on the device at once, by
            its own accounting (saved activations, plus paged weight state when
            weight paging is on), not counting bytes already being copied out.
        peak_device_bytes: the allocator's peak (``torch.cuda.max_memory_allocated``)
            on CUDA; ``None`` on the CPU.
        largest_saved_bytes: the largest saved activation at least ``min_size`` that LMS
            has seen since ``enable`` (kept by ``reset_stats``). On CUDA LMS keeps this
            much of the limit free for temporaries it cannot move, so the allocator's
            peak is aimed at ``limit`` plus about this much.
        stall_s: seconds compute waited for a copy. On CUDA: device-side waits,
            timed with events around each wait that was still pending when issued,
            plus host time blocked on a copy out when copies in flight had to be
            bounded (the link is the bottleneck then). On the CPU, where copies are
            synchronous, the time spent copying.
        pinned_allocs: host buffers the pool allocated (pinned where an accelerator
            exists); zero in steady state, because the pool is reused.
        host_bytes: host bytes the pool holds now (in use or cached for reuse).
        resident_bytes: bytes LMS accounts as resident on the device now.
        limit_bytes: the device memory budget in bytes.

    Example:
        >>> s = Stats(swapped_out_bytes=2**30)
        >>> s.swapped_out_bytes
        1073741824
    """

    swapped_out_bytes: int = 0
    swapped_in_bytes: int = 0
    swap_outs: int = 0
    swap_ins: int = 0
    recasts: int = 0
    recast_bytes: int = 0
    peak_resident_bytes: int = 0
    peak_device_bytes: int | None = None
    largest_saved_bytes: int = 0
    stall_s: float = 0.0
    pinned_allocs: int = 0
    host_bytes: int = 0
    resident_bytes: int = 0
    limit_bytes: int = 0

    def as_dict(self) -> dict:
        """The fields as a plain dict (for JSON output)."""
        return asdict(self)

    def summary(self) -> str:
        """A few human-readable lines: limit, peaks, bytes moved, stalls, pool."""
        return "\n".join(
            [
                f"limit            {format_bytes(self.limit_bytes)}",
                f"peak resident    {format_bytes(self.peak_resident_bytes)} (LMS accounting)",
                f"peak device      {format_bytes(self.peak_device_bytes)} (allocator)",
                f"swapped out      {format_bytes(self.swapped_out_bytes)} ({self.swap_outs})",
                f"swapped in       {format_bytes(self.swapped_in_bytes)} ({self.swap_ins})",
                f"re-cast          {format_bytes(self.recast_bytes)} ({self.recasts})",
                f"stall            {self.stall_s * 1e3:.1f} ms",
                f"host pool        {format_bytes(self.host_bytes)} ({self.pinned_allocs} allocs)",
            ]
        )
