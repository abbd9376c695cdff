"""CUDA checks (run by benchmarks/gpu_check.sh; skipped without CUDA).

With one GPU only one NCCL rank can run, so these check the stream logic rather than the
network: the collective runs on ddl's communication stream, and whatever the caller reads
after ``wait()`` / ``backward()`` must be ordered after it. The race test delays the
communication stream on purpose and changes the values there, so a missing stream wait
shows up as stale gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from ddl_harness import run_ranks

import ddl

pytestmark = pytest.mark.gpu


def _delayed_comm_stream():
    import ddl.buckets as buckets
    import ddl.collectives as collectives

    real = buckets.allreduce_flat

    def slow_then_double(flat, *args, **kwargs):
        torch.cuda._sleep(200_000_000)  # hundreds of ms on the communication stream
        real(flat, *args, **kwargs)
        flat.mul_(2)  # visible only if the caller waits for this stream

    buckets.allreduce_flat = collectives.allreduce_flat = slow_then_double
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()
    ref = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(32, 256, device="cuda")
    # Local gradients, without ddl.
    ref_model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()
    for p, r in zip(ref_model.parameters(), ref):
        p.data.copy_(r)
    ref_model(x).square().mean().backward()
    expect = [2 * p.grad for p in ref_model.parameters()]
    seen = []
    handle = ddl.wrap(
        model, bucket_size="64KiB", algorithm="ring", grad_ready=lambda ps: seen.extend(ps)
    )
    model(x).square().mean().backward()
    ok = all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expect))
    t = torch.ones(1 << 20, device="cuda")
    h = ddl.allreduce_async(t, algorithm="native")
    out = h.wait()
    t_ok = bool((out == 2).all())  # doubled on the delayed stream, ordered by wait()
    handle.remove()
    buckets.allreduce_flat = collectives.allreduce_flat = real
    return ok, t_ok, len(seen) == len(list(model.parameters()))


def test_streams_order_results_after_a_delayed_communication_stream():
    # This file runs first in gpu_check's 120 s pytest step: a hung NCCL start must fail
    # here well before that (the default deadline is the whole step), leaving time for
    # the lms tests. Starting the rank takes seconds.
    [(grads_ok, allreduce_ok, all_seen)] = run_ranks(
        _delayed_comm_stream, 1, backend="nccl", deadline_s=45
    )
    assert grads_ok, "backward() returned before the communication stream's results"
    assert all_seen
    assert allreduce_ok
