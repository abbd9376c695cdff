"""Adversarial ddl: realistic training code, run side by side with torch's DDP.

Every model scenario trains a reference replica and a ``ddl.wrap`` replica from the same
(per-rank different) initial weights on the same per-rank data, and compares gradients,
buffers and parameters after every step. The reference is DDP itself, or, where DDP
raises (double backward with retain_graph, reentrant checkpoint), DDP's maths by hand
(``_Manual``). Tolerance: none. With 2 ranks both sides scale each gradient by 1/2
(exact) and add two values (a + b == b + a), so every comparison is bitwise, fp16 and
bf16 included. The 4-rank 64 MiB allreduce uses multiples of 1/4 below 16, whose sums
over 4 ranks are exact in float32 in any order, so every algorithm must also match
``dist.all_reduce`` bitwise there (rounding-order tolerances for random data are the
subject of ``test_ddl_allreduce.py``).

Scenarios are grouped into a few launches because starting ranks costs seconds.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing as mp

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint as ckpt
from ddl_harness import run_ranks
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.torch_version import TorchVersion

import ddl

pytestmark = pytest.mark.filterwarnings("ignore")

ALGS = ("native", "ring", "multiring", "hierarchical", "auto")


# --------------------------------------------------------------------------- models


class Reordered(nn.Module):
    """Layers used in the opposite order of registration, one of them twice (shared)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.a = nn.Linear(6, 8)

    def forward(self, x, step, rank):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        h = torch.tanh(self.b(h))  # shared module: two uses, one gradient
        return self.c(h)


class Unused(nn.Module):
    """A branch used by some ranks on some steps; a layer no rank ever uses."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.branch = nn.Linear(8, 8)
        self.never = nn.Linear(2, 2)
        self.out = nn.Linear(8, 8)

    def forward(self, x, step, rank):
        h = torch.relu(self.inp(x))
        if (rank + step) % 2 == 0:
            h = h + self.branch(h)
        return self.out(h)


class Tied(nn.Module):
    """Embedding and output projection share one weight (registered twice)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x, step, rank):
        idx = (x.abs() * 10).long().clamp(max=7)[:, :3]
        return self.head(torch.tanh(self.mid(self.emb(idx).mean(1))))


class WithBN(nn.Module):
    """BatchNorm running statistics: buffers that forward changes on every rank."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.l2 = nn.Linear(8, 8)

    def forward(self, x, step, rank):
        return self.l2(torch.relu(self.bn(self.l1(x))))


class MixedDtypes(nn.Module):
    """fp32, bf16, fp16 and fp64 parameters in one model."""

    def __init__(self):
        super().__init__()
        self.w32 = nn.Parameter(torch.randn(6, 8))
        self.w16 = nn.Parameter(torch.randn(8, 8).half())
        self.wb16 = nn.Parameter(torch.randn(8, 8).bfloat16())
        self.w64 = nn.Parameter(torch.randn(8, 8).double())

    def forward(self, x, step, rank):
        h = torch.tanh(x @ self.w32)
        h = (h.half() @ self.w16).float()
        h = (h.bfloat16() @ self.wb16).float()
        return (h.double() @ self.w64).float()


class Layouts(nn.Module):
    """channels_last conv weight, a transposed (non-contiguous) weight, zero-size tensors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1).to(memory_format=torch.channels_last)
        self.wt = nn.Parameter(torch.randn(8, 16).t())  # (16, 8), strides (1, 16)
        self.empty = nn.Parameter(torch.zeros(0, 8))
        self.empty2 = nn.Parameter(torch.zeros(3, 0))

    def forward(self, x, step, rank):
        img = (
            x[:, :4]
            .reshape(-1, 1, 2, 2)
            .repeat(1, 2, 2, 2)
            .contiguous(memory_format=torch.channels_last)
        )
        h = self.conv(img).flatten(1)  # (B, 4 * 4 * 4) -> use 16 features
        h = h[:, :16] @ self.wt
        z = self.empty.sum() + self.empty2.sum()  # zero-size, still in the graph
        return h + z


