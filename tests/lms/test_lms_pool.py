"""The host pool: reuse without waste, the cap, and the budget it sits beside."""

import pytest
import torch

from lms import LMSError, Stats
from lms.pool import ALIGN, HostBlock, HostPool
from lms.runtime import MemoryBudget


def test_blocks_are_reused_and_allocations_stop():
    stats = Stats()
    pool = HostPool(cap=1 << 30, pin=False, stats=stats)
    sizes = [3 << 20, 1 << 20, 5000, 3 << 20]
    for _ in range(3):  # three "steps" of the same sizes
        blocks = [pool.acquire(n) for n in sizes]
        for b in blocks:
            pool.release(b)
    assert stats.pinned_allocs == len(sizes)
    assert pool.in_use_bytes == 0


def test_no_power_of_two_rounding():
    stats = Stats()
    pool = HostPool(cap=1 << 30, pin=False, stats=stats)
    n = (1 << 20) + 1  # just over a power of two
    block = pool.acquire(n)
    assert n <= block.capacity <= n + ALIGN
    assert pool.held_bytes == stats.host_bytes == block.capacity


def test_a_much_larger_free_block_is_not_handed_out():
    pool = HostPool(cap=1 << 30, pin=False, stats=Stats())
    big = pool.acquire(8 << 20)
    pool.release(big)
    small = pool.acquire(1 << 20)
    assert small is not big and small.capacity < 2 << 20


def test_cap_trims_cached_blocks_then_raises():
    stats = Stats()
    pool = HostPool(cap=3 * ALIGN * 16, pin=False, stats=stats)
    a = pool.acquire(2 * ALIGN * 16)
    pool.release(a)
    b = pool.acquire(3 * ALIGN * 16)  # needs the cached block freed first
    assert pool.held_bytes == b.capacity
    with pytest.raises(LMSError, match="host_limit"):
        pool.acquire(ALIGN)
    assert pool.held_bytes == b.capacity and pool.in_use_bytes == b.capacity


def test_block_views_hold_any_dtype():
    pool = HostPool(cap=1 << 20, pin=False, stats=Stats())
    block = pool.acquire(24)
    block.view(24).view(torch.float64)[:] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert block.view(24).view(torch.float64).tolist() == [1.0, 2.0, 3.0]


def test_budget_accounting():
    stats = Stats()
    budget = MemoryBudget(limit=100, stats=stats)
    budget.charge(80)
    assert budget.excess(30) == 10 and budget.over_limit(30) and budget.headroom() == 20
    budget.leaving(50)  # a copy out is in flight: no longer counted against the limit
    assert budget.excess(30) == -40
    budget.release(50, leaving=True)
    assert budget.resident_bytes == 30 and budget.leaving_bytes == 0
    budget.charge(10, leaving=True)  # sent straight out: never counted as kept
    assert stats.peak_resident_bytes == 80
    budget.stay(10)  # turned out to be needed: kept after all
    assert budget.resident_bytes == 40 and stats.resident_bytes == 40
    assert budget.excess(5, allocated=True) == -55  # no measure: LMS's own accounting


def test_measured_budget_keeps_a_reserve_for_temporaries():
    allocated = [500]
    budget = MemoryBudget(limit=1000, stats=Stats(), measure=lambda: allocated[0])
    assert budget.excess() == -500
    budget.note_tensor(200)  # the largest tensor seen: kept free for temporaries
    assert budget.excess() == -300 and budget.headroom() == 300
    budget.note_tensor(100)  # smaller: no change
    assert budget.reserve == 200
    assert budget.excess(50, allocated=True) == -300  # already counted by the allocator
    unmeasured = MemoryBudget(limit=1000, stats=Stats())
    unmeasured.note_tensor(200)  # LMS's own accounting: the limit is exact
    assert unmeasured.reserve == 0 and unmeasured.excess() == -1000


def test_a_double_release_is_refused_and_changes_nothing():
    # It was accepted: the block went on the free list twice, in_use_bytes went
    # negative, and the next two requests got the same buffer.
    stats = Stats()
    pool = HostPool(cap=1 << 30, pin=False, stats=stats)
    a = pool.acquire(10_000)
    pool.release(a)
    with pytest.raises(LMSError, match="released twice"):
        pool.release(a)
    assert pool.in_use_bytes == 0 and pool.held_bytes == stats.host_bytes == a.capacity
    first, second = pool.acquire(10_000), pool.acquire(10_000)
    assert first is a and second is not a
    assert pool.in_use_bytes == 2 * a.capacity


