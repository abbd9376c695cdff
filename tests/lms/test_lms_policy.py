"""The pure policy: evictions, prefetch and throttling over plain (key, nbytes) data."""

from lms.policy import is_swappable_size, must_wait_for_copies, plan_evictions, plan_prefetch


def test_evictions_take_the_oldest_saved_first_and_only_as_many_as_needed():
    resident = [(0, 10), (1, 20), (2, 30), (3, 40)]
    assert plan_evictions(resident, need=0) == []
    assert plan_evictions(resident, need=-5) == []
    assert plan_evictions(resident, need=10) == [0]
    assert plan_evictions(resident, need=11) == [0, 1]
    assert plan_evictions(resident, need=1000) == [0, 1, 2, 3]  # limit=0: everything


def test_evictions_consume_their_input_lazily():
    consumed = []

    def gen():
        for key in range(100):
            consumed.append(key)
            yield key, 8

    assert plan_evictions(gen(), need=16) == [0, 1]
    assert consumed == [0, 1]


def test_prefetch_fills_the_headroom_in_order_of_need():
    swapped = [(9, 10), (7, 10), (4, 10)]
    assert plan_prefetch(swapped, headroom=25, in_flight=0, lookahead=0) == [9, 7]
    # Stops at the first that does not fit: tensors arrive in the order needed.
    assert plan_prefetch([(9, 10), (7, 50), (4, 1)], 25, 0, 0) == [9]
    assert plan_prefetch(swapped, headroom=0, in_flight=0, lookahead=0) == []


def test_prefetch_keeps_a_minimum_lookahead_even_at_limit_zero():
    swapped = [(9, 10), (7, 10), (4, 10)]
    assert plan_prefetch(swapped, headroom=0, in_flight=0, lookahead=2) == [9, 7]
    assert plan_prefetch(swapped, headroom=0, in_flight=1, lookahead=2) == [9]
    assert plan_prefetch(swapped, headroom=0, in_flight=2, lookahead=2) == []
    assert plan_prefetch(swapped, headroom=10, in_flight=0, lookahead=1) == [9, 7]


def test_copies_in_flight_are_bounded_by_headroom_plus_one_largest():
    assert not must_wait_for_copies(in_flight_bytes=0, excess=100, allowance=10)
    assert not must_wait_for_copies(in_flight_bytes=10, excess=5, allowance=10)
    assert must_wait_for_copies(in_flight_bytes=11, excess=5, allowance=10)
    assert not must_wait_for_copies(in_flight_bytes=30, excess=-20, allowance=10)
    assert must_wait_for_copies(in_flight_bytes=31, excess=-20, allowance=10)


def test_min_size():
    assert is_swappable_size(1 << 20, 1 << 20)
    assert not is_swappable_size((1 << 20) - 1, 1 << 20)
    assert not is_swappable_size(0, 0)
    assert is_swappable_size(1, 0)
