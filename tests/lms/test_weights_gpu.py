"""Weight paging on CUDA (run by benchmarks/gpu_check.sh): pinned masters, streams, peaks.

The CPU tests run the same logic with synchronous copies; these check what only a
GPU has: fills and gradient copies on side streams guarded by events, shell
storage freed in compute-stream order, the allocator's peak, and a host-side
optimizer step next to device-side resident parameters.
"""

import copy

import pytest
import torch
from failing_backward import FailsInBackward
from torch.nn.attention import SDPBackend, sdpa_kernel

import lms
from examples.gpt import GPT, GPTConfig, synthetic_batch
from lms.weights import WeightPaging
from lms.weights_grads import GradOffload
from lms.weights_param import Where

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:.*without fused=True")]

CFG = GPTConfig(n_layer=4, n_embd=256, n_head=4, seq_len=128, vocab_size=4096)


def batch(seed=1, n=4):
    return synthetic_batch(CFG, n, torch.Generator().manual_seed(seed), device="cuda")


def grads(model, x, y):
    model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.MATH):  # deterministic backward, so bits can be compared
        loss = model(x, y)
        loss.backward()
    torch.cuda.synchronize()
    return loss.detach(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()}


def reference(model, x, y):
    """Loss and gradients without LMS, after checking that plain CUDA repeats them bitwise
    (else a bitwise failure below would be the kernels', not LMS's)."""
    want_loss, want = grads(model, x, y)
    again_loss, again = grads(model, x, y)
    assert torch.equal(want_loss, again_loss), "plain CUDA forward is not deterministic here"
    assert all(torch.equal(want[n], again[n]) for n in want), "plain CUDA backward varies"
    return want_loss, want


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def tight_limit(model):
    """The smallest limit LMS accepts for a CFG model: its largest paged module (the tied
    embedding and head) with its gradient, NOTE [Weight paging plan] Rule 5: an eighth of
    the parameter state."""
    return 2 * model.wte.weight.nbytes


def test_cuda_grads_bitwise_with_paged_weights():
    torch.manual_seed(0)
    model = GPT(CFG).cuda()
    x, y = batch()
    want_loss, want = reference(model, x, y)
    with lms.enable(model, limit=tight_limit(model), min_size="64KiB", weights=True) as handle:
        assert handle.weights is not None
        assert all(pp.master.is_pinned() for pp in handle.weights.paged)
        for _ in range(2):
            loss, got = grads(model, x, y)
            assert torch.equal(loss, want_loss)
            for n in want:
                assert torch.equal(want[n], got[n]), n
        assert handle.weights.paged[0].param.device.type == "cpu"  # between steps: host
    assert all(p.device.type == "cuda" for p in model.parameters())


@pytest.mark.parametrize("kind", ["adamw_one_step", "sgd_momentum"])
def test_cuda_training_matches_device_optimizer_closely(kind):
    # The paged parameters step on the host (CPU fused kernels), the baseline on the
    # device (CUDA fused kernels): the same maths in different kernels, so results
    # agree to rounding, not bitwise. AdamW is compared after one step: its update
    # m / sqrt(v) turns rounding-level differences of near-zero gradients into
    # lr-sized ones later on, in any two implementations. SGD stays linear in them.
    torch.manual_seed(0)
    base = GPT(CFG).cuda()
    paged = copy.deepcopy(base)
    handle = lms.enable(paged, limit=tight_limit(paged), min_size="64KiB", weights=True)
    if kind == "adamw_one_step":
        make, steps = (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)), 1
    else:
        make, steps = (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True)), 4
    ob, op = make(base.parameters()), make(paged.parameters())
    for step in range(steps):
        x, y = batch(seed=step)
        losses = []
        for model, opt in ((base, ob), (paged, op)):
            with sdpa_kernel(SDPBackend.MATH):
                loss = model(x, y)
                loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        if step == 0:
            assert losses[0] == losses[1]  # same parameters, same device kernels
    sb, sp = base.state_dict(), paged.state_dict()
    for k in sb:
        torch.testing.assert_close(sp[k].cuda(), sb[k], rtol=1e-5, atol=1e-6)
    handle.remove()


