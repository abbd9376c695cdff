"""Weight paging's accelerator code path, run on the CPU against a recording stand-in.

On CUDA the fills of paged parameters run on the h2d stream and the gradient
copies on the d2h stream, guarded by events (NOTE [Weight paging] Rule 6). None of
that runs in CI on its own, since the CPU's streams are no-ops. Here the same code
runs against the recording stand-in of tests/lms/recording_streams.py (streams log
what they were asked to wait for; events report "not done" until queried twice or
synchronized), so the ordering rules are checked without a GPU; the copies
themselves are CPU copies, so the values must match plain training bit for bit.
"""

import pytest
import torch
from recording_streams import accelerate

import lms
from examples.gpt import GPT, GPTConfig, synthetic_batch

pytestmark = pytest.mark.filterwarnings("ignore:.*without fused=True")

# Activations of one 8-token sequence stay under min_size; every weight matrix is over it.
CFG = GPTConfig(vocab_size=256, seq_len=8, n_layer=2, n_head=4, n_embd=64)
MIN_SIZE = 16 * 1024


def records(stream):
    return [e for kind, e in stream.log if kind == "record"]


def test_weight_copies_follow_the_stream_rules_and_match_plain_training():
    torch.manual_seed(0)
    plain = GPT(CFG)
    paged = GPT(CFG)
    paged.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    data = [synthetic_batch(CFG, 1, g) for _ in range(3)]
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    handle = lms.enable(paged, limit=0, min_size=MIN_SIZE, weights=True)
    t = accelerate(handle)
    opt_paged = torch.optim.SGD(paged.parameters(), lr=0.1, momentum=0.9)
    pager = handle.weights
    assert pager is not None and len(pager.paged) >= 8

    for i, (x, y) in enumerate(data):
        for model, opt in ((plain, opt_plain), (paged, opt_paged)):
            loss = model(x, y)
            if i != 1:
                loss.backward()
            # i == 1: a skipped batch (a bad loss, say). The fills LMS issued for a
            # backward that never comes are released unused when the step begins.
            opt.step()
            opt.zero_grad()
        # Backward has ended: every gradient copy was reported done before LMS let
        # go of its device gradient, and nothing is still pending.
        assert pager.grads.pending == []
        assert all(e.left == 0 for e in records(t.d2h))

    # Fills: the h2d stream waits for compute before every fill (the shell's memory
    # was allocated, and may have been used, in compute order) ...
    fills = records(t.h2d)
    assert fills and handle.stats().swap_ins >= len(fills)
    last = None
    for kind, e in t.h2d.log:
        if kind == "record":
            assert last == ("wait_stream", t.mod.compute), "fill without waiting for compute"
        if kind != "synchronize":
            last = (kind, e)
    # ... and compute waits on every fill's event before it reads the shell or frees
    # it (no fill is reported done before its first query here).
    waited = {id(e) for kind, e in t.mod.compute.log if kind == "wait_event"}
    assert all(id(e) in waited for e in fills)
    # Gradient copies: the d2h stream waits for compute (the gradient was just made).
    grads = records(t.d2h)
    assert len(grads) == 2 * sum(pp.param.requires_grad for pp in pager.paged)
    last = None
    for kind, e in t.d2h.log:
        if kind == "record":
            assert last == ("wait_stream", t.mod.compute), "gradient copy before compute"
        if kind != "synchronize":
            last = (kind, e)
    # Entering the host phase synchronizes both copy streams once per step, before the
    # optimizer reads the accumulators and writes the masters.
    assert sum(kind == "synchronize" for kind, _ in t.h2d.log) >= 3
    assert sum(kind == "synchronize" for kind, _ in t.d2h.log) >= 3

    for a, b in zip(plain.parameters(), paged.parameters(), strict=True):
        assert torch.equal(a, b)
    handle.remove()
