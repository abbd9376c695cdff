"""The asynchronous paths on the CPU: copies whose events complete late.

On the CPU every copy is done when it returns, so the states a GPU goes through
(copies out still in flight when backward starts, prefetches still in flight when
a graph is dropped, the host throttled by copies in flight) never occur. Here the
copy events report "not done" for a while, as a slow link would, and every
invariant must still hold: bitwise gradients, nothing leaked, bytes accounted.
"""

import pytest
import torch

import lms
from examples.gpt import GPT, GPTConfig, synthetic_batch
from lms.transfer import Transfers


class LaggingEvent:
    """An event that reports itself done only after ``lag`` queries (or a synchronize)."""

    def __init__(self, lag):
        self.left = lag

    def record(self, stream=None):
        pass

    def query(self):
        if self.left > 0:
            self.left -= 1
            return False
        return True

    def synchronize(self):
        self.left = 0


@pytest.fixture
def slow_link(monkeypatch):
    made = []

    def new_event(self, timing=False):
        made.append(LaggingEvent(lag=4))
        return made[-1]

    monkeypatch.setattr(Transfers, "new_event", new_event)
    return made


def small_gpt():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=4, seq_len=32, vocab_size=256)
    model = GPT(cfg)
    x, y = synthetic_batch(cfg, 4, torch.Generator().manual_seed(1))
    return model, x, y


def grads(model, x, y):
    model.zero_grad(set_to_none=True)
    model(x, y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("limit", [0, 128 * 1024])
def test_parity_and_clean_accounting_with_late_copies(slow_link, limit):
    model, x, y = small_gpt()
    want = grads(model, x, y)
    with lms.enable(model, limit=limit, min_size=0, weights=False) as handle:
        for _ in range(2):
            got = grads(model, x, y)
            assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        swapper = handle.activations
        swapper.drain()
        stats = handle.stats()
        assert swapper.live_entries() == 0
        assert stats.resident_bytes == 0 and handle.runtime.budget.leaving_bytes == 0
        assert handle.runtime.pool.in_use_bytes == 0
    assert slow_link  # the lagging events were really used
    # Entries still on their way out when backward needed them were used from the
    # device: fewer copies came back than went out.
    if limit == 0:
        assert stats.swap_ins < stats.swap_outs


def test_copies_in_flight_are_bounded(slow_link):
    model, x, y = small_gpt()
    with lms.enable(model, limit=0, min_size=0, weights=False) as handle:
        swapper = handle.activations
        worst = []
        admit = swapper._admit

        def watch(entry):
            admit(entry)
            worst.append(swapper._outgoing_bytes - entry.nbytes)

        swapper._admit = watch
        model(x, y).backward()
        # limit 0: after each save, no more than that one tensor's bytes in flight.
        assert max(worst) <= 0 and handle.stats().swap_outs > 0


def test_a_graph_dropped_with_prefetches_in_flight_leaks_nothing(slow_link):
    model, x, y = small_gpt()
    with lms.enable(model, limit=0, min_size=0, weights=False, lookahead=4) as handle:
        swapper = handle.activations
        loss = model(x, y)
        swapper.drain()
        # Unpack one saved tensor by hand, which starts prefetches, then drop the graph.
        node = loss.grad_fn
        while not any(name.startswith("_saved") for name in dir(node)):
            node = node.next_functions[0][0]
        name = next(n for n in dir(node) if n.startswith("_saved") and "self" in n)
        getattr(node, name)
        assert swapper._prefetched
        del loss, node
        swapper.drain()
        assert swapper.live_entries() == 0 and not swapper._graveyard
        assert handle.stats().resident_bytes == 0
        assert handle.runtime.pool.in_use_bytes == 0
