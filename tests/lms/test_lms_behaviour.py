"""Structural checks on the CPU: what moves, what stays, what is left behind.

These check activation swapping alone (``weights=False``), so that the bytes and
counts asserted are those of saved activations.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lms
from examples.gpt import GPT, GPTConfig, synthetic_batch
from lms.activations_entry import Where


def small_gpt(batch=4):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=4, seq_len=32, vocab_size=256)
    model = GPT(cfg)
    x, y = synthetic_batch(cfg, batch, torch.Generator().manual_seed(1))
    return model, x, y


def saved_storages(model, run):
    """Storage sizes of the eligible tensors one forward saves: (saves, {ptr: nbytes})."""
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saves, storages = [], {}

    def pack(t):
        base = t._base if t._base is not None else t
        if not isinstance(base, nn.Parameter) and not (t.is_leaf and t.requires_grad):
            s = t.untyped_storage()
            if s.data_ptr() not in frozen:
                saves.append(s.data_ptr())
                storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, saves, storages


def hooks_of(model):
    return (
        len(model._forward_pre_hooks),
        len(model._forward_hooks),
        len(model._forward_hooks_always_called),
        "forward" in model.__dict__,
    )


# -- the limit ---------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, 64 * 1024, 256 * 1024, 512 * 1024])
def test_limit_is_honoured_through_forward_and_the_newest_stay(limit):
    model, x, y = small_gpt()
    with lms.enable(model, weights=False, limit=limit, min_size=0, lookahead=0) as handle:
        loss = model(x, y)
        stats = handle.stats()
        assert stats.peak_resident_bytes <= limit
        assert stats.resident_bytes <= limit
        # NOTE [Swap policy], Rule 1: everything swapped was saved before anything kept.
        entries = list(handle.activations._index.values())
        out = [e.seq for e in entries if e.where is Where.HOST]
        kept = [e.seq for e in entries if e.where is Where.DEVICE]
        if out and kept:
            assert max(out) < min(kept)
        if limit == 0:
            assert not kept and out
        loss.backward()


@pytest.mark.parametrize("limit", [0, 300 * 1024, 1024 * 1024])
def test_limit_is_honoured_through_backward_up_to_the_tensor_in_use(limit):
    # Each backward node of this chain uses one saved storage, so with no forced
    # lookahead the bound in backward is the limit plus the tensor in use.
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    model = nn.Sequential(*layers)
    x = torch.randn(128, 256)
    _, _, storages = saved_storages(model, lambda: model(x))
    largest = max(storages.values())
    with lms.enable(model, weights=False, limit=limit, min_size=0, lookahead=0) as handle:
        for _ in range(2):
            model(x).sum().backward()
        stats = handle.stats()
    assert stats.swap_outs > 0 or limit >= sum(storages.values())
    assert stats.peak_resident_bytes <= limit + largest


def test_prefetch_brings_tensors_back_ahead_of_use():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.Tanh()) for _ in range(6)])
    x = torch.randn(128, 256)
    with lms.enable(model, weights=False, limit=0, min_size=0, lookahead=2) as handle:
        loss = model(x).sum()
        fetched_before_use = []
        swapper = handle.activations
        original = swapper._fetch
        swapper._fetch = lambda e: (fetched_before_use.append(e.seq), original(e))[1]
        loss.backward()
    # The first is fetched on demand; each unpack then keeps two in flight ahead of it.
    assert len(fetched_before_use) == handle.stats().swap_ins
    assert fetched_before_use == sorted(fetched_before_use, reverse=True)


# -- what moves --------------------------------------------------------------


def test_min_size_is_honoured():
    model, x, y = small_gpt()
    _, _, storages = saved_storages(model, lambda: model(x, y))
    sizes = sorted(storages.values())
    min_size = sizes[len(sizes) // 2] + 1  # half of the storages are below it
    moved = []
    with lms.enable(model, weights=False, limit=0, min_size=min_size) as handle:
        to_host = handle.runtime.transfers.to_host
        handle.runtime.transfers.to_host = lambda src, b: (
            moved.append(src.numel()),
            to_host(src, b),
        )[1]
        model(x, y).backward()
    assert moved and min(moved) >= min_size
    assert sorted(moved) == sorted(n for n in storages.values() if n >= min_size)


def test_a_storage_saved_several_times_or_through_several_views_moves_once():
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(64, 3 * 64)

        def forward(self, x):
            h = self.qkv(x)
            q, k, v = h.split(64, dim=-1)  # three views of one storage
            a = q * k  # saves q and k
            b = a * v  # saves a and v
            return (b * b).sum()  # saves b twice

    torch.manual_seed(0)
    model = Views()
    x = torch.randn(256, 64)
    _, saves, storages = saved_storages(model, lambda: model(x))
    assert len(saves) > len(storages)  # the model does exercise repeats
    with lms.enable(model, weights=False, limit=0, min_size=0) as handle:
        model(x).backward()
        stats = handle.stats()
    assert stats.swap_outs == len(storages) == stats.swap_ins
    assert stats.swapped_out_bytes == sum(storages.values())


def test_gpt_moves_each_storage_once_per_step():
    model, x, y = small_gpt()
    _, saves, storages = saved_storages(model, lambda: model(x, y))
    with lms.enable(model, weights=False, limit=0, min_size=0) as handle:
        model(x, y).backward()
        stats = handle.stats()
    assert len(saves) > len(storages)
    assert stats.swap_outs == len(storages)
    assert stats.swapped_out_bytes == sum(storages.values())


def test_parameters_and_buffers_are_never_swapped():
    model = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.Linear(512, 512))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    buffers = {b.untyped_storage().data_ptr() for b in model.buffers()}
    moved = []
    with lms.enable(model, weights=False, limit=0, min_size=0) as handle:
        to_host = handle.runtime.transfers.to_host
        handle.runtime.transfers.to_host = lambda src, b: (
            moved.append(src.untyped_storage().data_ptr()),
            to_host(src, b),
        )[1]
        model(torch.randn(64, 512)).sum().backward()
    assert moved and not (set(moved) & (params | buffers))


def test_eval_and_no_grad_forwards_are_untouched():
    model, x, y = small_gpt()
    with lms.enable(model, weights=False, limit=0, min_size=0) as handle:
        model.eval()
        with torch.no_grad():
            model(x, y)
        with torch.inference_mode():
            model(x, y)
        model.train()
        with torch.no_grad():
            model(x, y)
        model.eval()
        model(x, y)  # eval mode: LMS stays out of the way
        stats = handle.stats()
        assert stats.swap_outs == 0 and stats.peak_resident_bytes == 0
        assert handle.activations.live_entries() == 0
        model.train()
        model(x, y).backward()
        assert handle.stats().swap_outs > 0


# -- steady state and host memory --------------------------------------------


def test_no_host_allocations_in_steady_state_and_little_host_waste():
    model, x, y = small_gpt()
    with lms.enable(model, weights=False, limit=0, min_size=0) as handle:
        model(x, y).backward()
        first = handle.stats()
        handle.reset_stats()
        for _ in range(3):
            model.zero_grad()
            model(x, y).backward()
        steady = handle.stats()
    assert first.pinned_allocs > 0
    assert steady.pinned_allocs == 0
    per_step = steady.swapped_out_bytes // 3
    assert per_step == first.swapped_out_bytes
    # Exact-size blocks (rounded to 4 KiB pages), not powers of two.
    assert steady.host_bytes <= per_step + 4096 * first.pinned_allocs
    assert steady.resident_bytes == 0 and handle.runtime.pool.in_use_bytes == 0


def test_a_graph_dropped_without_backward_frees_everything():
    model, x, y = small_gpt()
    with lms.enable(model, weights=False, limit=64 * 1024, min_size=0) as handle:
        loss = model(x, y)
        assert handle.activations.live_entries() > 0
        del loss
        assert handle.activations.live_entries() == 0
        assert handle.stats().resident_bytes == 0
        assert handle.runtime.pool.in_use_bytes == 0


@pytest.mark.parametrize("limit", [0, 64 * 1024])  # new tensor sent out / older ones evicted
def test_host_cap_raises_lms_error_and_leaves_a_working_model(limit):
    model, x, y = small_gpt()
    want = [p.grad for p in model.parameters()]
    with lms.enable(model, weights=False, limit=limit, min_size=0, host_limit="64KiB") as handle:
        with pytest.raises(lms.LMSError, match="host_limit"):
            model(x, y)
        assert handle.activations.live_entries() == 0
        assert handle.stats().resident_bytes == 0
    assert hooks_of(model) == (0, 0, 0, False)
    model(x, y).backward()  # trains normally once LMS is removed
    assert all(w is None for w in want) and all(p.grad is not None for p in model.parameters())


def test_retain_graph_and_a_second_backward():
    model, x, y = small_gpt()
    model(x, y).backward()
    want = [p.grad.clone() * 2 for p in model.parameters()]
    model.zero_grad()
    with lms.enable(model, weights=False, limit=0, min_size=0) as handle:
        loss = model(x, y)
        loss.backward(retain_graph=True)
        # Back under the limit between the two backwards: what came back left again.
        assert handle.stats().resident_bytes == 0
        swap_ins = handle.stats().swap_ins
        loss.backward()
        assert handle.stats().swap_ins == 2 * swap_ins
    assert all(torch.equal(a, p.grad) for a, p in zip(want, model.parameters(), strict=True))


# -- hooks and the handle ----------------------------------------------------


def test_remove_leaves_no_hook_behind():
    model, x, y = small_gpt()
    before = hooks_of(model)
    handle = lms.enable(model, weights=False, limit=0, min_size=0)
    assert hooks_of(model) != before
    loss = model(x, y)
    handle.remove()
    handle.remove()  # idempotent
    assert hooks_of(model) == before == (0, 0, 0, False)
    assert not handle.enabled
    loss.backward()  # tensors saved while LMS was on are still valid
    swaps = handle.stats().swap_outs
    model(x, y).backward()
    assert handle.stats().swap_outs == swaps
    lms.enable(model, weights=False, limit=0).remove()  # and it can be enabled again


def test_an_exception_in_forward_closes_the_scope():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(256, 256)

        def forward(self, x):
            self.lin(x)
            raise ValueError("boom")

    model = Fails()
    x = torch.randn(64, 256)
    with lms.enable(model, weights=False, limit=0, min_size=0) as handle:
        with pytest.raises(ValueError, match="boom"):
            model(x)
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        swaps = handle.stats().swap_outs
        (model.lin(x) * 2).sum().backward()  # outside the model's forward: untouched
        assert handle.stats().swap_outs == swaps


def test_device_oom_in_forward_is_reraised_with_advice():
    class Hungry(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = Hungry()
    with lms.enable(model, weights=False, limit=0):
        with pytest.raises(lms.LMSError, match="min_size") as info:
            model(torch.randn(2, 8))
    assert "limit" in str(info.value) and isinstance(info.value.__cause__, torch.OutOfMemoryError)
    with pytest.raises(torch.OutOfMemoryError):
        model(torch.randn(2, 8))  # removed: the original error again


def test_stats_report():
    model, x, y = small_gpt()
    with lms.enable(model, weights=False, limit=0, min_size=0) as handle:
        model(x, y).backward()
    s = handle.stats()
    assert s.peak_device_bytes is None and s.stall_s >= 0 and s.limit_bytes == 0
    text = s.summary()
    for word in ("limit", "peak resident", "swapped out", "swapped in", "re-cast", "host pool"):
        assert word in text
    assert set(s.as_dict()) >= {
        "swapped_out_bytes", "swapped_in_bytes", "swap_outs", "swap_ins", "recasts",
        "recast_bytes", "peak_resident_bytes", "peak_device_bytes", "stall_s", "pinned_allocs",
        "host_bytes", "largest_saved_bytes",
    }  # fmt: skip


@pytest.mark.parametrize("min_size, largest", [(0, 8 * 256 * 4), (8 * 256 * 4 + 1, 0)])
def test_largest_saved_bytes_is_the_largest_eligible_saved_tensor(min_size, largest):
    # Saved: the input (8 x 64 fp32), the first Linear's output (8 x 256, kept by ReLU)
    # and ReLU's output (8 x 256, kept by the second Linear). Parameters are never counted.
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    with lms.enable(model, weights=False, limit=0, min_size=min_size) as handle:
        model(torch.randn(8, 64)).sum().backward()
        assert handle.stats().largest_saved_bytes == largest
        handle.reset_stats()  # a size seen, not a counter: it survives the reset
        assert handle.stats().largest_saved_bytes == largest


# -- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"limit": -1}, "limit"),
        ({"limit": "twenty gigs"}, "limit"),
        ({"limit": "100TiB"}, "larger than the device"),
        ({"min_size": "-1MiB"}, "min_size"),
        ({"min_size": "big"}, "min_size"),
        ({"weights": "perhaps"}, "weights"),
    ],
)
def test_bad_settings_raise_and_change_nothing(kwargs, match):
    model, x, y = small_gpt()
    with pytest.raises(lms.LMSError, match=match):
        lms.enable(model, **{"weights": False, **kwargs})
    assert hooks_of(model) == (0, 0, 0, False)
    lms.enable(model, weights=False, limit=0).remove()  # not left half-registered


def test_bad_models_raise():
    with pytest.raises(lms.LMSError, match="no parameters"):
        lms.enable(nn.ReLU())
    with pytest.raises(lms.LMSError, match="nn.Module"):
        lms.enable(lambda x: x)
    model = nn.Linear(4, 4)
    with lms.enable(model):
        with pytest.raises(lms.LMSError, match="already enabled"):
            lms.enable(model)
        assert hooks_of(model) == (1, 1, 1, True)


def test_environment_overrides(monkeypatch):
    model, x, y = small_gpt()
    monkeypatch.setenv("LMS_LIMIT", "0")
    monkeypatch.setenv("LMS_MIN_SIZE", "0")
    with lms.enable(model, weights=False, limit="1GiB", min_size="1MiB") as handle:
        assert handle.runtime.limit == 0 and handle.runtime.min_size == 0
        model(x, y).backward()
        assert handle.stats().swap_outs > 0
    monkeypatch.setenv("LMS_DISABLE", "1")
    handle = lms.enable(model, weights=False, limit=0)
    assert not handle.enabled and handle.runtime is None
    assert hooks_of(model) == (0, 0, 0, False)
    model(x, y).backward()
    assert handle.stats() == lms.Stats()
    handle.remove()


def test_cross_entropy_only_model_with_integer_saves():
    # Saved integer tensors (indices, targets) move bitwise like the rest.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 1000))
    idx = torch.randint(1000, (64, 32))
    model(idx).flatten(0, 1).logsumexp(-1).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with lms.enable(model, weights=False, limit=0, min_size=0):
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten(), reduction="sum")
        model(idx).flatten(0, 1).logsumexp(-1).sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(want, model.parameters(), strict=True))


def test_an_entry_freed_inside_a_critical_section_is_released_after_it():
    # The garbage collector can free a saved tensor's Packed at any allocation,
    # also in the middle of LMS's own bookkeeping; the release waits for the end.
    from lms.activations import ActivationSwapper
    from lms.config import LMSConfig
    from lms.runtime import Runtime

    runtime = Runtime(torch.device("cpu"), LMSConfig(limit="1GiB", min_size=0))
    swapper = ActivationSwapper(nn.Linear(2, 2), runtime)
    packed = swapper._pack(torch.randn(1000) * 2)
    assert runtime.budget.resident_bytes == 4000
    with swapper._critical():
        del packed  # finalized right here, inside the section
        assert swapper.live_entries() == 1 and runtime.budget.resident_bytes == 4000
    assert swapper.live_entries() == 0 and runtime.budget.resident_bytes == 0
