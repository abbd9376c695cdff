"""Process state: ``init``/``shutdown``, ddl's own process groups, the communication worker.

# NOTE [One worker, one order]
# 1. Every ddl collective runs on one background thread per process ("ddl-comm"), in the
#    order it was submitted. Ranks submit in the same program order, so the point-to-point
#    messages of ring steps always pair up, and the caller (or the autograd engine during
#    backward) never blocks on the network: this is what makes every collective async.
# 2. ddl talks only on its own groups (created in ``init``), never on the default group,
#    so user collectives in the main thread cannot interleave with ours.
# 3. On an accelerator the worker enqueues on a dedicated communication stream that first
#    waits on an event recorded on the caller's stream at submit time; ``Handle.wait``
#    makes the caller's current stream wait on the event recorded after the collective.
#    On the CPU the same code runs with ``torch.cpu``'s no-op streams and events.
# 4. Every wait has the ``init(timeout=...)`` deadline. When a collective fails (timeout,
#    a peer closed its connection), the live ranks post "arrived at collective #seq" to
#    the rendezvous store and read who else did; the error names the ranks that did not.
#    After such a failure the groups hold unmatched messages, so ddl refuses further
#    collectives until ``shutdown()`` and a new ``init()``: fail loudly, never silently.
# 5. Ranks that disagree on a tensor (shape, dtype, op, algorithm) are found before any
#    data moves, by an all-gather of a small integer header on a Gloo group; all ranks see
#    the same table and raise the same error, so nothing is left half-sent.
# 6. A blocking call that finds nothing queued or running runs in the caller's thread
#    (still numbered and under the same execution lock), saving the thread hand-off
#    on small messages; the order is unchanged because nothing else was pending.
# 7. Gloo gives each pair of ranks one TCP connection per group, and a connection that
#    carries a large message each way at once ran at about the speed of one direction
#    on a rate-limited link (two-rank rings do exactly that). So on Gloo, point-to-point
#    messages to a higher rank use ``cpu`` and messages to a lower rank use ``cpu_down``:
#    each connection carries one direction, and full-duplex links are used both ways.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .errors import DDLError
from .topology import Topology, local_size_from_env

__all__ = [
    "Handle",
    "current",
    "init",
    "is_initialized",
    "local_rank",
    "local_size",
    "rank",
    "shutdown",
    "topology",
    "world_size",
]

_DEFAULT_TIMEOUT_S = 300.0


@dataclass
class _State:
    """Everything ``init`` set up; one per process (see NOTE [One worker, one order])."""

    rank: int
    world_size: int
    topology: Topology
    backend: str
    device: torch.device
    timeout: datetime.timedelta
    world: Any  # ddl's group on the job's backend
    cpu: Any  # a Gloo group: headers, host tensors, failure diagnosis
    cpu_down: Any  # a second Gloo group: point-to-point traffic to lower ranks (rule 7)
    store: Any  # rendezvous store for the "who arrived" diagnosis; may be None
    owns_default_group: bool
    check: bool
    worker: concurrent.futures.ThreadPoolExecutor
    seq: int = 0
    failed: str | None = None
    streams: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # numbering + queueing
    exec_lock: threading.Lock = field(default_factory=threading.Lock)  # one body at a time
    pending: int = 0  # collectives queued or running

    def group_for(self, device: torch.device) -> Any:
        """Host tensors go over Gloo; device tensors over the job's backend."""
        return self.cpu if device.type == "cpu" else self.world

    def check_reducible(self, device: torch.device, subject: str, move: str) -> None:
        """Refuse data on a device kind the job's backend does not reduce.

        Host tensors always go over Gloo (``group_for``); device tensors need the
        job's own kind (a CUDA tensor cannot go over a Gloo job, nor an XPU one over
        NCCL). ``subject`` names the data in the message, ``move`` what to move.
        """
        if self.group_for(device) is self.world and device.type != self.device.type:
            raise DDLError(
                f"{subject} is on {device}, but the {self.backend} job reduces "
                f"{self.device.type} tensors; move {move} to {self.device} (or to the CPU, "
                "which uses Gloo), or launch with the matching backend"
            )

    def down_for(self, group: Any) -> Any:
        """The group for messages to lower ranks when ``group`` is Gloo (rule 7), else None."""
        return self.cpu_down if group is self.cpu else None

    def stream_for(self, device: torch.device) -> Any:
        """The communication stream of ``device`` (created once), or None on the CPU."""
        if device.type == "cpu":
            return None
        key = str(device)
        if key not in self.streams:
            self.streams[key] = getattr(torch, device.type).Stream(device=device)
        return self.streams[key]


