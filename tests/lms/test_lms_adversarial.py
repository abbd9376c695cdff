"""Adversarial checks: autograd corner cases that LMS must not get silently wrong.

Each test runs the same step with and without LMS and asserts bitwise equal
results, or, where PyTorch raises without LMS, the same error with it. Saved-
tensor hooks switch off some of autograd's own checks (the in-place version
check among them), so LMS has to keep those promises itself.
"""

import copy
import gc
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from failing_backward import FailsInBackward
from torch import nn
from torch.utils.checkpoint import checkpoint

import lms

# 0 sends everything out at once; 48 KiB keeps the newest few and evicts older ones
# later (copies taken after more of the forward has run); 1 GiB moves nothing (run
# where the tensors LMS keeps, not the ones it moves, are what is attacked).
LIMITS = [0, 48 * 1024, "1GiB"]
SWAPPING = [0, 48 * 1024]
INPLACE_ERROR = "modified by an inplace operation"


@pytest.fixture(autouse=True)
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def same(want, got):
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def parity(make, step, limit, **kw):
    """Run ``step(model)`` on two equal models, without and with LMS; returns both results."""
    want_model, lms_model = make(), make()
    want = step(want_model)
    with lms.enable(lms_model, limit=limit, min_size=0, weights=False, **kw) as handle:
        got = step(lms_model)
        assert_clean_after_step(handle)
    return want, got, handle


def backward_step(model):
    """One plain step for ``parity``: forward on ``data()``, backward, the gradients."""
    model(data()).backward()
    return grads(model)


def assert_clean_after_step(handle):
    handle.activations.drain()  # copies out still in flight are reaped lazily, by design
    assert handle.activations.live_entries() == 0
    assert handle.stats().resident_bytes == 0
    assert handle.runtime.pool.in_use_bytes == 0


class MLP(nn.Module):
    def __init__(self, width=64, depth=3):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def data(rows=64, width=64, seed=1):
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


# -- in-place modification of saved tensors ----------------------------------


class ModifiesSaved(nn.Module):
    """Saves a tensor (sigmoid saves its output), then modifies it in place."""

    def __init__(self, where):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 64)
        self.where = where

    def forward(self, x):
        h = torch.sigmoid(self.lin(x))
        if self.where == "forward":
            h.mul_(2)
        return h


@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("where", ["forward", "after"])
def test_inplace_on_a_saved_tensor_raises_as_without_lms(limit, where):
    # Saved-tensor hooks turn off autograd's version check; LMS must do it instead.
    for use_lms in (False, True):
        model = ModifiesSaved(where)
        handle = lms.enable(model, limit=limit, min_size=0, weights=False) if use_lms else None
        out = model(data())
        if where == "after":
            out.add_(1)  # the user modifies the returned (and saved) tensor
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            out.sum().backward()
        if handle is not None:
            del out
            assert_clean_after_step(handle)
            handle.remove()


@pytest.mark.parametrize("limit", LIMITS)
def test_inplace_under_no_grad_between_forward_and_backward_raises(limit):
    for use_lms in (False, True):
        model = ModifiesSaved("none")
        handle = lms.enable(model, limit=limit, min_size=0, weights=False) if use_lms else None
        out = model(data())
        with torch.no_grad():
            out.view(-1)[0] = 0.0  # through a view: one version counter for all views
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            out.sum().backward()
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("limit", LIMITS)
@pytest.mark.parametrize("target", ["weight", "small_activation"])
def test_inplace_on_a_saved_tensor_lms_does_not_move_raises(limit, target):
    # Parameters (and tensors below min_size) are never moved, but the hooks still
    # switch autograd's check off for them: LMS must check those too (Rule 8).
    for use_lms in (False, True):
        model = ModifiesSaved("none")
        min_size = 1 << 30 if target == "small_activation" else 0
        handle = (
            lms.enable(model, limit=limit, min_size=min_size, weights=False) if use_lms else None
        )
        out = model(data().requires_grad_())  # so that linear saves its weight
        with torch.no_grad():
            if target == "weight":
                model.lin.weight.add_(1)  # e.g. an optimizer step before backward
            else:
                out.mul_(2)
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            out.sum().backward()
        if handle is not None:
            handle.remove()


