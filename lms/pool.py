"""The host memory pool that swapped tensors live in.

# NOTE [Host pool]
# 1. Allocating pinned memory costs about 0.44 ms per MiB (ANCHORS.md) and
#    serialises with the device, so it must never sit in the hot path. Blocks
#    are kept after use and handed out again: once the first step has run, the
#    same sizes come back every step and no allocation happens (``pinned_allocs``
#    stays flat).
# 2. Blocks are allocated at the size asked for (rounded up to ``ALIGN``), not to
#    a power of two, so host memory stays close to the bytes actually swapped.
#    A request reuses the smallest free block that fits within ``SLACK`` of it.
#    Cached blocks are bounded too: when a request misses, the largest cached
#    blocks are freed until the pool holds at most ``CACHE_FACTOR`` times the
#    most bytes ever in use at once. Without that bound, sizes that drift
#    (variable or growing sequence lengths) left every size ever swapped cached,
#    growing the pool to the cap (9x the bytes in use for random lengths, 140x
#    for growing ones in a simulation). Steady sizes never miss, so the bound
#    costs them nothing; two alternating shapes fit in 2x.
# 3. Each block remembers the event of the last copy that touched it. The pool
#    never waits on it; whoever writes the block next makes its stream wait on
#    that event first (lms/transfer.py), so reuse is ordered on the device
#    without a host synchronize.
# 4. ``cap`` bounds the bytes held. Before giving up, the pool frees cached
#    blocks; if the request still does not fit it raises ``LMSError``, long
#    before the machine would start swapping itself to death.
# 5. Memory is pinned only when an accelerator exists; on the CPU the same code
#    copies into ordinary buffers, so the logic is tested without a GPU.
# 6. On CUDA a block is ordinary host memory, an anonymous mapping of its own
#    registered with ``cudaHostRegister`` (``pin_pages``), not ``pin_memory=True``:
#    PyTorch's caching host allocator rounds every request up to a power of two
#    (up to 2x the RAM) and keeps freed blocks in its own cache, where neither
#    ``trim`` nor the cap could see them. The block's storage starts at the
#    registered address, so ``is_pinned()`` (which asks CUDA about the storage's
#    first byte) says True. Registration is undone when the block is freed. If
#    registering fails, the block falls back to ``pin_memory=True``.
# 7. Once the pool is closed (``lms`` removed), a released block is freed, not
#    cached: entries that outlive ``remove()`` (a backward after it) give their
#    host memory back as they die instead of leaving it in a pool nobody uses.
# 8. A block is released once, to the pool that handed it out. Anything else
#    raises ``LMSError`` and changes nothing: a second release would put the block
#    on the free list twice (two later requests would share one buffer, each
#    overwriting the other's swapped tensor), and a foreign block would corrupt
#    both pools' byte counts.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import mmap
import threading
import weakref
from typing import Any

import torch

from .config import format_bytes
from .errors import LMSError
from .stats import Stats

__all__ = ["HostBlock", "HostPool"]

ALIGN = 4096  # page granularity; also keeps every dtype's view aligned
SLACK = 1.25  # reuse a free block at most this much larger than the request
CACHE_FACTOR = 2  # hold at most this many times the peak bytes in use (rule 2)


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def pin_pages(size: int) -> torch.Tensor:
    """``size`` bytes of page-locked host memory, not rounded up (NOTE [Host pool], rule 6).

    Returns a flat ``uint8`` tensor over an anonymous mapping of its own (so that no
    other allocation shares a registered page), unregistered again when it is freed.
    """
    # A mapping of its own, not a page-aligned slice of a larger CPU tensor: that
    # storage's first byte would lie before the registered pages, and ``is_pinned()``,
    # which asks CUDA about the storage's first byte, would say False. A mapping is
    # page-aligned, and the tensor over it keeps it alive (unmapped with the storage).
    try:
        mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    except OSError as e:  # the pool reports a RuntimeError as the host running out
        raise RuntimeError(f"could not map {size} bytes: {e}") from e
    buf = torch.frombuffer(mem, dtype=torch.uint8)
    try:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(buf.data_ptr(), size, 0)
        ok = int(err) == 0
    except (AssertionError, AttributeError, RuntimeError, TypeError):
        ok = False
    if not ok:
        # A failed runtime call stays the thread's last CUDA error, and PyTorch's
        # check after the next kernel launch would raise it from an unrelated kernel
        # (the binding returns the error without clearing it). Launch one here and
        # consume it, then pin the usual (rounded) way.
        with contextlib.suppress(RuntimeError):
            torch.ones(1, device="cuda").add_(1)
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)
    # Runs when ``buf`` is collected, before its storage lets go of the mapping.
    weakref.finalize(buf, _unregister, buf.data_ptr())
    return buf


class HostBlock:
    """One host buffer of the pool.

    Attributes:
        buf: a flat ``uint8`` tensor of ``capacity`` bytes.
        capacity: bytes allocated.
        last_event: event of the last copy that read or wrote ``buf`` (or ``None``);
            the next writer's stream must wait on it (NOTE [Host pool], rule 3).
    """

    __slots__ = ("buf", "capacity", "last_event", "_id", "_owner", "_in_use")

    def __init__(self, buf: torch.Tensor, ident: int, owner: object = None) -> None:
        self.buf = buf
        self.capacity = buf.numel()
        self.last_event: Any = None
        self._id = ident
        # The pool's token (not the pool: a block must not keep its pool alive) and
        # whether the block is handed out; release checks both (rule 8).
        self._owner = owner
        self._in_use = False

    def view(self, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of the block as a ``uint8`` tensor."""
        return self.buf[:nbytes]