_STATE: _State | None = None
_GENERATION = 0


def current() -> _State:
    """The live state, or DDLError saying to call ``ddl.init()``."""
    if _STATE is None:
        raise DDLError(
            "ddl is not initialised: call ddl.init() first (launch with torchrun, e.g. "
            "`torchrun --nproc-per-node=2 train.py`), then use ddl.allreduce / ddl.wrap"
        )
    return _STATE


def is_initialized() -> bool:
    """True between ``ddl.init()`` and ``ddl.shutdown()``."""
    return _STATE is not None


def rank() -> int:
    """This process's global rank."""
    return current().rank


def world_size() -> int:
    """Number of ranks in the job."""
    return current().world_size


def local_size() -> int:
    """Ranks per node as ddl sees them (``DDL_LOCAL_SIZE`` / ``local_size=`` override)."""
    return current().topology.local_size


def local_rank() -> int:
    """This rank's index within its (possibly simulated) node."""
    s = current()
    return s.topology.local_rank_of(s.rank)


def topology() -> Topology:
    """The :class:`~ddl.topology.Topology` ``init`` built."""
    return current().topology


def _as_timedelta(timeout: float | datetime.timedelta) -> datetime.timedelta:
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise DDLError(f"timeout must be seconds or a timedelta, got {timeout!r}")
    if not seconds > 0:
        raise DDLError(f"timeout must be positive, got {seconds} s")
    return datetime.timedelta(seconds=seconds)