class Huge(nn.Module):
    """One parameter larger than the bucket size, next to small ones."""

    def __init__(self):
        super().__init__()
        self.small = nn.Linear(6, 8)
        self.big = nn.Parameter(torch.randn(8, 2048) * 0.01)  # 64 KiB
        self.tail = nn.Linear(8, 8)

    def forward(self, x, step, rank):
        h = torch.tanh(self.small(x)) @ self.big
        return self.tail(h.view(h.shape[0], 8, -1).mean(-1))


class Checkpointed(nn.Module):
    """``torch.utils.checkpoint`` around the last block (whose gradients come first, so a
    reentrant backward starts inside the checkpoint) or around the first one."""

    def __init__(self, reentrant, last=True):
        super().__init__()
        self.reentrant, self.last = reentrant, last
        self.first = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))

    def forward(self, x, step, rank):
        if not self.last:
            x = x.requires_grad_(True) if self.reentrant else x
            return self.block(ckpt.checkpoint(self.first, x, use_reentrant=self.reentrant))
        return ckpt.checkpoint(self.block, self.first(x), use_reentrant=self.reentrant)


# --------------------------------------------------------------------------- the comparison


def _batch(rank, step, n=6):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(8, n, generator=g), torch.randn(8, 8, generator=g)


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _bits(t):
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _same(a, b):
    """Bitwise (NaN payloads included), None only where the other is None too."""
    return all(
        (x is None and y is None)
        or (
            x is not None
            and y is not None
            and x.shape == y.shape
            and torch.equal(_bits(x), _bits(y))
        )
        for x, y in zip(a, b)
    )


def _plain_step(model, module, sync, step, rank, reduce):
    x, y = _batch(rank, step)
    nn.functional.mse_loss(model(x, step, rank).float(), y).backward()
    reduce()


class _Manual:
    """DDP's maths by hand, for what DDP itself refuses (double backward, reentrant
    checkpoint): after each backward, every gradient is scaled by 1/p and summed with
    ``dist.all_reduce``, as DDP's reducer does; the parameters start as rank 0's."""

    def __init__(self, module):
        self.module = module
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t, 0)

    def __call__(self, *args):
        return self.module(*args)

    def reduce(self):
        params = list(self.module.parameters())
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        dist.all_reduce(used)  # no rank used it: .grad stays None, as in DDP
        for p, n in zip(params, used.tolist()):
            if n:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.mul_(1.0 / dist.get_world_size())
                dist.all_reduce(p.grad)


def _parity(make, step_fn=_plain_step, steps=3, ref_kind="ddp", **kw):
    """Train a reference and a ddl.wrap replica side by side; list where they differ."""
    kw = dict(dict(bucket_size="1KiB", algorithm="ring"), **kw)
    rank = ddl.rank()
    torch.manual_seed(1 + rank)  # different per rank: the initial broadcast must fix it
    ref = make()
    mine = copy.deepcopy(ref)
    if ref_kind == "ddp":
        model = DDP(ref, find_unused_parameters=True, bucket_cap_mb=0.001)
        ref_sync, ref_reduce = model.no_sync, lambda: None
    else:
        model = _Manual(ref)
        ref_sync, ref_reduce = contextlib.nullcontext, model.reduce
    handle = ddl.wrap(mine, **kw)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, mine)]
    sides = ((model, ref, ref_sync, ref_reduce), (mine, mine, handle.no_sync, lambda: None))
    problems = []
    for step in range(steps):
        for (m, module, sync, reduce), opt in zip(sides, opts):
            opt.zero_grad(set_to_none=step % 2 == 0)
            step_fn(m, module, sync, step, rank, reduce)
        if not _same(_grads(ref), _grads(mine)):
            problems.append(f"step {step}: gradients differ")
        if not _same(list(ref.buffers()), list(mine.buffers())):
            problems.append(f"step {step}: buffers differ")
        for opt in opts:
            opt.step()
    if not _same(list(ref.parameters()), list(mine.parameters())):
        problems.append("parameters differ")
    handle.remove()
    digest = [float(p.detach().double().sum()) for p in mine.parameters()]
    return problems, digest


def _accumulate(model, module, sync, step, rank, reduce):
    """no_sync accumulation over two micro-batches, then a synced one."""
    with sync():
        _plain_step(model, module, sync, 10 + step, rank, lambda: None)
        _plain_step(model, module, sync, 20 + step, rank, lambda: None)
    _plain_step(model, module, sync, step, rank, reduce)