class UnsafeChunks(nn.Module):
    """What GRU and LSTM cells do: ``unsafe_chunk`` views of one storage each have
    their own version counter, and one chunk is written in place after another
    chunk was saved (NOTE [Activation swapping] Rule 3)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 3 * 64)

    def forward(self, x):
        a, b, c = self.lin(x).unsafe_chunk(3, 1)
        a = a.sigmoid_()  # saves chunk a
        b = b.add_(1).tanh_()  # writes chunk b in place after a was saved; saves it
        return (a * b + c).sum()


@pytest.mark.parametrize("limit", LIMITS)
def test_unsafe_chunks_of_one_storage_keep_their_own_values(limit):
    want, got, handle = parity(UnsafeChunks, backward_step, limit)
    same(want, got)


class ModifiesViewsThenDrops(nn.Module):
    """In-place ops on views after a view's result was saved; every tensor of the
    family is gone by backward, only autograd (and LMS) still hold the storage."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        h = self.lin(x)
        h[:, :16].relu_()  # saves the view's result at version 1
        h[8:].mul_(2)  # version 2, through another view
        return h.sum()


@pytest.mark.parametrize("limit", LIMITS)
def test_inplace_through_another_view_of_a_dead_family_raises(limit):
    for use_lms in (False, True):
        model = ModifiesViewsThenDrops()
        handle = lms.enable(model, limit=limit, min_size=0, weights=False) if use_lms else None
        loss = model(data())
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            loss.backward()
        if handle is not None:
            handle.remove()


class SaveModifySave(nn.Module):
    """One storage saved, modified in place, then saved again at its new version.

    The first save is only needed for ``aux``, which the loss never uses, so
    PyTorch does not complain; the second save must see the modified values.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        h = self.lin(x)
        aux = h * h  # saves h at version 0
        big = torch.tanh(self.lin(x))  # later tensors push h out under a small limit
        h.mul_(3)  # version 1
        out = h * self.lin.weight.sum()  # saves h again, at version 1
        return out + big, aux


@pytest.mark.parametrize("limit", LIMITS)
def test_a_storage_saved_again_after_an_inplace_change_uses_the_new_values(limit):
    def step(model):
        out, aux = model(data())
        out.sum().backward()
        return grads(model)

    want, got, _ = parity(SaveModifySave, step, limit)
    same(want, got)


# -- shapes of forward and backward --------------------------------------------


class Outputs(nn.Module):
    """Returns a dict holding a tuple, a view of the input, and two heads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = MLP()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)

    def forward(self, x):
        h = self.body(x)
        return {"heads": (torch.tanh(self.a(h)), torch.sigmoid(self.b(h))), "view": x.t()[:3]}


@pytest.mark.parametrize("limit", SWAPPING)
def test_dict_and_tuple_outputs_and_backward_through_one_head_then_the_other(limit):
    def step(model):
        x = data().requires_grad_()
        out = model(x)
        a, b = out["heads"]
        a.sum().backward(retain_graph=True)  # only part of the graph
        first = {**grads(model), "x": x.grad.clone()}
        (b.sum() + out["view"].sum()).backward()
        return first, {**grads(model), "x": x.grad.clone()}

    (want1, want2), (got1, got2), _ = parity(Outputs, step, limit)
    same(want1, got1)
    same(want2, got2)


@pytest.mark.parametrize("limit", SWAPPING)
def test_autograd_grad_for_some_inputs_then_backward_with_retain_graph(limit):
    def step(model):
        x = data().requires_grad_()
        loss = model(x).pow(2).sum()
        (gx,) = torch.autograd.grad(loss, x, retain_graph=True)
        (gw,) = torch.autograd.grad(loss, model.layers[2].weight, retain_graph=True)
        loss.backward(retain_graph=True)
        loss.backward()
        return {"gx": gx, "gw": gw, **grads(model)}

    want, got, _ = parity(MLP, step, limit)
    same(want, got)


@pytest.mark.parametrize("limit", SWAPPING)
def test_double_backward_gradient_penalty(limit):
    def step(model):
        x = data().requires_grad_()
        out = model(x).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        (out + gx.pow(2).sum()).backward()
        return grads(model)

    want, got, _ = parity(MLP, step, limit)
    same(want, got)


class GradInsideForward(nn.Module):
    """A physics-informed style model: its forward differentiates its own output."""

    def __init__(self):
        super().__init__()
        self.net = MLP()

    def forward(self, x):
        x = x.requires_grad_()
        u = self.net(x)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        return u.pow(2).mean() + du.pow(2).mean()


