"""Run a function on N Gloo ranks in fresh processes and collect what each returns.

One launch runs a whole table of cases (the function loops over them), because starting
processes costs seconds on a loaded 2-core machine while a case costs milliseconds.
Processes come from a forkserver that has already imported torch, so each rank starts in
well under a second; every launch has a deadline and kills its ranks when it passes, so a
broken collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import tempfile
import time
import traceback

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "numpy"])
    return _CTX


def _child(rank, world_size, store_path, local_size, ddl_timeout, fn, args, q, env, backend):
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # several ranks share 2 cores
    import ddl

    try:
        if "MASTER_PORT" in env:
            # torchrun's contract: ddl.init() starts the job from the environment.
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
        else:
            if backend == "nccl":
                torch.cuda.set_device(rank % torch.cuda.device_count())
            dist.init_process_group(
                backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size
            )
        ddl.init(local_size=local_size, timeout=ddl_timeout)
        q.put((rank, True, fn(*args)))
    except BaseException:
        q.put((rank, False, traceback.format_exc()))
    finally:
        try:
            ok = ddl.is_initialized() and ddl.group.current().failed is None
            ddl.shutdown()
            if ok and dist.is_initialized():
                dist.destroy_process_group()
        except BaseException:
            pass


class DLPackOnly:
    """Exposes an array only through the DLPack protocol, as CuPy and JAX arrays do."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, *args, **kwargs):
        return self._array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def free_port():
    """A TCP port that was free a moment ago (for torchrun-style launches)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    fn,
    world_size,
    *args,
    local_size=None,
    ddl_timeout=30.0,
    deadline_s=120.0,
    may_exit=(),
    env=None,
    backend="gloo",
):
    """Run ``fn(*args)`` on ``world_size`` ranks (``ddl.init`` done); return results by rank.

    Args:
        fn: a module-level function (it is pickled by reference).
        local_size: passed to ``ddl.init`` (simulated nodes).
        ddl_timeout: per-collective timeout given to ``ddl.init``.
        deadline_s: the whole launch's limit; ranks still running then are killed.
        may_exit: ranks allowed to end without reporting (they kill themselves on purpose).
        backend: "gloo" (default) or "nccl" (GPU tests).
        env: extra environment for the ranks. With ``MASTER_PORT`` in it, ranks start like
            torchrun's (``RANK``, ``WORLD_SIZE`` set; ``ddl.init()`` creates the job);
            otherwise the job is created first on a file store and ddl adopts it.

    Returns:
        A list with each rank's return value (None for ranks in ``may_exit``).

    Raises:
        AssertionError: a rank raised (its traceback is in the message) or the deadline
            passed.
    """
    ctx = _context()
    q = ctx.Queue()
    fd, store = tempfile.mkstemp(prefix="ddl_store_")
    os.close(fd)
    os.remove(store)
    procs = [
        ctx.Process(
            target=_child,
            args=(
                r,
                world_size,
                store,
                local_size,
                ddl_timeout,
                fn,
                args,
                q,
                dict(env or {}),
                backend,
            ),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, {}
    end = time.monotonic() + deadline_s
    expected = set(range(world_size)) - set(may_exit)
    try:
        while not expected <= set(results) | set(errors):
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, payload = q.get(timeout=min(left, 1.0))
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    # Drain what the dead processes managed to put, then stop waiting.
                    try:
                        while True:
                            rank, ok, payload = q.get(timeout=0.5)
                            (results if ok else errors)[rank] = payload
                    except queue.Empty:
                        break
                continue
            (results if ok else errors)[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(10.0, end - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if os.path.exists(store):
            os.remove(store)
    if errors:
        first = min(errors)
        raise AssertionError(f"rank {first} raised:\n{errors[first]}")
    missing = expected - set(results)
    if missing:
        raise AssertionError(f"ranks {sorted(missing)} did not report within {deadline_s} s")
    return [results.get(r) for r in range(world_size)]