def _two_forwards(model, module, sync, step, rank, reduce):
    x, y = _batch(rank, step)
    loss = nn.functional.mse_loss(model(x, step, rank), y)
    loss = loss + nn.functional.mse_loss(model(2 * x, step, rank), y)
    loss.backward()
    reduce()


def _retain_graph(model, module, sync, step, rank, reduce):
    x, y = _batch(rank, step)
    loss = nn.functional.mse_loss(model(x, step, rank), y)
    loss.backward(retain_graph=True)
    reduce()
    loss.backward()  # reduces the accumulated gradient again
    reduce()


def _eval_between(model, module, sync, step, rank, reduce):
    x, y = _batch(rank, step)
    module.eval()
    with torch.no_grad():
        model(x, step, rank)  # an eval forward without backward
    module.train()
    _plain_step(model, module, sync, step, rank, reduce)


def _clip(model, module, sync, step, rank, reduce):
    _plain_step(model, module, sync, step, rank, reduce)
    nn.utils.clip_grad_norm_(module.parameters(), 0.05)


def _toggle(model, module, sync, step, rank, reduce):
    # Trainable at wrap; frozen on step 1 (no gradient), trainable again on step 2.
    module.branch.requires_grad_(step != 1)
    _plain_step(model, module, sync, step, rank, reduce)


_MODEL_CASES = {
    "reordered_shared": (Reordered, _plain_step, {}),
    "unused_some_ranks": (Unused, _plain_step, {}),
    "tied": (Tied, _plain_step, {}),
    "batchnorm": (WithBN, _eval_between, {}),
    "mixed_dtypes": (MixedDtypes, _plain_step, dict(algorithm="native")),
    "mixed_dtypes_ring": (MixedDtypes, _plain_step, {}),
    "mixed_dtypes_hierarchical": (MixedDtypes, _plain_step, dict(algorithm="hierarchical")),
    "mixed_dtypes_auto": (MixedDtypes, _plain_step, dict(algorithm="auto")),
    "layouts": (Layouts, _plain_step, {}),
    "huge_param": (Huge, _plain_step, dict(bucket_size="4KiB")),
    "tiny_buckets": (Unused, _plain_step, dict(bucket_size=1, first_bucket_size=1)),
    "no_sync": (Unused, _accumulate, {}),
    "batchnorm_no_sync": (WithBN, _accumulate, {}),
    "batchnorm_two_forwards": (WithBN, _two_forwards, dict(algorithm="multiring")),
    "two_forwards": (Reordered, _two_forwards, {}),
    "clip": (Unused, _clip, {}),
    "toggle": (Unused, _toggle, {}),
    "checkpoint": (lambda: Checkpointed(False), _plain_step, {}),
    # DDP raises on these two; the reference is its maths by hand (_Manual).
    "retain_graph": (Reordered, _retain_graph, dict(ref_kind="manual")),
    "checkpoint_reentrant": (lambda: Checkpointed(True), _plain_step, dict(ref_kind="manual")),
    "checkpoint_reentrant_first": (
        lambda: Checkpointed(True, last=False),
        _plain_step,
        dict(ref_kind="manual"),
    ),
}


def _models(names):
    out = {}
    for name in names:
        make, step_fn, kw = _MODEL_CASES[name]
        try:
            out[name] = _parity(make, step_fn, **kw)
        except Exception as e:  # report, and keep going: one launch covers many cases
            out[name] = ([f"raised {type(e).__name__}: {e}"], None)
    return out


# --------------------------------------------------------------------------- launches


# The reference itself fails here on older torch: on 2.11, DDP's buffer broadcast before
# the second of two forwards raises "modified by an inplace operation" at backward
# (ddl's does not; checked on 2.11 and 2.13). Compared only where DDP can run it.
_DDP_RUNS_TWO_FORWARDS_WITH_BUFFERS = TorchVersion(torch.__version__) >= "2.13"


def _two_rank_models():
    names = list(_MODEL_CASES)
    if not _DDP_RUNS_TWO_FORWARDS_WITH_BUFFERS:
        names.remove("batchnorm_two_forwards")
    return _models(names)


