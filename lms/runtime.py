"""The per-``enable`` runtime: device, config, host pool, copy streams, stats and budget.

# NOTE [Memory budget]
# 1. One ``MemoryBudget`` per ``lms.enable`` call covers everything LMS keeps on
#    the device: saved activations (lms/activations.py) and, with weight paging,
#    parameters, gradients and optimizer state (lms/weights.py). Each pager
#    ``charge``s bytes when it makes them resident and ``release``s them when it
#    drops its last device reference.
# 2. Bytes whose device-to-host copy is in flight are still resident (the copy
#    reads them) but are already on their way out: a pager marks them with
#    ``leaving(n)`` when it issues the copy and ``release(n, leaving=True)`` when
#    the copy's event has completed. Decisions subtract leaving bytes, so one
#    overflow does not trigger a second round of evictions while copies run.
# 3. ``used_bytes`` is what the limit is compared with. On CUDA it is the
#    allocator's ``memory_allocated`` (the issue's contract: activations stay on
#    the device while the device's allocated memory is under the limit), which
#    also sees memory LMS does not manage. On the CPU it is LMS's own accounting,
#    so the policy is exercised exactly in CI.
# 4. ``excess(extra)`` is how many bytes must leave for ``extra`` more bytes to
#    fit; pagers evict until it is <= 0 (the choice of what to evict is pure
#    policy, lms/policy.py). ``peak_resident_bytes`` in Stats is the peak of
#    ``resident_bytes - leaving_bytes``: what LMS keeps on the device and is not
#    already copying out. A pager that must send a new tensor straight out
#    charges it with ``charge(n, leaving=True)``, so it never counts as kept.
#    (The allocator's peak, which does see copies in flight, is in Stats too.)
# 5. Where the allocator is measured, it also sees temporaries LMS cannot move:
#    the activation being computed, a gradient in backward. ``reserve`` keeps
#    that much of the limit free for them: decisions aim at ``limit - reserve``.
#    The activation swapper sets it to the largest tensor it has seen
#    (``note_tensor``), which is how the allocator's peak stays within about one
#    largest tensor of the limit. Without a measure (the CPU) it stays 0, so LMS's
#    own accounting obeys the limit exactly.
# 6. One budget, one eviction order. A pager that must bring bytes in now (a
#    paged module's weights before it runs) calls ``make_room(n)``: the budget
#    asks its evictors (the activation swapper) to send out what is needed
#    furthest in the future until ``n`` more fit. Without it the weights would be
#    charged on top of activations already filling the limit, and the limit
#    would hold for each pager but not for their sum.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .config import LMSConfig, format_bytes, physical_memory
from .errors import LMSError
from .pool import HostPool
from .stats import Stats
from .transfer import Transfers, device_module

__all__ = ["MemoryBudget", "ModelHook", "Runtime", "device_total_memory", "is_oom"]


class ModelHook:
    """A hook LMS puts on a model; a copy of it is a no-op.

    ``copy.deepcopy(model)`` (an EMA model, the best checkpoint) and pickling
    (``torch.save(model)``) copy the model's hook dicts. A bound method would copy
    its pager with it (locks, host pool, this model's budget); a ``ModelHook``
    copies to ``_Inert`` instead, so the copy comes without LMS
    (NOTE [Activation swapping] Rule 1, NOTE [Weight paging] Rule 12).
    """

    __slots__ = ("fn", "refuse_compile")

    def __init__(self, fn: Callable[..., Any], refuse_compile: str | None = None) -> None:
        self.fn = fn
        # NOTE [LMS under torch.compile]: the error to raise when traced, if any.
        self.refuse_compile = refuse_compile

    def __call__(self, *args: Any) -> Any:
        if self.refuse_compile is not None and torch.compiler.is_compiling():
            _refuse(self.refuse_compile)
        return _run_eagerly(self.fn, args)

    def __reduce__(self) -> tuple:
        return (_Inert, ())


# NOTE [LMS under torch.compile]
# 1. Every LMS module hook runs eagerly (``torch.compiler.disable``): hooks move
#    storages between streams and re-point ``.data``, side effects that a traced
#    graph would not replay. Dynamo breaks the graph at each hook instead.
# 2. Activation swapping then works under ``torch.compile``: AOTAutograd calls the
#    saved-tensor hooks on the tensors its compiled forward saves (on the CPU,
#    gradients were bitwise equal to the compiled model without LMS).
# 3. Weight paging does not: compiled code read a released (0-byte) parameter
#    storage and crashed the process in our CPU check. Its hooks carry
#    ``refuse_compile``; ``is_compiling()`` is a constant while Dynamo traces, so a
#    traced hook calls ``_refuse``, itself run eagerly, which raises ``LMSError``
#    when the compiled code reaches it, before any paged parameter is read.


@torch.compiler.disable
def _run_eagerly(fn: Callable[..., Any], args: tuple) -> Any:
    return fn(*args)


@torch.compiler.disable
def _refuse(message: str) -> None:
    raise LMSError(message)


class _Inert:
    """A copied ``ModelHook``: does nothing."""

    def __call__(self, *args: Any) -> None:
        return None


def device_total_memory(device: torch.device) -> int:
    """Bytes of memory on ``device`` (physical RAM for the CPU; 0 if unknown)."""
    if device.type == "cpu":
        return physical_memory()
    mod = device_module(device)
    try:
        return int(mod.get_device_properties(device).total_memory)
    except (AttributeError, RuntimeError):
        return 0


def allocated_bytes_reader(device: torch.device) -> Callable[[], int]:
    """A cheap reader of the caching allocator's current allocated bytes on ``device``.

    ``torch.cuda.memory_allocated`` builds, flattens and sorts the allocator's whole
    stats dict (about 130 entries) on every call, and the swap hooks ask several
    times per saved tensor (hundreds of times a step); the nested dict that
    ``memory_allocated`` itself starts from costs a fraction of that. Falls back to
    the public call where the private binding is missing.
    """
    read = getattr(torch._C, "_cuda_memoryStats", None)
    if read is None:
        return lambda: torch.cuda.memory_allocated(device)
    torch.cuda.init()  # the binding needs the allocator set up
    index = device.index
    return lambda: read(index)["allocated_bytes"]["all"]["current"]


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is the device allocator running out of memory."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    text = str(exc).lower()
    return isinstance(exc, oom) or "out of memory" in text or "can't allocate memory" in text


class MemoryBudget:
    """The device memory budget shared by every pager of one runtime.

    See NOTE [Memory budget].

    Args:
        limit: bytes of device memory LMS aims to stay under.
        stats: counters to update (``peak_resident_bytes``, ``resident_bytes``).
        measure: returns the device's allocated bytes, or ``None`` to use LMS's own
            accounting (the CPU).

    Example:
        >>> b = MemoryBudget(limit=100, stats=Stats())
        >>> b.charge(80)
        >>> b.excess(extra=30)
        10
        >>> b.release(80)
        >>> b.over_limit()
        False
    """

    def __init__(self, limit: int, stats: Stats, measure: Callable[[], int] | None = None) -> None:
        self.limit = limit
        self.stats = stats
        self.measure = measure
        self.resident_bytes = 0
        self.leaving_bytes = 0
        self.reserve = 0  # Rule 5
        self.largest = 0  # the largest swappable tensor noted, ever (Stats.largest_saved_bytes)
        # Rule 6. An OrderedDict: RemovableHandle keeps a weak reference to it.
        self._evictors: OrderedDict[int, Callable[[int], None]] = OrderedDict()
        self._lock = threading.RLock()

    def charge(self, nbytes: int, leaving: bool = False) -> None:
        """Account ``nbytes`` more as resident (``leaving``: and already on their way out)."""
        with self._lock:
            self.resident_bytes += nbytes
            if leaving:
                self.leaving_bytes += nbytes
            stats = self.stats
            stats.resident_bytes = self.resident_bytes
            kept = self.resident_bytes - self.leaving_bytes
            if kept > stats.peak_resident_bytes:  # as _update (inlined: once per saved tensor)
                stats.peak_resident_bytes = kept

    def charge_if_fits(self, nbytes: int) -> int:
        """Charge ``nbytes`` just allocated on the device (a tensor just saved) if they fit.

        Returns ``excess(nbytes, allocated=True)``, read under the same lock: when it
        is > 0, that many bytes must leave first, and nothing was charged. One call
        where the swapper's hook made two (it runs once per saved tensor).
        """
        with self._lock:
            measure = self.measure
            if measure is None:  # as excess(nbytes, allocated=True)
                need = self.resident_bytes + nbytes
            else:
                need = measure()
            need -= self.leaving_bytes + self.limit - self.reserve
            if need <= 0:  # as charge(nbytes)
                resident = self.resident_bytes = self.resident_bytes + nbytes
                stats = self.stats
                stats.resident_bytes = resident
                kept = resident - self.leaving_bytes
                if kept > stats.peak_resident_bytes:
                    stats.peak_resident_bytes = kept
            return need

    def _update(self) -> None:
        self.stats.resident_bytes = self.resident_bytes
        kept = self.resident_bytes - self.leaving_bytes
        if kept > self.stats.peak_resident_bytes:
            self.stats.peak_resident_bytes = kept

    def leaving(self, nbytes: int) -> None:
        """Mark ``nbytes`` of resident bytes as on their way out (Rule 2)."""
        with self._lock:
            self.leaving_bytes += nbytes

    def stay(self, nbytes: int) -> None:
        """Undo ``leaving(nbytes)``: the bytes turned out to be needed on the device."""
        with self._lock:
            self.leaving_bytes -= nbytes
            self._update()

    def release(self, nbytes: int, leaving: bool = False) -> None:
        """Account ``nbytes`` as no longer resident (``leaving``: they were marked so)."""
        with self._lock:
            self.resident_bytes -= nbytes
            if leaving:
                self.leaving_bytes -= nbytes
            self.stats.resident_bytes = self.resident_bytes

    def note_tensor(self, nbytes: int) -> None:
        """A tensor of ``nbytes`` exists on the device: grow the reserve to it (Rule 5)."""
        if nbytes > self.largest:
            self.largest = self.stats.largest_saved_bytes = nbytes
        if self.measure is not None and nbytes > self.reserve:
            self.reserve = nbytes

    def used_bytes(self) -> int:
        """Device bytes counted against the limit now (Rule 3), minus leaving bytes."""
        used = self.resident_bytes if self.measure is None else self.measure()
        return used - self.leaving_bytes

    def excess(self, extra: int = 0, allocated: bool = False) -> int:
        """Bytes that must leave for ``extra`` more to fit under the limit (<= 0: none).

        ``allocated``: the ``extra`` bytes already exist on the device (a tensor just
        saved, not yet charged); where the allocator is measured they are already
        counted, so they are not added twice.
        """
        measure = self.measure
        if measure is None:  # as used_bytes() (inlined: several times per saved tensor)
            used = self.resident_bytes
        else:
            used = measure()
            if allocated:
                extra = 0
        return used - self.leaving_bytes + extra - (self.limit - self.reserve)

    def over_limit(self, extra: int = 0, allocated: bool = False) -> bool:
        """Whether ``extra`` more bytes would put the device over the limit."""
        return self.excess(extra, allocated) > 0

    def headroom(self) -> int:
        """Bytes that still fit under the limit (never negative)."""
        return max(0, -self.excess())

    def add_evictor(self, evict: Callable[[int], None]) -> RemovableHandle:
        """Register ``evict(nbytes)``, which sends out up to ``nbytes`` (Rule 6)."""
        handle = RemovableHandle(self._evictors)
        self._evictors[handle.id] = evict
        return handle

    def make_room(self, extra: int) -> None:
        """Ask the evictors to free what ``extra`` more bytes need (Rule 6).

        What cannot be freed (nothing evictable is resident) is left over: the
        caller brings its bytes in regardless, because it needs them to run.
        """
        for evict in list(self._evictors.values()):
            need = self.excess(extra)
            if need <= 0:
                return
            evict(need)


class Runtime:
    """Everything one ``lms.enable`` call shares between its pagers.

    Attributes:
        device: the compute device (the model's parameters' device).
        config: the resolved config.
        limit: device memory budget in bytes.
        min_size: smallest storage, in bytes, that may be swapped.
        stats: the counters (NOTE [Stats cover all paging]).
        pool: the host pool (NOTE [Host pool]).
        transfers: the copy streams (NOTE [Copy ordering]).
        budget: the memory budget (NOTE [Memory budget]).

    Example:
        >>> rt = Runtime(torch.device("cpu"), LMSConfig(limit="1MiB"))
        >>> rt.limit
        1048576
    """

    def __init__(self, device: torch.device, config: LMSConfig) -> None:
        device = torch.device(device)
        if device.type != "cpu" and device.index is None:
            # "cuda" and "cuda:0" compare unequal; tensors always carry the index.
            device = torch.device(device.type, device_module(device).current_device())
        self.device = device
        self.config = config
        self.device_total = device_total_memory(device)
        self.limit = config.limit_bytes(self.device_total)
        self.min_size = int(config.min_size)
        self.host_limit = config.host_limit_bytes()
        self.stats = Stats(limit_bytes=self.limit)
        # Pinned memory only means something where an accelerator exists.
        self.pool = HostPool(self.host_limit, pin=device.type != "cpu", stats=self.stats)
        self.transfers = Transfers(device, self.stats)
        measure = allocated_bytes_reader(device) if device.type == "cuda" else None
        self.budget = MemoryBudget(self.limit, self.stats, measure)
        self.lock = threading.RLock()  # pack runs in forward, unpack on autograd's threads

    def snapshot(self) -> Stats:
        """A copy of the counters, with the allocator's peak and finished stall timings."""
        with self.lock:
            self.transfers.collect_stalls()
            s = Stats(**self.stats.as_dict())
        s.host_bytes = self.pool.held_bytes
        if self.device.type == "cuda":
            s.peak_device_bytes = int(torch.cuda.max_memory_allocated(self.device))
        return s

    def reset_stats(self) -> None:
        """Zero the counters and peaks (the pool and what is resident are kept)."""
        with self.lock:
            self.transfers.collect_stalls(block=True)
            fresh = Stats(limit_bytes=self.limit)
            for name, value in fresh.as_dict().items():
                setattr(self.stats, name, value)
            self.stats.resident_bytes = self.budget.resident_bytes
            self.stats.peak_resident_bytes = self.budget.resident_bytes - self.budget.leaving_bytes
            self.stats.host_bytes = self.pool.held_bytes
            self.stats.largest_saved_bytes = self.budget.largest
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def oom_error(self, exc: BaseException, where: str) -> LMSError:
        """An ``LMSError`` with advice for a device out-of-memory raised ``where``."""
        return LMSError(
            f"device out of memory {where} with LMS on (limit {format_bytes(self.limit)}, "
            f"min_size {format_bytes(self.min_size)}, LMS resident "
            f"{format_bytes(self.budget.resident_bytes)}): lower limit to leave room for "
            "what LMS does not manage (weights, gradients, temporaries) or lower min_size "
            f"so that more tensors can be swapped. Original error: {exc}"
        )

    def close(self) -> None:
        """Finish in-flight copies and free the pool's cached blocks."""
        self.transfers.synchronize()
        self.pool.close()