def test_a_foreign_block_is_refused_and_changes_nothing():
    pool = HostPool(cap=1 << 30, pin=False, stats=Stats())
    other = HostPool(cap=1 << 30, pin=False, stats=Stats())
    theirs = other.acquire(10_000)
    mine = pool.acquire(10_000)
    for foreign in (theirs, HostBlock(torch.empty(ALIGN, dtype=torch.uint8), mine._id)):
        with pytest.raises(LMSError, match="did not allocate it"):
            pool.release(foreign)
    assert pool.in_use_bytes == pool.held_bytes == mine.capacity
    assert pool.acquire(10_000) is not theirs
    other.release(theirs)  # still its own pool's to release
    assert other.in_use_bytes == 0


def test_a_released_block_of_a_closed_pool_is_freed_once():
    pool = HostPool(cap=1 << 30, pin=False, stats=Stats())
    a = pool.acquire(10_000)
    pool.close()
    pool.release(a)
    assert pool.held_bytes == 0
    with pytest.raises(LMSError, match="released twice"):
        pool.release(a)
    assert pool.held_bytes == 0 and pool.in_use_bytes == 0


def test_host_allocation_failure_is_our_error_and_the_pool_stays_usable():
    # A request under the cap that the machine cannot hold raised PyTorch's
    # "can't allocate memory" RuntimeError, which the forward guard reports as a
    # *device* out-of-memory; 1 PiB is beyond any machine's address space.
    stats = Stats()
    pool = HostPool(cap=1 << 60, pin=False, stats=stats)
    kept = pool.acquire(10_000)
    with pytest.raises(LMSError, match="could not allocate .* host memory.*host_limit"):
        pool.acquire(1 << 50)
    assert pool.held_bytes == stats.host_bytes == pool.in_use_bytes == kept.capacity
    assert stats.pinned_allocs == 1
    pool.release(kept)
    assert pool.acquire(10_000) is kept


def test_a_negative_request_is_refused():
    pool = HostPool(cap=1 << 30, pin=False, stats=Stats())
    with pytest.raises(LMSError, match="-1 bytes"):
        pool.acquire(-1)
    assert pool.held_bytes == pool.in_use_bytes == 0
    zero = pool.acquire(0)  # an empty storage still gets a (page-sized) block
    assert zero.capacity == ALIGN and zero.view(0).numel() == 0


@pytest.mark.parametrize("pattern", ["random", "growing"])
def test_host_memory_stays_close_to_the_peak_in_use_when_sizes_drift(pattern):
    # Every size ever swapped stayed cached: with sizes that drift from step to step
    # (variable or growing sequence lengths) the pool grew towards the cap, many
    # times the bytes ever in use at once, though the docs promise it stays close.
    import random

    rng = random.Random(0)
    stats = Stats()
    pool = HostPool(cap=1 << 40, pin=False, stats=stats)
    peak = 0  # the most bytes in use at once
    for step in range(60):
        t = rng.randint(4, 64) if pattern == "random" else 4 + step
        blocks = [pool.acquire(n) for n in [t * 16 * ALIGN] * 4 + [t * t * 256] * 2]
        peak = max(peak, pool.in_use_bytes)
        for b in blocks:
            pool.release(b)
        assert pool.held_bytes == stats.host_bytes
        assert pool.held_bytes <= 2 * peak  # NOTE [Host pool] rule 2: CACHE_FACTOR
    assert pool.in_use_bytes == 0 and pool.peak_in_use_bytes == peak


def test_alternating_shapes_still_allocate_nothing_after_the_first_steps():
    stats = Stats()
    pool = HostPool(cap=1 << 40, pin=False, stats=stats)
    for step in range(10):
        t = (16, 32)[step % 2]
        blocks = [pool.acquire(n) for n in [t * 16 * ALIGN] * 4 + [t * t * 256] * 2]
        for b in blocks:
            pool.release(b)
        if step == 1:
            allocs = stats.pinned_allocs
    assert stats.pinned_allocs == allocs