def test_models_match_ddp_bitwise_on_two_ranks():
    results = run_ranks(_two_rank_models, 2, deadline_s=180)
    failures = {}
    for rank, res in enumerate(results):
        for name, (problems, _) in res.items():
            if problems:
                failures[(rank, name)] = problems
    assert not failures, failures
    for name in results[0]:
        assert results[0][name][1] == results[1][name][1], f"{name}: replicas diverged"


# --------------------------------------------------------------------------- lifecycle


def _expect_error(fn):
    try:
        fn()
    except ddl.DDLError as e:
        return str(e)
    return None


def _lifecycle():
    rank = ddl.rank()
    out = {}
    # remove() then wrap again: the second handle reduces, the first is gone for good.
    m = nn.Linear(3, 2)
    h = ddl.wrap(m, bucket_size=16)
    h.remove()
    h = ddl.wrap(m, bucket_size=16)
    m.zero_grad()
    m(torch.full((1, 3), float(rank + 1))).sum().backward()
    out["rewrap"] = m.weight.grad.tolist()
    h.remove()
    # Two models wrapped at once, one backward through both; B's branch unused on rank 0.
    torch.manual_seed(rank)
    a, b = Unused(), Unused()
    ra, rb = _Manual(copy.deepcopy(a)), _Manual(copy.deepcopy(b))
    ha, hb = ddl.wrap(a, bucket_size=256), ddl.wrap(b, bucket_size=64, algorithm="native")
    problems = []
    for step in range(3):
        x, _ = _batch(rank, step)
        for ma, mb, reduce in ((ra, rb, (ra.reduce, rb.reduce)), (a, b, ())):
            (ma(x, step, rank).sum() + mb(x, step + 1, rank).pow(2).sum()).backward()
            for fn in reduce:
                fn()
        for mod_ref, mod in ((ra.module, a), (rb.module, b)):
            if not _same(_grads(mod_ref), _grads(mod)):
                problems.append(f"step {step}: two models: gradients differ")
    # Forwards in a rank-dependent order: the gradients of A and B come in another order
    # on each rank, so A's buckets met B's (silently summed when the sizes match). Now
    # every rank raises, nothing is summed, and the next step in a common order works.
    x, _ = _batch(rank, 5)
    first, second = (a, b) if rank == 0 else (b, a)
    la = first(x, 0, 0).sum()
    lb = second(x, 0, 0).pow(2).sum()
    out["two_models_order"] = _expect_error(lambda: (la + lb).backward())
    for mod in (ra.module, rb.module, a, b):
        mod.zero_grad()
    for ma, mb, reduce in ((ra, rb, (ra.reduce, rb.reduce)), (a, b, ())):
        (ma(x, 0, 0).sum() + mb(x, 0, 0).pow(2).sum()).backward()
        for fn in reduce:
            fn()
    if not _same(_grads(ra.module) + _grads(rb.module), _grads(a) + _grads(b)):
        problems.append("after the order error: gradients differ")
    ha.remove()
    hb.remove()
    out["two_models"] = problems
    # A parameter frozen at wrap time and trained later would silently stay unsynced.
    f = Unused()
    f.branch.requires_grad_(False)
    hf = ddl.wrap(f, bucket_size=256)
    f.branch.requires_grad_(True)
    x, _ = _batch(rank, 0)
    out["unfrozen"] = _expect_error(lambda: f(x, 0, 0).sum().backward())
    f.branch.requires_grad_(False)
    f.zero_grad()
    f(x, 0, 0).sum().backward()  # fine again: state was not corrupted
    out["unfrozen_after"] = f.out.bias.grad.tolist()
    hf.remove()
    # Buffers stay per rank with broadcast_buffers=False, so rank 0 alone may evaluate.
    bn = WithBN()
    hb = ddl.wrap(bn, bucket_size=256, broadcast_buffers=False)
    x, y = _batch(rank, 0)
    nn.functional.mse_loss(bn(x, 0, rank), y).backward()
    if rank == 0:
        with torch.no_grad():
            bn(x, 0, rank)  # no collective in this forward
    nn.functional.mse_loss(bn(x, 1, rank), y).backward()
    out["bn_local"] = bn.bn.running_mean.tolist()
    hb.remove()
    # shutdown() with a live handle; a backward in between raises; init() again.
    g = nn.Linear(3, 2)
    hg = ddl.wrap(g, bucket_size=16)
    ddl.shutdown()
    x = torch.full((1, 3), float(rank + 1))
    out["after_shutdown"] = _expect_error(lambda: g(x).sum().backward())
    out["allreduce_after_shutdown"] = _expect_error(lambda: ddl.allreduce(torch.ones(1)))
    ddl.init(local_size=1, timeout=10)
    g.zero_grad()
    g(x).sum().backward()
    out["reinit_grad"] = g.weight.grad.tolist()
    out["reinit_allreduce"] = ddl.allreduce(torch.ones(2), algorithm="ring").tolist()
    hg.remove()
    return out


