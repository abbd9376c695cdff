"""Pure decisions over plain data: what stays, what moves out, what comes back when.

# NOTE [Swap policy]
# 1. Backward uses saved tensors in roughly the reverse order of saving, so the
#    tensor saved longest ago is the one needed furthest in the future. When the
#    limit is exceeded, evict the oldest-saved resident tensors first; what was
#    saved last, and is needed first in backward, stays on the device
#    (``plan_evictions``). ``limit=0`` evicts every eligible tensor.
# 2. Because evictions go oldest first, swapped-out tensors form a prefix of the
#    save order; backward walks it from the newest end. Prefetch takes swapped
#    tensors in that order, as long as they fit in the headroom under the limit,
#    and always at least ``lookahead`` of them so that copies overlap compute even
#    at ``limit=0`` (``plan_prefetch``).
# 3. Copies of evicted tensors in flight still occupy the device. The host waits
#    for the oldest of them only when the bytes in flight exceed the headroom
#    under the limit by more than one tensor, the one just saved
#    (``must_wait_for_copies``): that bounds the overshoot by one tensor, and
#    still keeps the copy engine busy (the next copy is queued while the
#    previous one runs, and compute for the next tensor runs beside them).
# 4. Tensors below ``min_size`` never move: a copy has a fixed cost (about 48 us
#    for 1 MiB, ANCHORS.md), so small ones would cost more time than the memory is
#    worth (``is_swappable_size``).
# 5. A saved cast of a parameter (autocast's low-precision weight) is evicted by
#    dropping it and casting again in backward (NOTE [Activation swapping] Rule
#    10): no link traffic, one cast kernel. So such casts are evicted before any
#    other tensor, oldest first among them, and a new one that does not fit is
#    dropped at once instead of pushing out a tensor that would need copies.
#    Prefetch never sees them: the cast is made when backward unpacks it.
# Everything here works on (key, nbytes) pairs and ints, so it is tested without
# tensors, devices or streams.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["is_swappable_size", "must_wait_for_copies", "plan_evictions", "plan_prefetch"]


def is_swappable_size(nbytes: int, min_size: int) -> bool:
    """Whether a storage of ``nbytes`` is big enough to swap (Rule 4).

    Example:
        >>> is_swappable_size(2 << 20, min_size=1 << 20), is_swappable_size(100, 1 << 20)
        (True, False)
    """
    return nbytes > 0 and nbytes >= min_size


def plan_evictions(resident_oldest_first: Iterable[tuple[int, int]], need: int) -> list[int]:
    """Keys to evict so that at least ``need`` bytes leave (Rule 1).

    Args:
        resident_oldest_first: ``(key, nbytes)`` of resident, evictable tensors in
            save order, oldest first. Consumed lazily: only as far as needed.
        need: bytes that must leave; ``<= 0`` means nothing.

    Returns:
        The keys to evict, oldest first. Fewer than ``need`` bytes when there is
        not enough to evict.

    Example:
        >>> plan_evictions([(0, 10), (1, 10), (2, 10)], need=15)
        [0, 1]
    """
    chosen: list[int] = []
    if need <= 0:
        return chosen
    freed = 0
    for key, nbytes in resident_oldest_first:
        chosen.append(key)
        freed += nbytes
        if freed >= need:
            break
    return chosen


def plan_prefetch(
    swapped_next_first: Iterable[tuple[int, int]],
    headroom: int,
    in_flight: int,
    lookahead: int,
) -> list[int]:
    """Keys of swapped tensors to start bringing back now (Rule 2).

    Args:
        swapped_next_first: ``(key, nbytes)`` of swapped-out tensors in the order
            backward will need them (newest saved first). Consumed lazily.
        headroom: bytes that still fit under the limit.
        in_flight: prefetches already issued and not yet used.
        lookahead: prefetches allowed regardless of the headroom.

    Returns:
        Keys to prefetch, in order. Stops at the first tensor that does not fit,
        so that tensors arrive in the order they are needed.

    Example:
        >>> plan_prefetch([(5, 10), (4, 10), (3, 10)], headroom=15, in_flight=0, lookahead=0)
        [5]
        >>> plan_prefetch([(5, 10), (4, 10)], headroom=0, in_flight=0, lookahead=1)
        [5]
    """
    chosen: list[int] = []
    for key, nbytes in swapped_next_first:
        if in_flight < lookahead:
            pass  # the guaranteed lookahead, whatever the limit
        elif nbytes <= headroom:
            headroom -= nbytes
        else:
            break
        chosen.append(key)
        in_flight += 1
    return chosen


def must_wait_for_copies(in_flight_bytes: int, excess: int, allowance: int) -> bool:
    """Whether the host must wait for an outgoing copy before going on (Rule 3).

    Args:
        in_flight_bytes: bytes whose device-to-host copy has not finished.
        excess: bytes over the limit, not counting those in flight (< 0: headroom).
            When memory LMS does not manage already exceeds the limit, the excess
            stays positive, and in-flight bytes are bounded by ``allowance`` alone.
        allowance: the overshoot allowed: the size of the tensor just saved.

    Example:
        >>> must_wait_for_copies(in_flight_bytes=30, excess=0, allowance=20)
        True
        >>> must_wait_for_copies(in_flight_bytes=30, excess=-15, allowance=20)
        False
    """
    return in_flight_bytes > allowance + max(0, -excess)