@pytest.mark.parametrize("limit", SWAPPING)
def test_autograd_grad_inside_the_forward(limit):
    want, got, _ = parity(GradInsideForward, backward_step, limit)
    same(want, got)


@pytest.mark.parametrize("limit", SWAPPING)
def test_several_forwards_then_one_backward_and_a_shared_module_in_a_loop(limit):
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.cell = nn.Linear(64, 64)

        def forward(self, x):
            h = x
            for _ in range(4):  # the same weights four times, like an RNN
                h = torch.tanh(self.cell(h) + x)
            return h

    def step(model):
        loss = sum(model(data(seed=s)).sum() for s in range(3))
        loss.backward()
        return grads(model)

    want, got, _ = parity(Loop, step, limit)
    same(want, got)


def test_exception_mid_forward_leaves_nothing_and_the_next_step_is_exact():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLP()
            self.fail = False

        def forward(self, x):
            h = self.net(x)
            if self.fail:
                raise ValueError("bad batch")
            return h

    def step(model):
        model.fail = True
        with pytest.raises(ValueError, match="bad batch"):
            model(data())
        model.fail = False
        model(data()).sum().backward()
        return grads(model)

    for limit in SWAPPING:
        want, got, handle = parity(Flaky, step, limit)
        same(want, got)


@pytest.mark.parametrize("limit", SWAPPING)
def test_no_grad_and_eval_forwards_between_training_forward_and_backward(limit):
    def step(model):
        out = model(data())
        with torch.no_grad():
            model(data(seed=2))
        model.eval()
        model(data(seed=3))
        model.train()
        out.sum().backward()
        return grads(model)

    want, got, _ = parity(MLP, step, limit)
    same(want, got)


def test_a_forward_where_saved_tensor_hooks_are_disabled_runs_untouched():
    want_model, model = MLP(), MLP()
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks in here"):
        want_model(data()).sum().backward()
    with lms.enable(model, limit=0, min_size=0, weights=False) as handle:
        with torch.autograd.graph.disable_saved_tensors_hooks("no hooks in here"):
            model(data()).sum().backward()
        assert handle.stats().swap_outs == 0
    same(grads(want_model), grads(model))


# -- what gets saved -------------------------------------------------------------


class Strided(nn.Module):
    """Saves transposed, expanded, overlapping, channels_last and sliced tensors."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 64)
        self.conv = nn.Conv2d(4, 4, 3, padding=1).to(memory_format=torch.channels_last)

    def forward(self, x):
        h = self.lin(x)  # (64, 64)
        t = h.t() * h.t()  # saves a transposed view twice
        e = h[:1].expand(64, 64) * h  # saves a stride-0 view
        o = h.as_strided((32, 16), (2, 1), 5).exp()  # overlapping windows, saved output
        img = h.reshape(16, 4, 8, 8).contiguous(memory_format=torch.channels_last)
        c = self.conv(img).flatten(1)[:, ::2]  # channels_last input, strided slice
        s = torch.sigmoid(h[3:40:3, 1::2])  # a strided slice with an offset
        return t.sum() + e.sum() + o.sum() + (c * c).sum() + s.pow(3).sum()


@pytest.mark.parametrize("limit", SWAPPING)
def test_strided_and_overlapping_views(limit):
    want, got, _ = parity(Strided, backward_step, limit)
    same(want, got)


class Dtypes(nn.Module):
    """Saves complex, integer and boolean tensors, and a float storage viewed as int."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 64)
        self.emb = nn.Embedding(100, 64)

    def forward(self, x):
        h = self.lin(x)
        idx = (h.detach().abs() * 1000).long() % 100  # int64 indices, saved by embedding
        mask = h.detach() > 0  # bool, saved by where
        z = torch.complex(h, h.flip(0))  # complex
        zz = (z * z.conj()).real + torch.view_as_real(z * 1j).sum(-1)
        bits = h.detach().view(torch.int32) & 0xFFFF  # another dtype's view of a storage
        g = torch.gather(h, 1, bits.long() % 64)  # saves the int64 index
        return self.emb(idx).sum() + torch.where(mask, h, -h).sum() + zz.sum() + g.sum()


@pytest.mark.parametrize("limit", SWAPPING)
def test_complex_integer_and_boolean_saves(limit):
    want, got, _ = parity(Dtypes, backward_step, limit)
    same(want, got)