def test_lifecycle_rewrap_two_models_freeze_and_reinit():
    results = run_ranks(_lifecycle, 2, local_size=1, ddl_timeout=10, deadline_s=90)
    p = 2
    mean_x = sum(r + 1 for r in range(p)) / p
    for out in results:
        assert out["rewrap"] == [[mean_x] * 3] * 2
        assert out["two_models"] == []
        assert "ranks disagree" in out["two_models_order"], out["two_models_order"]
        assert "same order" in out["two_models_order"]
        assert out["unfrozen"] and "branch.weight" in out["unfrozen"], out["unfrozen"]
        assert out["unfrozen_after"] == [8.0] * 8  # batch of 8, sum loss
        assert out["after_shutdown"] and "ddl.init" in out["after_shutdown"]
        assert "not initialised" in out["allreduce_after_shutdown"]
        assert out["reinit_grad"] == [[mean_x] * 3] * 2
        assert out["reinit_allreduce"] == [float(p)] * 2
    assert results[0]["bn_local"] != results[1]["bn_local"]  # each rank's own statistics


# --------------------------------------------------------------------------- allreduce edges


def _allreduce_edges(algs):
    rank = ddl.rank()
    out = {}
    for alg in algs:
        row = {}
        e = torch.empty(0)
        row["empty"] = ddl.allreduce(e, algorithm=alg).shape == (0,)
        z = torch.tensor(float(rank + 1))
        row["scalar"] = ddl.allreduce(z, op="mean", algorithm=alg).item()
        i = torch.full((5,), rank + 1, dtype=torch.int32)
        row["int_sum"] = ddl.allreduce(i, algorithm=alg).tolist()
        row["int_mean"] = _expect_error(
            lambda: ddl.allreduce(torch.ones(2, dtype=torch.int8), op="mean")
        )
        n16 = np.full((4, 6), rank + 1, dtype=np.float16)[:, ::2]  # non-contiguous fp16
        ddl.allreduce(n16, op="mean", algorithm=alg)
        row["np_f16_strided"] = n16.tolist()
        n32 = np.full(7, rank + 1, dtype=np.int32)
        ddl.allreduce(n32, algorithm=alg)
        row["np_i32"] = n32.tolist()
        ro = np.ones(3)
        ro.flags.writeable = False
        row["np_readonly"] = _expect_error(lambda ro=ro, a=alg: ddl.allreduce(ro, algorithm=a))
        row["np_i16"] = _expect_error(lambda: ddl.allreduce(np.ones(3, np.int16)))
        # Elements sharing memory have no in-place result: refused before anything moves
        # (it used to fail after the collective and stop ddl for good).
        row["expand"] = _expect_error(lambda: ddl.allreduce(torch.zeros(1).expand(4)))
        zs = np.lib.stride_tricks.as_strided(np.zeros(1), (3,), (0,), writeable=True)
        row["np_stride0"] = _expect_error(lambda zs=zs: ddl.allreduce(zs))
        row["after"] = ddl.allreduce(torch.ones(2), algorithm=alg).tolist()
        out[alg] = row
    return out


def test_allreduce_edge_inputs_every_algorithm():
    results = run_ranks(_allreduce_edges, 2, ALGS, local_size=1, deadline_s=60)
    p = 2
    s = sum(r + 1 for r in range(p))
    for out in results:
        for alg, row in out.items():
            assert row["empty"], alg
            assert row["scalar"] == s / p
            assert row["int_sum"] == [s] * 5
            assert "use op='sum'" in row["int_mean"]
            assert row["np_f16_strided"] == [[s / p] * 3] * 4
            assert row["np_i32"] == [s] * 7
            assert "read-only" in row["np_readonly"]
            assert "not supported" in row["np_i16"] or "no torch" in row["np_i16"]
            assert "share memory" in row["expand"] and "share memory" in row["np_stride0"]
            assert row["after"] == [float(p)] * 2


