"""The accelerator code path of the copies, run on the CPU against a recording stand-in.

The CUDA branch of ``lms.transfer.Transfers`` (side streams, events, waits, stall
timing) only runs on a GPU. Here it runs against the recording stand-in of
tests/lms/recording_streams.py, so the ordering rules of NOTE [Copy ordering] are
checked in CI; the copies themselves are CPU copies.
"""

import torch
from recording_streams import accelerate, accelerator_transfers

import lms
from examples.gpt import GPT, GPTConfig, synthetic_batch
from lms.pool import HostBlock
from lms.stats import Stats


def test_copy_ordering_rules():
    stats = Stats()
    t = accelerator_transfers(stats)
    block = HostBlock(torch.empty(64, dtype=torch.uint8), 0)
    src = torch.arange(64, dtype=torch.uint8)

    out = t.to_host(src, block)
    # Rule 1: the copy stream waits for compute before reading what compute produced.
    assert t.d2h.log[0] == ("wait_stream", t.mod.compute)
    assert t.d2h.log[-1] == ("record", out.event) and block.last_event is out.event
    assert torch.equal(out.tensor, src) and stats.swap_outs == 1

    back = t.to_device(block, 64)
    # Rule 2: the h2d stream waits for compute (recycled memory) and the block's writer.
    assert t.h2d.log[:2] == [("wait_stream", t.mod.compute), ("wait_event", out.event)]
    assert t.h2d.log[-1] == ("record", back.event)

    # Rule 3: the compute stream, not the host, waits; the wait is timed as a stall.
    assert t.wait(back) is back.tensor
    kinds = [k for k, _ in t.mod.compute.log]
    assert kinds == ["record", "wait_event", "record"]
    assert t.mod.compute.log[1] == ("wait_event", back.event)
    t.collect_stalls(block=True)
    assert stats.stall_s > 0 and not t._timings
    assert torch.equal(back.tensor, src) and stats.swap_ins == 1

    # A copy already done costs no wait and no timing events.
    done = t.to_device(block, 64)
    done.event.left = 0
    t.mod.compute.log.clear()
    t.wait(done)
    assert t.mod.compute.log == []


def test_gpt_parity_through_the_accelerator_path():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=4, seq_len=32, vocab_size=256)
    model = GPT(cfg)
    x, y = synthetic_batch(cfg, 4, torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad(set_to_none=True)
        model(x, y).backward()
        return [p.grad.clone() for p in model.parameters()]

    want = grads()
    for limit in (0, 96 * 1024):
        with lms.enable(model, limit=limit, min_size=0, weights=False) as handle:
            accelerate(handle)
            for _ in range(2):
                assert all(torch.equal(a, b) for a, b in zip(want, grads(), strict=True))
            handle.activations.drain()
            stats = handle.stats()
            assert stats.swap_outs > 0 and stats.resident_bytes == 0
            assert handle.activations.live_entries() == 0
