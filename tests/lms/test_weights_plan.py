"""Pure planning of weight paging: what is paged, what is prefetched, order tracking."""

import pytest

from lms.errors import LMSError
from lms.weights_plan import (
    AUTO_STATE_SHARE,
    RESIDENT_SHARE,
    ModuleNeed,
    OrderTracker,
    ParamInfo,
    check_modules_fit,
    plan_weights,
    prefetch_targets,
)

PARAMS = [ParamInfo("big", 1000), ParamInfo("mid", 400), ParamInfo("small", 10)]


def test_false_pages_nothing_and_true_pages_all_above_min_size():
    assert plan_weights(PARAMS, limit=1, min_size=0, mode=False).paged == frozenset()
    plan = plan_weights(PARAMS, limit=10**9, min_size=100, mode=True)
    assert plan.paged == {"big", "mid"}
    assert plan.paged_bytes == 1400
    assert plan.resident_state_bytes == 40  # only "small": 10 B x state factor 4


def test_auto_pages_nothing_when_state_fits():
    state = 4 * 1410
    plan = plan_weights(PARAMS, limit=int(state / AUTO_STATE_SHARE) + 1, min_size=0)
    assert plan.paged == frozenset()
    assert plan.resident_state_bytes == state


def test_auto_pages_largest_first_until_resident_fits():
    # state 5640 B; limit 2000 -> resident must drop under 1000 B: paging "big"
    # (4000 B of state) leaves 1640 B, paging "mid" too leaves 40 B.
    plan = plan_weights(PARAMS, limit=2000, min_size=0)
    assert plan.paged == {"big", "mid"}
    assert plan.resident_state_bytes <= RESIDENT_SHARE * 2000
    # A larger limit keeps "mid" resident: 1640 <= 0.5 * 4000.
    assert plan_weights(PARAMS, limit=4000, min_size=0).paged == {"big"}


def test_auto_never_pages_below_min_size_even_if_over_limit():
    plan = plan_weights(PARAMS, limit=0, min_size=500)
    assert plan.paged == {"big"}


def test_frozen_params_count_once():
    frozen = [ParamInfo("emb", 1000, trainable=False)]
    assert plan_weights(frozen, limit=10**6, min_size=0).resident_state_bytes == 1000


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="yes"),
        dict(mode=1),
        dict(limit=-1),
        dict(min_size=-5),
        dict(state_factor=0.5),
    ],
)
def test_bad_plan_inputs_raise(kwargs):
    args = dict(limit=100, min_size=0, mode="auto")
    args.update(kwargs)
    with pytest.raises(LMSError):
        plan_weights(PARAMS, **args)


def test_duplicate_names_raise():
    with pytest.raises(LMSError, match="twice"):
        plan_weights([ParamInfo("a", 1), ParamInfo("a", 1)], limit=10, min_size=0)


def test_prefetch_forward_and_backward_respect_budget_and_lookahead():
    order = [0, 1, 2, 3, 4]
    sizes = {m: 10 for m in order}
    assert prefetch_targets(order, 0, 1, sizes, free_bytes=100, max_ahead=2) == [1, 2]
    assert prefetch_targets(order, 0, 1, sizes, free_bytes=25, max_ahead=4) == [1, 2]
    assert prefetch_targets(order, 4, -1, sizes, free_bytes=100, max_ahead=3) == [3, 2, 1]
    assert prefetch_targets(order, 4, 1, sizes, free_bytes=100, max_ahead=3) == []


def test_prefetch_always_allows_the_next_module_even_at_zero_budget():
    assert prefetch_targets([0, 1, 2], 0, 1, {1: 10, 2: 10}, free_bytes=0, max_ahead=2) == [1]
    assert prefetch_targets([0, 1, 2], 0, 1, {1: 10}, free_bytes=0, max_ahead=0) == []


def test_prefetch_skips_resident_and_repeated_modules():
    order = [0, 1, 0, 2, 3]  # module 0 runs twice (a shared module)
    got = prefetch_targets(order, 0, 1, {2: 5, 3: 5}, free_bytes=100, max_ahead=2, skip={1})
    assert got == [0, 2]
    assert prefetch_targets(order, 1, 1, {0: 0, 2: 5}, 100, max_ahead=1, skip={0}) == [2]


def test_prefetch_bad_step_raises():
    with pytest.raises(LMSError):
        prefetch_targets([0, 1], 0, 2, {}, 0, 1)


def test_order_tracker_follows_learned_order():
    t = OrderTracker()
    assert [t.see(m) for m in (5, 6, 7)] == [None, None, None]
    assert not t.diverged  # nothing learned yet is not a divergence
    t.finish_step()
    assert [t.see(m) for m in (5, 6, 7)] == [0, 1, 2]
    assert not t.diverged
    t.finish_step()
    assert t.learned == [5, 6, 7]
    assert t.steps == 2


def test_order_tracker_resyncs_on_a_branch_and_relearns():
    t = OrderTracker()
    for m in (1, 2, 3, 4):
        t.see(m)
    t.finish_step()
    # A data-dependent branch skips module 2 and adds module 9.
    assert t.see(1) == 0
    assert t.see(3) == 2
    assert t.diverged
    assert t.see(9) is None
    assert t.see(4) == 3
    t.finish_step()
    assert t.learned == [1, 3, 9, 4]
    assert not t.diverged
    # Going back to an earlier module (a shared module run twice) finds it again.
    assert t.see(1) == 0 and t.see(1) == 0 and t.diverged


def test_a_limit_below_one_modules_params_and_grads_names_the_biggest_module():
    needs = [ModuleNeed("emb", 100, 0), ModuleNeed("fc", 60, 60), ModuleNeed("", 10, 10)]
    check_modules_fit(needs, limit=120)  # fc needs exactly the limit: fits
    with pytest.raises(LMSError, match=r"module 'fc'.*\(120 bytes\).*at least 120 bytes"):
        check_modules_fit(needs, limit=119)
    with pytest.raises(LMSError, match="the model itself"):
        check_modules_fit([ModuleNeed("", 10, 10)], limit=19)


def test_limit_zero_is_not_a_budget_and_no_paged_module_needs_nothing():
    check_modules_fit([ModuleNeed("fc", 10**12, 10**12)], limit=0)
    check_modules_fit([], limit=1)