class HostPool:
    """Reusable host buffers with a cap on the bytes held.

    Args:
        cap: most bytes the pool may hold (in use plus cached).
        pin: allocate page-locked memory (only where an accelerator exists).
        stats: counters to charge (``pinned_allocs``, ``host_bytes``).

    Example:
        >>> pool = HostPool(cap=1 << 20, pin=False, stats=Stats())
        >>> b = pool.acquire(1000)
        >>> pool.release(b)
        >>> pool.acquire(1000) is b
        True
    """

    def __init__(self, cap: int, pin: bool, stats: Stats) -> None:
        self.cap = cap
        self.pin = pin
        self.stats = stats
        self.held_bytes = 0  # allocated, in use or cached
        self.in_use_bytes = 0
        self.peak_in_use_bytes = 0  # rule 2: what the cached blocks are bounded by
        self._free: list[tuple[int, int, HostBlock]] = []  # sorted by (capacity, id)
        self._ids = itertools.count()
        self.closed = False  # rule 7
        self._token = object()  # rule 8: marks the blocks this pool allocated
        self._lock = threading.RLock()  # reentrant: a GC-run finalizer may release a block

    def acquire(self, nbytes: int) -> HostBlock:
        """A block of at least ``nbytes``: a cached one if one fits, else a new one.

        Raises:
            LMSError: if holding a new block would exceed the cap, or the machine cannot
                allocate it; the pool is unchanged then, apart from freed cached blocks.
        """
        if nbytes < 0:
            raise LMSError(
                f"a host block of {nbytes} bytes was requested; this is a bug in LMS, "
                "please report it"
            )
        with self._lock:
            i = bisect.bisect_left(self._free, (nbytes, -1))
            if i < len(self._free) and self._free[i][0] <= nbytes * SLACK + ALIGN:
                block = self._free.pop(i)[2]
            else:
                block = self._allocate(nbytes)
            block._in_use = True
            self.in_use_bytes += block.capacity
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
            return block

    def release(self, block: HostBlock, event: Any = None) -> None:
        """Return ``block`` for reuse; ``event`` guards the copy still using it, if any.

        Raises:
            LMSError: if ``block`` is not handed out by this pool (rule 8).
        """
        with self._lock:
            if block._owner is not self._token:
                raise LMSError(
                    f"a host block of {format_bytes(block.capacity)} was released to a pool "
                    "that did not allocate it; this is a bug in LMS, please report it"
                )
            if not block._in_use:
                raise LMSError(
                    f"a host block of {format_bytes(block.capacity)} was released twice; "
                    "this is a bug in LMS, please report it"
                )
            block._in_use = False
            if event is not None:
                block.last_event = event
            self.in_use_bytes -= block.capacity
            if self.closed:  # rule 7: nobody will ask for it again
                if block.last_event is not None:
                    block.last_event.synchronize()  # a copy may still use it
                self.held_bytes -= block.capacity
                self.stats.host_bytes = self.held_bytes
                return
            bisect.insort(self._free, (block.capacity, block._id, block))

    def trim(self) -> int:
        """Free every cached block; returns the bytes freed."""
        with self._lock:
            return self._trim_locked()

    def _trim_locked(self, nbytes: int | None = None) -> int:
        """Free cached blocks, largest first, until ``nbytes`` are freed (all if ``None``)."""
        freed = 0
        while self._free and (nbytes is None or freed < nbytes):
            block = self._free.pop()[2]
            if block.last_event is not None:
                # The device may still be copying into or out of it.
                block.last_event.synchronize()
            freed += block.capacity
        self.held_bytes -= freed
        self.stats.host_bytes = self.held_bytes
        return freed

    def _allocate(self, nbytes: int) -> HostBlock:
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        bound = CACHE_FACTOR * max(self.peak_in_use_bytes, self.in_use_bytes + size)
        if self.held_bytes + size > bound:  # rule 2: this miss would outgrow the bound
            self._trim_locked(self.held_bytes + size - bound)
        if self.held_bytes + size > self.cap:
            self._trim_locked()
        if self.held_bytes + size > self.cap:
            raise LMSError(
                f"host memory cap reached: LMS holds {format_bytes(self.held_bytes)} of host "
                f"memory and needs {format_bytes(size)} more, over host_limit "
                f"{format_bytes(self.cap)}; raise host_limit (if the machine has the RAM), "
                "raise limit so that less is swapped, or use a smaller batch"
            )
        try:
            buf = pin_pages(size) if self.pin else torch.empty(size, dtype=torch.uint8)
        except RuntimeError as e:
            # The machine ran out before the cap did (other processes hold the RAM). Our
            # error, with advice; PyTorch's "can't allocate memory" would otherwise be
            # reported by the forward guard as the *device* running out.
            raise LMSError(
                f"could not allocate {format_bytes(size)} of host memory (LMS holds "
                f"{format_bytes(self.held_bytes)}, host_limit {format_bytes(self.cap)}): "
                "the machine has less free RAM than host_limit allows; lower host_limit to "
                "what it can spare, raise limit so that less is swapped, or use a smaller "
                f"batch. Original error: {e}"
            ) from e
        self.held_bytes += size
        self.stats.pinned_allocs += 1
        self.stats.host_bytes = self.held_bytes
        return HostBlock(buf, next(self._ids), self._token)

    def close(self) -> None:
        """Drop every cached block; blocks in use are freed when released (rule 7)."""
        with self._lock:
            self.closed = True
            self._trim_locked()
