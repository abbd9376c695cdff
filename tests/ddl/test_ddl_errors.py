"""Bad input gets a DDLError that says what to do, never a hang or a corrupted state."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from ddl_harness import run_ranks

import ddl


def test_collectives_before_init(monkeypatch):
    assert not ddl.is_initialized()
    with pytest.raises(ddl.DDLError, match=r"call ddl\.init\(\) first"):
        ddl.allreduce(torch.ones(2))
    with pytest.raises(ddl.DDLError, match="not initialised"):
        ddl.wrap(torch.nn.Linear(2, 2))
    with pytest.raises(ddl.DDLError, match="not initialised"):
        ddl.rank()
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ddl.DDLError, match="torchrun"):
        ddl.init()
    assert not ddl.is_initialized()
    ddl.shutdown()  # harmless when not initialised


class _Unviewable(torch.Tensor):
    """A tensor subclass that fails where ddl looks at it (some wrapper's own error)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.detach:
            raise RuntimeError("this wrapper cannot be detached")
        return super().__torch_function__(func, types, args, kwargs or {})


def _misuse():
    """Every misuse raises on every rank, and the state stays usable afterwards."""
    r = ddl.rank()
    caught = {}

    def expect(name, fn):
        try:
            fn()
        except ddl.DDLError as e:
            caught[name] = str(e)
        else:
            caught[name] = None

    # Different shapes / dtypes across ranks: found by the header check, no hang.
    expect("shape", lambda: ddl.allreduce(torch.ones(4 + (r == 1)), algorithm="ring"))
    # Same size, shapes that differ only beyond the dims the header spells out.
    deep = (1,) * 6 + ((2, 3) if r == 1 else (3, 2))
    expect("shape_8d", lambda: ddl.allreduce(torch.ones(deep)))
    dtype = torch.float64 if r == 2 else torch.float32
    expect("dtype", lambda: ddl.allreduce(torch.ones(4, dtype=dtype)))
    expect(
        "algorithm_differs",
        lambda: ddl.allreduce(torch.ones(3), algorithm=["ring", "native"][r % 2]),
    )
    # Local size 2 does not divide world size 3: hierarchical does not fit.
    expect("topology", lambda: ddl.allreduce(torch.ones(3), algorithm="hierarchical"))
    expect("op", lambda: ddl.allreduce(torch.ones(3), op="max"))
    expect("mean_int", lambda: ddl.allreduce(torch.ones(3, dtype=torch.int64), op="mean"))
    expect("type", lambda: ddl.allreduce([1.0, 2.0]))
    ro = np.ones(3)
    ro.flags.writeable = False
    expect("readonly", lambda: ddl.allreduce(ro))
    expect("bool", lambda: ddl.allreduce(torch.ones(2, dtype=torch.bool)))
    expect("wrap_size", lambda: ddl.wrap(torch.nn.Linear(2, 2), bucket_size="-3MiB"))
    expect("wrap_empty", lambda: ddl.wrap(torch.nn.Linear(2, 2).requires_grad_(False)))
    twice = torch.nn.Linear(2, 2)
    with ddl.wrap(twice):
        expect("wrap_twice", lambda: ddl.wrap(twice))
    ddl.wrap(twice).remove()  # fine again once the first handle is removed
    # Different models on different ranks: caught by wrap, before its broadcast.
    expect("wrap_layout", lambda: ddl.wrap(torch.nn.Linear(2, 2 + (r == 0))))
    # Different operations at the same point: an allreduce meets a wrap.
    mixed = torch.nn.Linear(2, 2)
    expect("mixed", lambda: ddl.allreduce(torch.ones(2)) if r == 0 else ddl.wrap(mixed))
    # A repeated init may restate the running settings, but not change them.
    same = ddl.init(local_size=2, timeout=20.0, check=True) is ddl.topology()
    expect("reinit", lambda: ddl.init(local_size=1, timeout=20.0))
    # Rank 1 alone rejects its input: it raises at once, and the others get a DDLError
    # naming it from the same collective, instead of pairing with rank 1's next one.
    rejected = {}
    ro_np = np.ones(3, np.float32)
    ro_np.flags.writeable = False
    bad_inputs = dict(
        bool=lambda: ddl.allreduce(torch.ones(3, dtype=torch.bool)),
        readonly=lambda: ddl.allreduce(ro_np),
        op=lambda: ddl.allreduce(torch.ones(3), op="max"),
        mean_int=lambda: ddl.allreduce(torch.ones(3, dtype=torch.int32), op="mean"),
        topology=lambda: ddl.allreduce(torch.ones(3), algorithm="hierarchical"),
        type=lambda: ddl.allreduce([1.0, 2.0, 3.0]),
        subclass=lambda: ddl.allreduce(_Unviewable(torch.ones(3))),
    )
    for name, bad in bad_inputs.items():
        start = time.monotonic()
        expect(f"one_rank_{name}", bad if r == 1 else lambda: ddl.allreduce(torch.ones(3)))
        # Each rank's next collective gets its own partners' values (nobody is shifted).
        t = torch.full((2,), float(r))
        ddl.allreduce(t)
        rejected[name] = (time.monotonic() - start, t.tolist())
    # The same from async calls in flight: rank 1's second call is rejected.
    xs = [torch.full((4,), float(r + k)) for k in range(3)]
    handles = [ddl.allreduce_async(xs[0])]
    expect(
        "one_rank_async",
        lambda: handles.append(
            ddl.allreduce_async(torch.ones(4, dtype=torch.bool if r == 1 else torch.float32))
        ),
    )
    if r != 1:
        expect("one_rank_async", handles.pop().wait)
    handles.append(ddl.allreduce_async(xs[2]))
    for h in reversed(handles):
        h.wait()
    rejected["async"] = (0.0, [xs[0].tolist(), xs[2].tolist()])
    # A failing async collective whose Handle is dropped unwaited warns; it used to
    # vanish while the next collective ran as if nothing had happened.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ddl.allreduce_async(torch.ones(4 + (r == 1)))  # shapes differ: fails on every rank
        ddl.allreduce(torch.ones(2))  # one worker, in order: the dropped one ended first
    dropped = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    caught["dropped"] = "\n".join(dropped) or None
    # Still healthy: a normal collective gives the right answer.
    t = torch.full((5,), float(r))
    ddl.allreduce(t, op="sum", algorithm="ring")
    # The user tears the job down first: ddl.shutdown() must not fail on the groups
    # that went with it.
    dist.destroy_process_group()
    ddl.shutdown()
    return caught, t.tolist(), same, rejected


def test_misuse_raises_everywhere_and_leaves_state_usable():
    results = run_ranks(_misuse, 3, local_size=2, ddl_timeout=20)
    for rank, (caught, after, same, rejected) in enumerate(results):
        assert after == [3.0] * 5 and same
        for name, (took, values) in rejected.items():
            msg = caught[f"one_rank_{name}"]
            assert msg is not None, name
            if rank == 1 and name == "subclass":
                assert "could not prepare the _Unviewable (RuntimeError: this" in msg, msg
            if rank != 1:
                assert "ranks [1]: an allreduce it rejected as bad input" in msg, (name, msg)
                assert "ranks [0, 2]: allreduce of shape (" in msg, (name, msg)
            if name == "async":
                assert values == [[3.0] * 4, [9.0] * 4], values
            else:
                assert values == [3.0, 3.0] and took < 10, (name, took, values)
        msgs = {k: v for k, v in caught.items()}
        assert all(v is not None for v in msgs.values()), msgs
        assert (
            "ranks [0, 2]: allreduce of shape (4,)" in msgs["shape"]
            and "ranks [1]: allreduce of shape (5,)" in msgs["shape"]
        )
        deep = "allreduce of shape (1, 1, 1, 1, 1, 1, ...) (8 dims, digest 0x"
        assert f"ranks [0, 2]: {deep}" in msgs["shape_8d"]
        assert f"ranks [1]: {deep}" in msgs["shape_8d"]
        assert "float64" in msgs["dtype"] and "float32" in msgs["dtype"]
        assert "algorithm='ring'" in msgs["algorithm_differs"]
        assert "does not divide world_size 3" in msgs["topology"]
        assert "unknown op 'max'" in msgs["op"]
        assert "use op='sum'" in msgs["mean_int"]
        assert "pass a torch.Tensor" in msgs["type"]
        assert "read-only" in msgs["readonly"]
        assert "not supported" in msgs["bool"]
        assert "bucket_size" in msgs["wrap_size"]
        assert "no parameters" in msgs["wrap_empty"]
        assert "same model" in msgs["wrap_layout"]
        assert "already wrapped" in msgs["wrap_twice"]
        assert "Handle was dropped without wait()" in msgs["dropped"], msgs["dropped"]
        assert "allreduce of shape (5,)" in msgs["dropped"], msgs["dropped"]
        assert "local_size=1 (running: 2)" in msgs["reinit"] and "timeout" not in msgs["reinit"]
        assert "ranks [0]: allreduce" in msgs["mixed"] and "ranks [1, 2]: ddl.wrap" in msgs["mixed"]


def _dies_or_stalls(mode, named):
    if ddl.rank() == 2:
        if mode == "dies":
            os._exit(3)  # a crashed rank
        # A stalled rank: busy elsewhere until both others have timed out and named it. (A
        # fixed nap longer than the timeout is not enough on a loaded machine: a rank that
        # starts its allreduce late would see rank 2 arrive before its own timeout.)
        for _ in range(2):
            if not named.acquire(timeout=60):
                break
    try:
        ddl.allreduce(torch.ones(1000), algorithm="ring")
    except ddl.DDLError as e:
        first = str(e)
        if ddl.rank() != 2:
            named.release()
    else:
        return "no error", None
    try:
        ddl.allreduce(torch.ones(3))
    except ddl.DDLError as e:
        return first, str(e)
    return first, "no error"


@pytest.mark.parametrize("mode", ["dies", "stalls"])
def test_dead_or_stalled_rank_is_named(mode):
    named = mp.get_context("forkserver").Semaphore(0)  # ranks 0 and 1 release it as they fail
    results = run_ranks(
        _dies_or_stalls, 3, mode, named, ddl_timeout=3, may_exit=(2,), deadline_s=90
    )
    for first, second in results[:2]:
        assert "ranks [2] did not arrive" in first, first
        assert "ddl.allreduce" in first and "collective #" in first
        assert "earlier collective failed" in second, second