def test_peak_device_memory_far_below_parameter_state():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=8, n_embd=1024, n_head=8, seq_len=128, vocab_size=8192)
    model = GPT(cfg)  # built on the host: paged parameters never sit on the device whole
    state = 4 * param_bytes(model)  # parameters, gradients, two AdamW moments
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    handle = lms.enable(model, limit=state // 8, min_size="1MiB", weights=True, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    allocs = []
    for _ in range(3):
        x, y = synthetic_batch(cfg, 2, g, device="cuda")
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
        allocs.append(handle.stats().pinned_allocs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    assert peak < state / 3, (peak, state)
    s = handle.stats()
    # Every step fetches every paged weight for forward and again for backward (the
    # tied embedding/head matrix is read by the head's backward).
    assert s.swapped_in_bytes >= 3 * 2 * handle.weights.plan.paged_bytes, s.as_dict()
    assert allocs[1] == allocs[2], allocs  # steady state: no pinned allocation after step 1
    for pp in handle.weights.paged:  # optimizer state of paged parameters lives on the host
        assert opt.state[pp.param]["exp_avg"].device.type == "cpu"
    handle.weights.remove(to_device=False)
    handle.remove()


def test_stream_race_with_delayed_weight_copies(monkeypatch):
    # Delay every fill and every gradient copy: reading a shell before its fill
    # landed, or dropping a device gradient before its copy out finished, would
    # change the gradients.
    torch.manual_seed(0)
    model = GPT(CFG).cuda()
    x, y = batch()
    want_loss, want = reference(model, x, y)
    fetch, offload = WeightPaging._fetch, GradOffload.send

    def slow_fetch(self, pp):
        if pp.where is Where.OUT:
            with torch.cuda.stream(self.rt.transfers.h2d):
                torch.cuda._sleep(2_000_000)
        fetch(self, pp)

    def slow_offload(self, pp):
        with torch.cuda.stream(self.rt.transfers.d2h):
            torch.cuda._sleep(2_000_000)
        offload(self, pp)

    monkeypatch.setattr(WeightPaging, "_fetch", slow_fetch)
    monkeypatch.setattr(GradOffload, "send", slow_offload)
    with lms.enable(model, limit=0, min_size="64KiB", weights=True) as handle:
        for _ in range(2):
            loss, got = grads(model, x, y)
            assert torch.equal(loss, want_loss)
            for n in want:
                assert torch.equal(want[n], got[n]), n
        stats = handle.stats()
        # The delayed fills cannot have landed when forward needs them: compute waited.
        assert stats.stall_s > 0, stats.as_dict()


@pytest.mark.filterwarnings("ignore:LMS fetched paged parameter")
def test_cuda_l2_penalty_after_the_forward_reads_fetched_weights_bitwise():
    # NOTE [Guarded parameters]: on CUDA a read of released storage would be an
    # illegal address; the guard fetches the weight on the compute stream instead.
    torch.manual_seed(0)
    model = GPT(CFG).cuda()
    x, y = batch()

    def penalized(m):
        m.zero_grad(set_to_none=True)
        with sdpa_kernel(SDPBackend.MATH):
            loss = m(x, y)
            loss = loss + 1e-4 * sum(p.pow(2).sum() for p in m.parameters())
            loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), {n: p.grad.detach().cpu() for n, p in m.named_parameters()}

    want_loss, want = penalized(model)
    with lms.enable(model, limit=tight_limit(model), min_size="64KiB", weights=True) as handle:
        for _ in range(2):
            loss, got = penalized(model)
            assert torch.equal(loss, want_loss)
            for n in want:
                assert torch.equal(want[n], got[n]), n
        assert all(pp.where is Where.OUT for pp in handle.weights.paged)


def test_cuda_failed_backward_then_zero_grad_leaves_no_partial_gradient():
    # NOTE [Weight paging] Rules 13 and 18 on CUDA: backward runs on a device thread,
    # which may free the failed graph task (and with it LMS's end callback) a moment
    # after the caller sees the error. If LMS ended that backward only after the user's
    # zero_grad(), the gradients taken before the error must not come back (the CPU
    # test simulates it). Repeated, so that such a late release would happen.
    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 8)

        def forward(self, x):
            return self.b(FailsInBackward.apply(torch.tanh(self.a(x))))

    torch.manual_seed(0)
    model = Failing().cuda()
    x = torch.randn(64, 256, device="cuda")
    model(x).square().sum().backward()
    want = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with lms.enable(model, limit=0, min_size=0, weights=True) as handle:
        assert handle.weights is not None and len(handle.weights.paged) == 4
        for _ in range(20):
            FailsInBackward.fail = True
            try:
                with pytest.raises(ValueError, match="backward failed"):
                    model(x).square().sum().backward()  # b's gradients are taken, then it fails
            finally:
                FailsInBackward.fail = False
            model.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            got = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
            for n in want:
                assert torch.equal(want[n], got[n]), n
            model.zero_grad(set_to_none=True)
