"""GPU checks (run by benchmarks/gpu_check.sh): the allocator's peak, copy-stream races.

On CUDA the limit is compared with the allocator's ``memory_allocated``, copies
run on side streams, and device memory is freed on events; none of that is
exercised by the CPU tests, so it is checked here.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import lms
from examples.gpt import GPT, GPTConfig, synthetic_batch
from lms.transfer import Transfers

pytestmark = pytest.mark.gpu


def gpt_on_cuda(n_layer=4, n_embd=256, seq_len=256, batch=8):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=4, seq_len=seq_len, vocab_size=4096)
    model = GPT(cfg).cuda()
    x, y = synthetic_batch(cfg, batch, torch.Generator().manual_seed(1), device="cuda")
    return model, x, y


def grads(model, x, y):
    model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.MATH):  # deterministic backward, so bits can be compared
        model(x, y).backward()
    torch.cuda.synchronize()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("limit", [0, 0.5])
def test_cuda_grads_bitwise(limit):
    model, x, y = gpt_on_cuda()
    want = grads(model, x, y)
    assert all(torch.equal(a, b) for a, b in zip(want, grads(model, x, y), strict=True))
    if limit:  # half of what the step needs beyond the weights and gradients
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads(model, x, y)
        limit = int(base + (torch.cuda.max_memory_allocated() - base) * limit)
    with lms.enable(model, limit=limit, min_size=0, weights=False) as handle:
        for _ in range(2):
            got = grads(model, x, y)
            assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert handle.stats().swap_outs > 0


def test_cuda_bf16_autocast_recast_casts_bitwise():
    # Under autocast the weights' bf16 casts are dropped and cast again in backward
    # (NOTE [Activation swapping] Rule 10), on the compute stream of autograd's
    # device thread: the gradients must still match to the bit.
    model, x, y = gpt_on_cuda()

    def autocast_grads():
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(SDPBackend.MATH):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, y)
            loss.backward()  # outside autocast, as recommended: its cache is gone here
        torch.cuda.synchronize()
        return [p.grad.clone() for p in model.parameters()]

    want = autocast_grads()
    assert all(torch.equal(a, b) for a, b in zip(want, autocast_grads(), strict=True))
    with lms.enable(model, limit=0, min_size=0, weights=False) as handle:
        for _ in range(2):
            got = autocast_grads()
            assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    stats = handle.stats()
    assert stats.recasts > 0 and stats.swap_outs > 0, stats.as_dict()


def test_stream_race_with_delayed_copy_streams(monkeypatch):
    # Delay both copy streams so every copy lands long after compute has moved on.
    # Freeing a device buffer before its copy out finished, or reading one before
    # its copy in finished, would show up as different gradients.
    model, x, y = gpt_on_cuda()
    want = grads(model, x, y)
    to_host, to_device = Transfers.to_host, Transfers.to_device

    def slow_to_host(self, src, block):
        with torch.cuda.stream(self.d2h):
            torch.cuda._sleep(2_000_000)
        return to_host(self, src, block)

    def slow_to_device(self, block, nbytes):
        with torch.cuda.stream(self.h2d):
            torch.cuda._sleep(2_000_000)
        return to_device(self, block, nbytes)

    monkeypatch.setattr(Transfers, "to_host", slow_to_host)
    monkeypatch.setattr(Transfers, "to_device", slow_to_device)
    with lms.enable(model, limit=0, min_size=0, weights=False) as handle:
        for _ in range(2):
            got = grads(model, x, y)
            assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        stats = handle.stats()
    assert stats.swap_outs > 0 and stats.stall_s > 0, stats.as_dict()


def test_allocator_peak_within_limit_plus_largest_tensor():
    model, x, y = gpt_on_cuda(n_layer=6, n_embd=512, seq_len=512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: part of the floor
        model(x, y).backward()
        opt.step()

    step()
    torch.cuda.synchronize()
    floor = torch.cuda.memory_allocated()  # weights, gradients, optimizer state
    torch.cuda.reset_peak_memory_stats()
    step()
    peak_plain = torch.cuda.max_memory_allocated()
    for fraction in (0.25, 0.6):
        limit = int(floor + (peak_plain - floor) * fraction)
        with lms.enable(model, limit=limit, min_size="64KiB", weights=False) as handle:
            # Two warm-up steps: the first learns the reserve (the largest tensor, the
            # loss's log-softmax, is saved only at the end of its forward), so it evicts
            # and pins by other decisions than every later step.
            step()
            step()
            torch.cuda.synchronize()
            handle.reset_stats()  # also resets the allocator's peak
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            stats = handle.stats()
            largest = handle.activations._largest
        print(f"limit {limit / 2**20:.0f} MiB peak {stats.peak_device_bytes / 2**20:.0f} MiB "
              f"plain {peak_plain / 2**20:.0f} MiB largest {largest / 2**20:.0f} MiB "
              f"stall {stats.stall_s * 1e3:.1f} ms")  # fmt: skip
        assert stats.swap_outs > 0, stats.as_dict()
        assert stats.peak_device_bytes <= limit + largest, (limit, largest, stats.as_dict())
        assert stats.pinned_allocs == 0, stats.as_dict()  # steady state: the pool is reused


def test_cuda_oom_in_forward_becomes_lms_error():
    class Hungry(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x) + torch.empty(1 << 50, dtype=torch.uint8, device="cuda").sum()

    model = Hungry().cuda()
    with lms.enable(model, limit=0, weights=False), pytest.raises(lms.LMSError, match="min_size"):
        model(torch.randn(2, 8, device="cuda"))


def test_limit_larger_than_the_device_is_refused():
    model = torch.nn.Linear(8, 8).cuda()
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(lms.LMSError, match="larger than the device"):
        lms.enable(model, limit=total + 1)


def test_pool_pins_exact_sizes_and_frees_them():
    from lms.pool import ALIGN, HostPool

    pool = HostPool(cap=1 << 30, pin=True, stats=lms.Stats())
    n = (1 << 20) + 1  # just over a power of two: the caching host allocator would take 2 MiB
    block = pool.acquire(n)
    assert block.buf.is_pinned() and block.capacity == (1 << 20) + ALIGN
    dev = torch.arange(n, dtype=torch.uint8, device="cuda")
    block.view(n).copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(block.view(n).cuda(), dev)
    pool.release(block)
    assert pool.trim() == block.capacity and pool.held_bytes == 0