class SparseAndNested(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        h = self.lin(x)
        sparse = (h.detach() * (h.detach() > 1)).to_sparse()
        s = torch.sparse.mm(sparse, h)  # saves a sparse tensor
        nt = torch.nested.nested_tensor([h[:10], h[10:30]], layout=torch.jagged)
        n = torch.nested.as_nested_tensor([h[:5].sin(), h[5:9].sin()], layout=torch.jagged)
        return s.sum() + (nt * 2).values().sum() + n.exp().values().sum()


class SavesQuantizedAndFloat8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        q = torch.quantize_per_tensor(x.detach(), 0.1, 0, torch.qint8)
        ctx.save_for_backward(q, x.detach().to(torch.float8_e5m2))
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        q, f8 = ctx.saved_tensors
        return grad * q.dequantize() + f8.float()


class Quantized(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return SavesQuantizedAndFloat8.apply(self.lin(x)).sum()


@pytest.mark.filterwarnings("ignore:.*quantize_per_tensor")  # deprecated, still in use
@pytest.mark.parametrize("limit", SWAPPING)
def test_quantized_saves_are_left_alone_and_float8_moves_bitwise(limit):
    want, got, _ = parity(Quantized, backward_step, limit)
    same(want, got)


@pytest.mark.parametrize("limit", SWAPPING)
def test_sparse_and_nested_tensors_are_left_alone(limit):
    want, got, _ = parity(SparseAndNested, backward_step, limit)
    same(want, got)


@pytest.mark.parametrize("limit", [64 * 64 * 4 - 1, 64 * 64 * 4, 64 * 64 * 4 + 1])
def test_limit_at_a_tensor_size_and_many_tensors_under_min_size(limit):
    want_model, model = MLP(), MLP()
    want_model(data()).sum().backward()
    want = grads(want_model)
    with lms.enable(model, limit=limit, min_size=0, weights=False) as handle:
        loss = model(data()).sum()
        # Forward obeys the limit exactly; backward may add the tensor in use and
        # one prefetched ahead (lookahead=1), each one (64, 64) float32 storage.
        assert handle.stats().peak_resident_bytes <= limit
        loss.backward()
        assert handle.stats().peak_resident_bytes <= limit + 2 * 64 * 64 * 4
    same(want, grads(model))
    # Every storage is under min_size: nothing moves, nothing is charged.
    model = MLP()
    with lms.enable(model, limit=limit, min_size="1MiB", weights=False) as h2:
        model(data()).sum().backward()
    assert h2.stats().swap_outs == 0 and h2.stats().peak_resident_bytes == 0
    same(want, grads(model))


@pytest.mark.parametrize("lookahead", [0, 1000])
def test_no_and_huge_lookahead(lookahead):
    def step(model):
        model(data()).sum().backward()
        return grads(model)

    want, got, _ = parity(lambda: MLP(depth=6), step, 0, lookahead=lookahead)
    same(want, got)


# -- lifetimes, threads, the handle ------------------------------------------------


def test_gc_between_forward_and_backward_and_graphs_in_cycles():
    class Cyclic(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLP()

        def forward(self, x):
            out = self.net(x)
            holder = {"out": out}
            holder["self"] = holder  # a reference cycle keeps a graph for the collector
            return out

    def step(model):
        for seed in range(2):
            model(data(seed=seed))  # dropped graphs, freed by the cycle collector later
        out = model(data())
        gc.collect()
        out.sum().backward()
        gc.collect()
        return grads(model)

    want, got, _ = parity(Cyclic, step, 48 * 1024)
    same(want, got)


def test_two_models_in_two_threads():
    def train(model, out, seed):
        for _ in range(2):
            model.zero_grad()
            model(data(seed=seed)).sum().backward()
        out[seed] = grads(model)

    want = {}
    for seed in (1, 2):
        train(MLP(depth=6), want, seed)
    models = [MLP(depth=6), MLP(depth=6)]
    handles = [lms.enable(m, limit=0, min_size=0, weights=False) for m in models]
    got = {}
    threads = [
        threading.Thread(target=train, args=(m, got, seed))
        for m, seed in zip(models, (1, 2), strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in (1, 2):
        same(want[seed], got[seed])
    for h in handles:
        assert h.stats().swap_outs > 0
        assert_clean_after_step(h)
        h.remove()


def test_one_model_trained_in_one_thread_and_evaluated_in_another():
    # The forward hooks' scope stack is per thread: forwards of two threads that
    # overlap out of order (train enters, eval enters, train leaves, eval leaves)
    # must each close their own scope.
    train_inside, eval_inside, train_done = (threading.Event() for _ in range(3))
    trainer = None

    class Pause(nn.Module):
        def forward(self, x):
            if threading.current_thread() is trainer:
                train_inside.set()
                eval_inside.wait(timeout=30)
            elif trainer is not None:
                eval_inside.set()
                train_done.wait(timeout=30)
            return x

    model, want_model = MLP(depth=6), MLP(depth=6)
    model.layers.insert(1, Pause())
    want_model.layers.insert(1, Pause())
    want_model(data()).sum().backward()
    want = grads(want_model)
    failures = []

    def train():
        try:
            out = model(data())
            train_done.set()
            out.sum().backward()
            failures.append(torch._C._autograd._top_saved_tensors_default_hooks(False))
        except BaseException as e:  # reported below, in the test's thread
            failures.append(e)
            train_done.set()

    with lms.enable(model, limit=0, min_size=0, weights=False) as handle:
        trainer = threading.Thread(target=train)
        trainer.start()
        assert train_inside.wait(timeout=30)
        with torch.no_grad():
            model(data(seed=7))  # overlaps the training forward
        trainer.join()
        assert failures == [None]  # no exception, and no hooks left on in the trainer
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        assert handle.stats().swap_outs > 0
    same(want, grads(model))


def test_enable_remove_cycles_and_the_context_manager():
    want_model = MLP()
    for _ in range(2):
        want_model(data()).sum().backward()
    want = grads(want_model)
    model = MLP()
    for i in range(2):
        handle = lms.enable(model, limit=[0, 48 * 1024][i % 2], min_size=0, weights=False)
        model(data()).sum().backward()
        handle.remove()
        with pytest.raises(lms.LMSError, match="already enabled"):
            with lms.enable(model, weights=False):
                lms.enable(model, weights=False)
    same(want, grads(model))
    assert not model._forward_pre_hooks and "forward" not in model.__dict__


@pytest.mark.parametrize("limit", SWAPPING)
def test_remove_between_forward_and_backward(limit):
    want_model, model = MLP(depth=6), MLP(depth=6)
    want_model(data()).sum().backward()
    want = grads(want_model)
    handle = lms.enable(model, limit=limit, min_size=0, weights=False)
    out = model(data())
    handle.remove()
    out.sum().backward()
    same(want, grads(model))
    assert handle.activations.live_entries() == 0
    # Blocks released after remove() are freed, not cached in a pool nobody uses.
    assert handle.runtime.pool.held_bytes == 0


def test_deepcopy_and_pickle_of_a_model_with_lms_on():
    model = MLP()
    with lms.enable(model, limit=0, min_size=0, weights=False) as handle:
        twin = copy.deepcopy(model)  # e.g. an EMA model, or the best checkpoint so far
        blob = pickle.dumps(model)  # torch.save(model) pickles the whole module
        want = model(data())
        want.sum().backward()
        swaps = handle.stats().swap_outs
        restored = pickle.loads(blob)
        for other in (twin, restored):
            out = other(data())  # the copies work, and are not managed by this handle
            out.sum().backward()
            assert handle.stats().swap_outs == swaps
            assert torch.equal(out, want)
            assert type(other.__dict__.get("forward")).__name__ != "_GuardedForward"
        with pytest.raises(TypeError):
            copy.deepcopy(handle)  # the handle owns hooks and host memory: not copied
        lms.enable(twin, limit=0, min_size=0, weights=False).remove()  # LMS can go on it


@pytest.mark.parametrize("limit", SWAPPING)
def test_dtype_change_after_enable(limit):
    def step(model):
        model.double()
        model(data().double()).sum().backward()
        return grads(model)

    want, got, _ = parity(MLP, step, limit)
    same(want, got)


@pytest.mark.parametrize("limit", [0, 48 * 1024, 96 * 1024])  # 96 KiB: evicted after resize
def test_storage_resized_by_its_owner_after_save(limit):
    # FSDP-style: a saved tensor's storage is freed (resized to 0) after forward and
    # refilled before backward, with no version bump. LMS must never copy it while
    # it is empty.
    class Resizes(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(64, 64)
            self.gathered = None

        def forward(self, x):
            full = self.lin.weight.detach().clone()  # the "gathered" weight
            y = torch.tanh(self.lin(x) @ full)  # saves full (for the gradient of lin(x))
            for _ in range(4):  # more saves: the limit evicts older ones after the resize
                y = torch.tanh(self.lin(y))
            self.gathered = (full, full.clone())
            full.untyped_storage().resize_(0)  # "resharded" after use
            for _ in range(4):
                y = torch.tanh(self.lin(y))
            return y

        def regather(self):
            full, value = self.gathered
            full.untyped_storage().resize_(value.numel() * 4)
            with torch.no_grad():
                torch.empty(0).set_(full.untyped_storage()).copy_(value.flatten())

    def step(model):
        out = model(data())
        model.regather()
        out.sum().backward()
        return grads(model)

    want, got, _ = parity(Resizes, step, limit)
    same(want, got)


def test_a_backward_that_raises_midway_does_not_turn_prefetch_off():
    # Autograd runs no final callback when a backward raises, so LMS never hears
    # that it ended; the next step must still prefetch, and stay exact.
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = MLP(depth=3), MLP(depth=3)

        def forward(self, x):
            return self.b(FailsInBackward.apply(self.a(x)))

    def step(model, fail):
        FailsInBackward.fail = fail
        try:
            model(data()).sum().backward()  # b's backward runs, then the failure
        except ValueError:
            assert fail
        finally:
            FailsInBackward.fail = False

    want_model, model = Split(), Split()
    for fail in (False, True, False):
        step(want_model, fail)
    with lms.enable(model, limit=0, min_size=0, weights=False, lookahead=1) as handle:
        ahead = []
        prefetch = handle.activations._prefetch

        def counting_prefetch():
            before = handle.runtime.stats.swap_ins
            prefetch()
            ahead[-1] += handle.runtime.stats.swap_ins - before

        handle.activations._prefetch = counting_prefetch
        for fail in (False, True, False):
            ahead.append(0)
            step(model, fail)
        assert_clean_after_step(handle)
    assert ahead[0] > 0 and ahead[2] == ahead[0]  # copies still issued ahead of use
    same(grads(want_model), grads(model))


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        out += x  # in place, as torchvision's ResNet does
        return F.dropout(self.relu(out), 0.1)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(ResidualBlock(), ResidualBlock())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.blocks(F.relu_(self.stem(x)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("limit", LIMITS)
def test_in_place_relu_and_residual_adds_are_not_mistaken_for_modified_saves(limit):
    # The version check must not fire where autograd would not: in-place ops whose
    # saves happen after them (ReLU(inplace=True) saves its output) are legal.
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def step(model):
        torch.manual_seed(5)  # the same dropout masks
        model(x).sum().backward()
        return grads(model)

    want, got, _ = parity(ResNet, step, limit)
    same(want, got)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("limit", [0, 48 * 1024])
def test_the_whole_lms_model_inside_checkpoint(reentrant, limit):
    # LMS's hooks are the innermost ones in its forward, so an outer non-reentrant
    # checkpoint stores nothing; the reentrant one recomputes the forward inside
    # backward, where LMS saves (and may swap) again.
    def step(model):
        x = data().requires_grad_(reentrant)
        checkpoint(model, x, use_reentrant=reentrant).sum().backward()
        return grads(model)

    want, got, _ = parity(lambda: MLP(depth=5), step, limit)
    same(want, got)


@pytest.mark.parametrize("limit", LIMITS)
def test_lms_on_a_submodule_and_on_its_parent(limit):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = MLP(), MLP()

        def forward(self, x):
            return self.b(self.a(x))

    want_model, model = Two(), Two()
    want_model(data()).sum().backward()
    with lms.enable(model.a, limit=limit, min_size=0, weights=False) as inner:
        with lms.enable(model, limit=limit, min_size=0, weights=False) as outer:
            model(data()).sum().backward()
            assert_clean_after_step(outer)
        assert_clean_after_step(inner)
    if limit == 0:  # each scope sends its own saves: the child's inside it, the rest outside
        assert inner.stats().swap_outs > 0 and outer.stats().swap_outs > 0
    same(grads(want_model), grads(model))


class Interrupted(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = MLP()
        self.stop = False

    def forward(self, x):
        h = self.net(x)
        if self.stop:
            raise KeyboardInterrupt  # Ctrl-C in a notebook, in the middle of forward
        return h


def no_saved_tensor_hooks_on():
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


@pytest.mark.parametrize("own_forward", [False, True])
def test_ctrl_c_in_forward_leaves_no_hooks_on(own_forward):
    # nn.Module runs always_call hooks for Exception only, not for KeyboardInterrupt.
    want_model, model = Interrupted(), Interrupted()
    want_model(data()).sum().backward()
    if own_forward:  # an instance-level forward: LMS installs no guard around it
        model.forward = model.forward
    handle = lms.enable(model, limit=0, min_size=0, weights=False)
    model.stop = True
    with pytest.raises(KeyboardInterrupt):
        model(data())
    model.stop = False
    if not own_forward:
        assert no_saved_tensor_hooks_on()  # closed at once by the guarded forward
        model(data()).sum().backward()
        swaps = handle.stats().swap_outs
        (data().requires_grad_() * 2).sigmoid().sum().backward()  # outside the model
        assert handle.stats().swap_outs == swaps
    handle.remove()
    assert no_saved_tensor_hooks_on()  # remove() closes what is left, in any case
    if own_forward:
        model(data()).sum().backward()
    same(grads(want_model), grads(model))


def test_a_model_moved_to_another_device_after_enable_is_refused_clearly():
    # LMS manages one device's memory; after a move nothing would be eligible and
    # LMS would silently do nothing. (The meta device stands in for a GPU here.)
    model = MLP()
    with lms.enable(model, limit=0, min_size=0, weights=False):
        model.to("meta")
        with pytest.raises(lms.LMSError, match="moved from cpu to meta"):
            model(data().to("meta"))
        assert no_saved_tensor_hooks_on()
        model.to_empty(device="cpu")  # back on the CPU: LMS goes on
        model(data()).sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_buffers_stay_put_after_load_state_dict_with_assign():
    # assign=True replaces the parameter and buffer objects; LMS must still know
    # them (buffers are never swapped: the module holds them anyway).
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)
            self.register_buffer("scale", torch.rand(64, 64))

        def forward(self, x):
            return self.lin(x) * self.scale  # mul saves the buffer

    model = Scaled()
    with lms.enable(model, limit=0, min_size=0, weights=False) as handle:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
        moved = []
        to_host = handle.runtime.transfers.to_host
        handle.runtime.transfers.to_host = lambda src, b: (
            moved.append(src.untyped_storage().data_ptr()),
            to_host(src, b),
        )[1]
        model(data()).sum().backward()
    assert moved and model.scale.untyped_storage().data_ptr() not in moved


class ScaleInPlace(torch.autograd.Function):
    """An in-place custom op (mark_dirty) that saves its own output."""

    @staticmethod
    def forward(ctx, x):
        x.mul_(2).tanh_()
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * 2 * (1 - y * y)


class Tree(nn.Module):
    """Calls itself recursively (a tree-structured net), with an in-place custom op."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 64)

    def forward(self, x, depth=2):
        h = ScaleInPlace.apply(self.lin(x))
        if depth == 0:
            return h
        return self(h[:32], depth - 1).sum() + self(h[32:], depth - 1).sum()


@pytest.mark.parametrize("limit", SWAPPING)
def test_a_root_module_that_calls_itself_and_a_mark_dirty_function(limit):
    def step(model):
        x = data().requires_grad_()
        model(x).backward(inputs=[x, model.lin.weight])  # a partial backward too
        return {"x": x.grad, "w": model.lin.weight.grad}

    want, got, _ = parity(Tree, step, limit)
    same(want, got)


@pytest.mark.parametrize("min_size, moves", [(64 * 64 * 4, True), (64 * 64 * 4 + 1, False)])
def test_min_size_exactly_at_a_storage_size(min_size, moves):
    # "Smaller than min_size never moves": a storage of exactly min_size may move.
    want_model, model = MLP(), MLP()
    want_model(data()).sum().backward()
    with lms.enable(model, limit=0, min_size=min_size, weights=False) as handle:
        model(data()).sum().backward()
    assert (handle.stats().swap_outs > 0) == moves
    same(grads(want_model), grads(model))


@pytest.mark.parametrize("value", ["1e400", "1e400GiB", "9" * 400])
def test_sizes_that_overflow_raise_our_error(value):
    with pytest.raises(lms.LMSError, match="too large"):
        lms.LMSConfig(limit=value)
    with pytest.raises(lms.LMSError, match="too large"):
        lms.parse_size(value)
