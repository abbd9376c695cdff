"""Weight paging under code that writes or keeps paged parameters between forward and backward.

Each test compares a model without LMS and a deep copy of it with LMS on the same data:
losses and parameters must be bitwise equal, and the pager must end every step in phase
HOST with nothing resident and every parameter an exact ``nn.Parameter`` again.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from paged_twins import MLP, enable_paging, twins
from torch import nn

import lms
from lms.weights_param import Phase

pytestmark = pytest.mark.filterwarnings("ignore:.*without fused=True")

FETCHED = "LMS fetched paged parameter"


class Renormed(nn.Module):
    """``nn.Embedding(max_norm=...)`` rescales rows of its weight in place in its forward."""

    def __init__(self, vocab=32, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, max_norm=1.0)
        self.out = nn.Linear(d, vocab)

    def forward(self, idx):
        return self.out(self.emb(idx))


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 16, generator=g), torch.randint(4, (8,), generator=g)) for _ in range(n)
    ]


def tokens(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(32, (8,), generator=g), torch.randint(32, (8,), generator=g))] * n


def assert_same(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), (name, (p - q).abs().max().item())


def assert_between_steps(handle, model):
    assert handle.weights.phase is Phase.HOST
    assert handle.runtime.budget.resident_bytes == 0
    assert all(type(p) is nn.Parameter for p in model.parameters())


def run(model, steps, between=None):
    """SGD steps; ``between(model)`` runs after each forward, before its backward."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in steps:
        loss = F.cross_entropy(model(x), y)
        if between is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the guard's fetch warning
                between(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def assert_runs_match(base, paged, handle, between):
    """Three steps of each with ``between``: same losses and parameters, pager back in HOST."""
    losses = [run(m, data(3), between) for m in (base, paged)]
    assert all(torch.equal(a, b) for a, b in zip(*losses))
    assert_same(base, paged)
    assert_between_steps(handle, paged)


def test_a_module_that_writes_its_weight_in_forward_keeps_the_write():
    # nn.Embedding(max_norm=...) renormalizes the rows it looks up in place. Was: the
    # write landed in the device shell only and was dropped when the shell was
    # released, so training diverged silently (max abs difference 3.4 after 3 steps).
    base, paged = twins(Renormed)
    handle = enable_paging(paged)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", FETCHED)  # its own write fetches nothing extra
        losses = [run(m, tokens(3)) for m in (base, paged)]
    assert all(torch.equal(a, b) for a, b in zip(*losses))
    assert_same(base, paged)
    assert_between_steps(handle, paged)


@pytest.mark.parametrize(
    "write",
    [
        lambda m: m.head.bias.mul_(0.5),  # in place on the released (guarded) parameter
        lambda m: m.head.bias.detach().zero_(),  # through an alias sharing its version
        lambda m: m.head.bias.data.add_(1.0),  # through .data, which shares no version
        lambda m: m.head.bias.__setitem__(0, 3.0),
    ],
    ids=["mul_", "detach", "data", "setitem"],
)
def test_a_write_between_forward_and_backward_reaches_the_step(write):
    # The bias is not saved for backward, so plain PyTorch allows the write and the
    # step starts from the written values. Was: lost with the released shell.
    def between(model):
        with torch.no_grad():
            write(model)

    base, paged = twins(MLP)
    assert_runs_match(base, paged, enable_paging(paged), between)


def test_state_dict_and_deepcopy_after_a_write_between_forward_and_backward():
    # Both read the masters in phase DEVICE (NOTE [Weight paging] Rule 12); a write to
    # the resident shell must be visible to them as it is without LMS.
    base, paged = twins(MLP)
    enable_paging(paged)
    x, y = data(1)[0]
    seen = {}
    for model in (base, paged):
        loss = F.cross_entropy(model(x), y)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model.head.bias.mul_(0.5)
        seen[model] = (model.state_dict(), copy.deepcopy(model.head))
        loss.backward()
    (sd, head), (paged_sd, paged_head) = seen[base], seen[paged]
    assert all(torch.equal(v, paged_sd[k]) for k, v in sd.items())
    assert torch.equal(head.bias, paged_head.bias)


@pytest.mark.parametrize(
    "take",
    [
        lambda w: w.detach(),
        lambda w: w.data,
        lambda w: w[1],
        lambda w: w.T,
        lambda w: w.detach()[2:],  # a view of an alias
    ],
    ids=["detach", "data", "index", "T", "view_of_detach"],
)
def test_an_alias_taken_between_forward_and_backward_is_refused_after_the_step(take):
    # Without LMS the alias would show the stepped values; with LMS its device memory
    # is released when the backward ends. Was: a segmentation fault when read.
    base, paged = twins(MLP)
    handle = enable_paging(paged)
    x, y = data(1)[0]
    kept = {}
    for model in (base, paged):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = F.cross_entropy(model(x), y)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            alias = take(model.layers[1].weight)
            kept[model] = (alias, alias.clone())
        assert torch.equal(*kept[model])  # read in the window: the real values
        loss.backward()
        opt.step()
    assert torch.equal(kept[base][1], kept[paged][1])
    alias = kept[paged][0]
    assert alias.shape == kept[base][0].shape  # metadata stays readable
    with pytest.raises(lms.LMSError, match=r"\.clone\(\)"):
        alias.sum()
    with pytest.raises(lms.LMSError):
        repr(alias)
    assert_same(base, paged)
    assert_between_steps(handle, paged)


@pytest.mark.parametrize("read_in", ["window", "prefetch"])
def test_an_alias_kept_into_a_later_step_reads_the_current_values_in_its_window(read_in):
    # An alias taken in one step's window and read in a later one's: the parameter is
    # guarded again (shell out, or being filled by a prefetch of the learned order), and
    # the read is fetched like a read of the parameter. Was: LMSError while out, and
    # while filling a read that did not wait for the copy (stale values on a GPU).
    base, paged = twins(MLP)
    handle = enable_paging(paged)
    batches = data(3)
    got = {base: [], paged: []}
    pager = handle.weights
    pp = next(q for q in pager.paged if q.name == "layers.1.weight")
    filling, kept = [], {}

    def read(module, args, output):
        model = paged if module is paged.layers[0] else base
        if model is paged:  # layers.1 comes next: its prefetch is in flight
            filling.append(pp.where.name)
        got[model].append(kept[model].sum())
        assert model is base or pp.where.name == "RESIDENT"  # waited for the fill

    for model in (base, paged):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        hook = None
        for i, (x, y) in enumerate(batches):
            if i == 2 and read_in == "prefetch":
                hook = model.layers[0].register_forward_hook(read)
            loss = F.cross_entropy(model(x), y)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                if model not in kept:
                    kept[model] = model.layers[1].weight.detach()
                elif read_in == "window":
                    got[model].append(kept[model].sum())  # layers.1 is released here: out
            loss.backward()
            opt.step()
            opt.zero_grad()
        if hook is not None:
            hook.remove()
    assert len(got[paged]) == len(got[base]) > 0
    assert all(torch.equal(a, b) for a, b in zip(got[base], got[paged]))
    assert filling == ([] if read_in == "window" else ["FILLING"])
    assert_same(base, paged)
    assert_between_steps(handle, paged)


@pytest.mark.parametrize("take", [lambda b: b.data, lambda b: b.data[1:]], ids=["data", "view"])
def test_a_write_through_a_data_alias_in_a_later_window_reaches_the_step(take):
    # ``.data`` taken in one step's window and written in place in a later one's (the
    # bias is not saved for backward, so plain PyTorch allows it): the write moves no
    # version counter, so the fetch it triggers must count as a ``.data`` read (NOTE
    # [Weight paging] Rule 17). Was: the write went to the shell only, and was lost.
    base, paged = twins(MLP)
    handle = enable_paging(paged)
    kept = {}
    for model in (base, paged):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in data(3):
            loss = F.cross_entropy(model(x), y)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                if model not in kept:
                    kept[model] = take(model.head.bias)
                else:
                    kept[model].add_(1.0)
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert_same(base, paged)
    assert_between_steps(handle, paged)


def test_numpy_of_a_parameter_between_forward_and_backward():
    # Logging a histogram: ``p.detach().cpu().numpy()``. On the CPU ``.cpu()`` is the
    # shell itself and numpy made its storage non-resizable. Was: "Trying to resize
    # storage that is not resizable" from the backward, the pager left in phase DEVICE.
    base, paged = twins(MLP)
    handle = enable_paging(paged)
    logged = {base: [], paged: []}

    def between(model):
        for p in model.parameters():
            logged[model].append(p.detach().cpu().numpy().copy())

    assert_runs_match(base, paged, handle, between)
    assert all((a == b).all() for a, b in zip(logged[base], logged[paged]))


def test_deepcopy_of_an_alias_taken_between_forward_and_backward():
    _, paged = twins(MLP)
    enable_paging(paged)
    x, y = data(1)[0]
    loss = F.cross_entropy(paged(x), y)
    with pytest.warns(UserWarning, match=FETCHED):
        alias = paged.layers[0].weight.detach()
    one = copy.deepcopy(alias)
    assert type(one) is torch.Tensor and torch.equal(one, alias)
    loss.backward()
    assert torch.equal(one, paged.layers[0].weight)  # no step: the same values
    with pytest.raises(lms.LMSError):
        copy.deepcopy(alias)


def test_a_sparse_copy_of_a_parameter_between_forward_and_backward():
    # A result without a storage of its own cannot alias the shell (Rule 5 asks each result).
    base, paged = twins(MLP)
    enable_paging(paged)
    got = {}
    for model in (base, paged):
        x, y = data(1)[0]
        loss = F.cross_entropy(model(x), y)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            got[model] = model.layers[0].weight.detach().to_sparse().to_dense()
        loss.backward()
    assert torch.equal(got[base], got[paged])


def test_more_metadata_reads_fetch_nothing():
    # NOTE [Guarded parameters] Rule 3: flags about the tensor, not its values.
    _, paged = twins(MLP)
    enable_paging(paged)
    x, y = data(1)[0]
    loss = F.cross_entropy(paged(x), y)
    w = paged.layers[1].weight
    with warnings.catch_warnings():
        warnings.filterwarnings("error", FETCHED)
        flags = (w.is_pinned(), w.is_shared(), w.is_inference(), w.is_neg(), w.is_conj())
        assert flags == (False, False, False, False, False)
        assert (w.is_signed(), w.retains_grad, w.is_mkldnn, w.dim_order()) == (
            True,
            False,
            False,
            (0, 1),
        )
        assert w.__dlpack_device__()[1] == 0
        assert w._base is None and torch.equal(w.new_tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    assert type(w) is not nn.Parameter  # still guarded: nothing was fetched
    loss.backward()