# --------------------------------------------------------------------------- large and uneven


def _exact_data(rank, numel):
    """Multiples of 1/4 below 16 in magnitude: every partial sum of 4 ranks is exact in
    float32, so every algorithm and order must agree bitwise (and "mean" divides by 4)."""
    g = torch.Generator().manual_seed(rank)
    return torch.randint(-64, 64, (numel,), generator=g, dtype=torch.int32).float().div_(4)


def _large_and_uneven(numel):
    rank, p = ddl.rank(), ddl.world_size()
    out = {"topology": (ddl.world_size(), ddl.local_size())}
    x = _exact_data(rank, numel)
    ref = x.clone()
    dist.all_reduce(ref)
    for alg, op in [(a, "sum") for a in ALGS] + [("hierarchical", "mean")]:
        got = ddl.allreduce(x.clone(), op=op, algorithm=alg)
        want = ref / p if op == "mean" else ref
        out[(alg, op)] = torch.equal(got, want)
    del x, ref, got
    # Same processes, a new job layout: 4 ranks as nodes of 3 + 1 (uneven).
    ddl.shutdown()
    ddl.init(local_size=3, timeout=20)
    out["uneven_topology"] = (ddl.world_size(), ddl.local_size())
    small = _exact_data(rank, (1 << 16) + 3)
    ref = small.clone()
    dist.all_reduce(ref)
    for alg in ("native", "ring", "multiring", "auto"):
        out[("uneven", alg)] = torch.equal(ddl.allreduce(small.clone(), algorithm=alg), ref)
    out["uneven_hier"] = _expect_error(lambda: ddl.allreduce(small, algorithm="hierarchical"))
    model = nn.Linear(4, 4)
    out["uneven_wrap_hier"] = _expect_error(lambda: ddl.wrap(model, algorithm="hierarchical"))
    with ddl.wrap(model, algorithm="auto"):  # "auto" never picks hierarchical here
        model(torch.full((1, 4), float(rank))).sum().backward()
    out["uneven_wrap_grad"] = model.weight.grad[0].tolist()
    return out


def test_64mib_every_algorithm_on_2x2_nodes_then_uneven_nodes():
    results = run_ranks(_large_and_uneven, 4, 16 << 20, local_size=2, deadline_s=150)
    p = 4
    for out in results:
        assert out.pop("topology") == (4, 2) and out.pop("uneven_topology") == (4, 3)
        assert "does not divide" in out.pop("uneven_hier")
        assert "does not divide" in out.pop("uneven_wrap_hier")
        assert out.pop("uneven_wrap_grad") == [sum(range(p)) / p] * 4
        assert all(out.values()), out


# --------------------------------------------------------------------------- failure


class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("boom in backward")


def _raise_in_backward(named):
    rank = ddl.rank()
    m = Unused()
    ddl.wrap(m, bucket_size=1, first_bucket_size=1, algorithm="ring")
    x, _ = _batch(rank, 0)
    out = {}

    def step(boom):
        h = torch.relu(m.inp(x))
        if boom:  # after the head's gradients (their buckets launched), before inp's
            h = _Boom.apply(h)
        m.out(h).sum().backward()

    for name, boom in (("first", rank == 1), ("second", False)):
        try:
            step(boom)
            out[name] = None
        except (ddl.DDLError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
        if name == "first" and rank == 0:
            named.release()
    if rank == 1:  # alive, not dead: rank 0 must time out, not see a closed connection
        named.acquire(timeout=30)
    return out


def test_exception_in_backward_on_one_rank_names_it_and_never_hangs():
    named = mp.get_context("forkserver").Semaphore(0)  # rank 0 releases it once named
    results = run_ranks(_raise_in_backward, 2, named, ddl_timeout=3, deadline_s=60)
    first, second = results[0]["first"], results[0]["second"]
    assert first.startswith("DDLError") and "ranks [1] did not arrive" in first, first
    assert "earlier collective failed" in second, second
    first, second = results[1]["first"], results[1]["second"]
    assert first == "ValueError: boom in backward"
    assert second.startswith("DDLError") and "earlier backward raised" in second, second