def init(
    backend: str | None = None,
    local_size: int | None = None,
    timeout: float | datetime.timedelta | None = None,
    check: bool | None = None,
) -> Topology:
    """Join the job started by torchrun and build ddl's groups.

    If ``torch.distributed`` is already initialised (by you, or another library), ddl
    adopts that job; otherwise it initialises it from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Calling ``init`` again returns the
    running job's topology; asking it for other settings than the running ones raises.

    Args:
        backend: ``"nccl"`` / ``"gloo"`` / ...; default ``"nccl"`` when CUDA is available,
            else ``"gloo"``. Ignored when adopting an existing job.
        local_size: ranks per node; default ``DDL_LOCAL_SIZE``, else ``LOCAL_WORLD_SIZE``,
            else the world size. Set it (or ``DDL_LOCAL_SIZE``) to simulate several nodes
            on one machine.
        timeout: seconds (or a timedelta) any single collective may take before it fails
            with a DDLError naming the ranks that did not arrive; default 300.
        check: check before each ``allreduce`` that all ranks pass the same shape, dtype,
            op and algorithm (one small Gloo all-gather); default True. ``wrap`` checks
            its bucket layout once, whatever this says.

    Returns:
        The :class:`~ddl.topology.Topology` (world size, local size).

    Raises:
        DDLError: when not launched by torchrun and no job exists, on a bad local size,
            or when ddl is already running with other settings than those passed.

    Example:
        >>> import ddl  # one rank here; under torchrun every rank runs the same
        >>> topo = ddl.init()  # with 4 ranks, init(local_size=2) simulates 2 nodes x 2 ranks
        >>> topo, ddl.rank(), ddl.world_size()
        (Topology(world_size=1, local_size=1), 0, 1)
        >>> ddl.init() is topo  # a second call returns the running job's topology
        True
        >>> ddl.shutdown()
    """
    global _STATE, _GENERATION
    td = _as_timedelta(_DEFAULT_TIMEOUT_S if timeout is None else timeout)
    if _STATE is not None:
        _check_same_settings(_STATE, backend, local_size, None if timeout is None else td, check)
        return _STATE.topology
    if not dist.is_available():
        raise DDLError("torch.distributed is not available in this build of torch")
    owns = False
    if not dist.is_initialized():
        missing = [
            k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
        ]
        if missing:
            raise DDLError(
                f"ddl.init() found no distributed job: {', '.join(missing)} not set. Launch "
                "with torchrun (e.g. `torchrun --nproc-per-node=2 train.py`), or call "
                "torch.distributed.init_process_group(...) before ddl.init()"
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(_device_index())
        dist.init_process_group(backend=backend, init_method="env://", timeout=td)
        owns = True
    the_backend = str(dist.get_backend())
    if "nccl" in the_backend:  # also "cpu:gloo,cuda:nccl" style jobs
        the_backend = "nccl"
    elif "gloo" in the_backend:
        the_backend = "gloo"
    r, ws = dist.get_rank(), dist.get_world_size()
    topo = Topology(ws, local_size_from_env(os.environ, ws, local_size))
    device = torch.device("cpu")
    if the_backend == "nccl":
        # Ours: set from LOCAL_RANK above. Adopted: the user already chose the device.
        device = torch.device("cuda", torch.cuda.current_device())
    # Collective in every rank, in the same order (see NOTE [One worker, one order] rule 2).
    world = dist.new_group(backend=the_backend, timeout=td)
    cpu = world if the_backend == "gloo" else dist.new_group(backend="gloo", timeout=td)
    cpu_down = dist.new_group(backend="gloo", timeout=td)
    # Gloo connects a group's pairs while constructing it, and a rank can finish its side
    # before a peer has. Without this barrier a rank that returns from init and dies at
    # once can break a peer's handshake, which then fails with Gloo's own error instead
    # of the DDLError that names the missing rank at its first collective.
    dist.barrier(group=cpu_down)
    if the_backend == "nccl":
        # NCCL wants the first operation on a communicator to involve every rank (a
        # batched send/recv of a ring may not); this also builds the communicator now.
        dist.all_reduce(torch.zeros(1, device=device), group=world)
        torch.cuda.synchronize(device)
    store = None
    try:
        store = dist.PrefixStore(f"ddl/{_GENERATION}/", dist.distributed_c10d._get_default_store())
    except Exception:  # private API moved: keep working, diagnose without names
        store = None
    _GENERATION += 1
    _STATE = _State(
        rank=r,
        world_size=ws,
        topology=topo,
        backend=the_backend,
        device=device,
        timeout=td,
        world=world,
        cpu=cpu,
        cpu_down=cpu_down,
        store=store,
        owns_default_group=owns,
        check=True if check is None else bool(check),
        worker=concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ddl-comm"),
    )
    return topo


def _check_same_settings(
    state: _State,
    backend: str | None,
    local_size: int | None,
    timeout: datetime.timedelta | None,
    check: bool | None,
) -> None:
    """A repeated ``init`` may only ask for what is running: silently keeping the old
    settings would, e.g., run flat rings where the caller asked for simulated nodes."""
    asked = {
        "backend": (backend, state.backend),
        "local_size": (local_size, state.topology.local_size),
        "timeout": (timeout, state.timeout),
        "check": (None if check is None else bool(check), state.check),
    }
    differ = [f"{k}={a!r} (running: {r!r})" for k, (a, r) in asked.items() if a not in (None, r)]
    if differ:
        raise DDLError(
            f"ddl is already initialised with other settings: {', '.join(differ)}; call "
            "ddl.shutdown() first to start again with new ones"
        )


def _device_index() -> int:
    """The CUDA device of this process: torchrun's real LOCAL_RANK, not the simulated one."""
    if "LOCAL_RANK" in os.environ:
        idx = int(os.environ["LOCAL_RANK"])
    else:
        idx = int(os.environ.get("RANK", "0"))
    n = max(torch.cuda.device_count(), 1)
    return idx % n


def shutdown() -> None:
    """Wait for pending collectives, destroy ddl's groups (and the job, if ddl created it).

    Safe to call twice, and after a failed collective (it then skips the wait).

    Example:
        >>> import ddl
        >>> _ = ddl.init()
        >>> ddl.shutdown()
        >>> ddl.is_initialized()
        False
        >>> ddl.shutdown()  # a second call does nothing
    """
    global _STATE
    s = _STATE
    if s is None:
        return
    _STATE = None
    s.worker.shutdown(wait=s.failed is None)
    if s.failed is not None:
        # Groups with unmatched messages cannot be torn down collectively; drop them.
        return
    if not dist.is_initialized():
        return  # the user destroyed the job's groups already, ddl's with them
    try:
        if s.owns_default_group:
            dist.destroy_process_group()
        else:
            for g in {id(s.world): s.world, id(s.cpu): s.cpu, id(s.cpu_down): s.cpu_down}.values():
                dist.destroy_process_group(g)
    except Exception as e:  # a dead peer: nothing left to tear down cleanly
        raise DDLError(f"ddl.shutdown could not destroy its process groups: {e}") from e


# --------------------------------------------------------------------------- runtime


class Handle:
    """A pending collective: ``wait()`` for its result, ``done()`` to poll.

    Returned by every ``*_async`` function (see NOTE [One worker, one order]). Waiting
    twice is fine and returns the same object.

    Example:
        >>> import ddl, torch
        >>> _ = ddl.init()
        >>> t = torch.ones(3)
        >>> h = ddl.allreduce_async(t, op="mean")  # compute here while the reduction runs
        >>> h.wait() is t, t
        (True, tensor([1., 1., 1.]))
        >>> h.done(), h.wait() is t  # done now; waiting again returns the same object
        (True, True)
        >>> ddl.shutdown()
    """

    def __init__(self, future: concurrent.futures.Future, result: Any, device: torch.device):
        self._future = future
        self._result = result
        self._device = device
        self._waited = False

    def __del__(self) -> None:
        # A failure nobody waits for would vanish: the next collective runs fine while
        # this one's tensor was never reduced. Say so, as asyncio does for its tasks.
        if not self._waited:
            self._future.add_done_callback(_warn_if_failed)

    def done(self) -> bool:
        """True once the collective finished (successfully or not); never blocks."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the collective is done and return its (in-place) result.

        Args:
            timeout: seconds to wait here; None relies on the per-collective timeout
                of ``init`` (the worker never waits longer than that per operation).

        Returns:
            The object passed to the collective, now holding the reduced values.

        Raises:
            DDLError: the collective failed (message says which and why), or ``timeout``
                passed first.
        """
        self._waited = True
        try:
            event = self._future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise DDLError(
                f"Handle.wait(timeout={timeout}) expired before the collective finished; "
                "wait longer, or check that every rank called the same collectives"
            ) from None
        if event is not None:
            getattr(torch, self._device.type).current_stream(self._device).wait_event(event)
        return self._result


def _warn_if_failed(future: concurrent.futures.Future) -> None:
    error = future.exception()
    if error is not None:
        warnings.warn(
            f"a ddl collective failed and its Handle was dropped without wait(): {error}",
            RuntimeWarning,
            stacklevel=2,
        )


def submit(
    s: _State,
    device: torch.device,
    fn: Callable[[], None],
    result: Any,
    what: str,
    inline: bool = False,
) -> Handle:
    """Run ``fn`` after the caller's pending work on ``device``, in submission order.

    Args:
        s: the state.
        device: where ``fn``'s tensors live (selects the stream).
        fn: the collective's body.
        result: what ``Handle.wait()`` returns.
        what: the operation's name for errors.
        inline: the caller will wait right away (blocking form); if nothing is queued
            or running, run in the caller's thread and skip the hand-off to the worker
            (NOTE [One worker, one order] rule 6).
    """
    if s.failed is not None:
        raise DDLError(
            f"ddl cannot run {what}: an earlier collective failed ({s.failed}); "
            "call ddl.shutdown() and ddl.init() again (usually: restart the job)"
        )
    ready = None
    if device.type != "cpu":
        mod = getattr(torch, device.type)
        ready = mod.Event()
        ready.record(mod.current_stream(device))
    seq = 0

    def body() -> Any:
        stream = s.stream_for(device)
        if stream is None:
            _guarded(s, seq, what, fn)
            return None
        mod = getattr(torch, device.type)
        mod.set_device(device)
        stream.wait_event(ready)
        with mod.stream(stream):
            _guarded(s, seq, what, fn)
            done = mod.Event()
            done.record(stream)
        return done

    def task() -> Any:
        try:
            with s.exec_lock:
                return body()
        finally:
            with s.lock:
                s.pending -= 1

    with s.lock:  # numbering and queueing together, so the order is the numbering
        s.seq += 1
        seq = s.seq
        s.pending += 1
        run_here = inline and s.pending == 1
        if run_here:
            s.exec_lock.acquire()  # free: nothing is queued or running
        else:
            future = s.worker.submit(task)
    if run_here:
        future = concurrent.futures.Future()
        try:
            future.set_result(body())
        except BaseException as e:  # delivered by Handle.wait, like the worker's
            future.set_exception(e)
        finally:
            s.exec_lock.release()
            with s.lock:
                s.pending -= 1
    return Handle(future, result, device)


_CURRENT_SEQ = threading.local()


def current_seq() -> int:
    """The sequence number of the collective the worker is running (for headers)."""
    return getattr(_CURRENT_SEQ, "seq", 0)


def _guarded(s: _State, seq: int, what: str, fn: Callable[[], None]) -> None:
    """Run one collective; turn a backend failure into a DDLError naming the missing ranks."""
    if s.failed is not None:
        raise DDLError(
            f"ddl skipped {what} (#{seq}): an earlier collective failed ({s.failed}); "
            "call ddl.shutdown() and ddl.init() again"
        )
    _CURRENT_SEQ.seq = seq
    try:
        fn()
    except DDLError:
        raise
    except Exception as e:
        missing = _who_is_missing(s, seq)
        if missing is None:
            names = "could not tell which ranks are missing (the rendezvous store is gone, "
            names += "so rank 0, which hosts it, probably died)"
        elif missing:
            names = f"ranks {missing} did not arrive"
        else:
            names = (
                "every rank arrived, so the failure is in the transport or on this rank "
                f"itself ({type(e).__name__})"
            )
        msg = (
            f"{what} (collective #{seq}) failed on rank {s.rank} after up to "
            f"{s.timeout.total_seconds():g} s: {names}. A rank died, stalled, or called a "
            f"different collective; check its log, or raise ddl.init(timeout=...). "
            f"Backend said: {str(e).strip()[:300]}"
        )
        s.failed = f"{what} #{seq}: {names}"
        raise DDLError(msg) from e
    finally:
        _CURRENT_SEQ.seq = 0


def _who_is_missing(s: _State, seq: int) -> list[int] | None:
    """Post our arrival at ``seq`` and list the ranks that do not post theirs in time."""
    if s.store is None:
        return None
    prefix = f"arrived/{seq}/"
    try:
        s.store.set(f"{prefix}{s.rank}", "1")
        # Live ranks fail within about one timeout of each other; give them a grace period.
        grace = min(max(s.timeout.total_seconds() / 2, 1.0), 10.0)
        deadline = time.monotonic() + grace
        while True:
            missing = [r for r in range(s.world_size) if not s.store.check([f"{prefix}{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.05)
    except Exception:
        return None
