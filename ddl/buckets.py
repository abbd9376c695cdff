"""``ddl.wrap``: gradient buckets reduced during backward, overlapping the rest of it.

# NOTE [Bucket lifecycle]
# 1. Plan (pure, ``plan_buckets``): parameters in reverse registration order (roughly the
#    order backward produces their gradients), grouped by (device, dtype), cut into
#    buckets of ``bucket_size`` bytes; the first bucket is capped at ``first_bucket_size``
#    so that communication starts early, as DDP does.
# 2. Fill: a post-accumulate-grad hook copies each gradient into its bucket's flat buffer.
#    The first hook of a backward queues ``_finalize`` on the autograd engine, which runs
#    after the last gradient and before ``backward()`` returns.
# 3. Launch: a complete bucket is reduced asynchronously on the communication worker (on
#    its own stream on accelerators; see ddl/group.py NOTE [One worker, one order]).
#    Buckets launch strictly in index order, so every rank issues the same collectives in
#    the same order even when a rank's unused parameters complete its buckets late.
# 4. Reduce: like DDP, the bucket is scaled by 1 / world size and then summed, and the
#    result is copied back into each ``.grad`` on the worker.
# 5. Finalize: buckets still incomplete hold parameters this rank did not use; their slots
#    take the gradient if one exists, else zeros, and they launch in order. A small
#    all-reduce of per-parameter "used" flags then tells which parameters no rank used:
#    those keep their ``.grad`` untouched (None stays None), the rest receive the reduced
#    value even on ranks that did not use them, as DDP with find_unused_parameters does.
# 6. ``grad_ready(params)`` is called in bucket order, in the backward thread, once a
#    bucket's values are in ``.grad`` (the caller's stream already ordered after them):
#    during backward for buckets that finished early, in ``_finalize`` for the rest.
#    This is where ``lms`` can page gradients to the host; ddl never imports lms.
#    Under ``no_sync()`` nothing is reduced, so each hook calls ``grad_ready([param])``
#    at once: every gradient produced in a backward is announced exactly once. A
#    ``grad_ready`` with a ``close()`` method is told so by ``remove()``: a pager that
#    waits for announcements (lms's does) then stops waiting, and can be kept.
# 7. A backward that raises (a user error, a failed collective, ``ddl.shutdown()`` in
#    between) never runs ``_finalize``. The engine then drops the callback object unrun,
#    which the next hook sees through a weak reference (not the graph task id: a reentrant
#    checkpoint runs an inner backward with another id inside a live one). If no bucket
#    was launched, nothing was sent: the stale state is reset and training goes on. If
#    some were, the other ranks' collectives no longer pair with ours, so every later
#    backward raises a DDLError until ``ddl.shutdown()`` and ``ddl.init()``.
# 8. The plan is fixed at wrap time. Freezing a parameter later is fine (no gradient:
#    treated as unused, rule 5), but a parameter that did not require grad at wrap time
#    (or was added later) and now gets a gradient would silently stay unreduced, so the
#    first hook of a backward checks for one and raises, saying to wrap again.
# 9. Buffers, as DDP's ``broadcast_buffers=True``: before a forward, rank 0's buffers are
#    copied to every rank when the previous forward ran with grad enabled and outside
#    ``no_sync()`` (the first forward after wrap too). That is a collective in forward:
#    every rank must run the same forwards, as with DDP; ``broadcast_buffers=False`` turns
#    it off (a rank-0-only evaluation, buffers that must stay per rank).
# 10. Each handle launches its own buckets in order (rule 3), but with several live
#    handles the interleaving follows the order gradients are produced, which can differ
#    between ranks (forward order, rank-dependent unused parameters): model A's bucket
#    would then be summed with model B's, silently when the sizes match. So while more
#    than one handle is live, every bucket (and used-flags exchange) first all-gathers a
#    small header naming handle and bucket, and a mismatch raises on every rank. One
#    wrapped model pays nothing. Handles are named by a count of wraps, so every rank must
#    wrap (and remove) the same models in the same order, as wrap's own check requires.
#    The handles of one backward share one end-of-backward callback that finalizes them
#    in wrap order, each even when another raised, so their used-flags exchanges line up
#    and a mismatch leaves every rank in step and every handle usable.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from . import group as _group
from .algorithms import allreduce_flat, resolve_algorithm
from .collectives import KIND_BUCKET, KIND_WRAP, broadcast_, check_same_everywhere
from .config import WrapConfig
from .errors import DDLError

__all__ = ["GradSync", "plan_buckets", "wrap"]


def plan_buckets(
    params: Sequence[tuple[int, str]], bucket_bytes: int, first_bucket_bytes: int
) -> tuple[tuple[int, ...], ...]:
    """Group parameter indices into buckets (see NOTE [Bucket lifecycle] rule 1).

    Args:
        params: ``(nbytes, key)`` per parameter in registration order; ``key`` names what
            must match inside a bucket (device and dtype).
        bucket_bytes: close a bucket once it holds at least this many bytes.
        first_bucket_bytes: the same for the first bucket closed.

    Returns:
        Buckets in launch order; each lists parameter indices in reverse registration order.

    Example:
        >>> plan_buckets([(4, "f32"), (4, "f32"), (8, "f32")], 8, 8)
        ((2,), (1, 0))
    """
    if bucket_bytes <= 0 or first_bucket_bytes <= 0:
        raise DDLError("bucket sizes must be positive")
    buckets: list[tuple[int, ...]] = []
    open_: dict[str, list[int]] = {}
    open_bytes: dict[str, int] = {}
    cap = first_bucket_bytes
    for i in reversed(range(len(params))):
        nbytes, key = params[i]
        open_.setdefault(key, []).append(i)
        open_bytes[key] = open_bytes.get(key, 0) + nbytes
        if open_bytes[key] >= cap:
            buckets.append(tuple(open_.pop(key)))
            del open_bytes[key]
            cap = bucket_bytes
    buckets.extend(tuple(v) for v in open_.values())
    return tuple(buckets)


# Live handles by model, so a second wrap of the same model is refused, not doubled.
_WRAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Handles not removed yet, and a count of successful wraps (the same on every rank, since
# wrap's layout check is collective) naming each handle alike everywhere (NOTE rule 10).
_LIVE: weakref.WeakSet = weakref.WeakSet()
_UIDS = itertools.count()


class _EndOfBackward:
    """Queued once per backward on the autograd engine; finalizes the handles in it.

    Every handle whose first hook fires in one backward (one graph task) joins the same
    object, and at the end of that backward they finalize in wrap order, not in the order
    their first gradients happened to arrive, so that their collectives line up across
    ranks; one handle's error does not skip the others' (NOTE [Bucket lifecycle] rule 10).
    When the backward raises, the engine drops this object unrun; handles hold only a weak
    reference, so a dead reference in the BACKWARD phase means "aborted" (rule 7).
    """

    def __init__(self) -> None:
        self.syncs: list[GradSync] = []

    def __call__(self) -> None:
        error: BaseException | None = None
        for sync in sorted(self.syncs, key=lambda g: g._uid):
            try:
                sync._finalize()
            except BaseException as e:  # the first one is raised, after all have run
                error = error or e
        if error is not None:
            raise error


# The _EndOfBackward of each running backward, by graph task id (weak: the engine owns it).
_ENDS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_ENDS_LOCK = threading.Lock()


def _graph_task() -> object:
    """The running backward's id; a fresh key (one end per handle) if torch lacks it."""
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get() if get is not None else object()


class _Phase(enum.Enum):
    IDLE = "idle"  # between backward passes
    BACKWARD = "backward"  # hooks firing, _finalize queued


class _Bucket:
    """One flat buffer, the parameters it holds, and its progress in the current backward."""

    def __init__(self, index: int, params: list[torch.nn.Parameter], algorithm: str):
        self.index = index
        self.params = params
        self.algorithm = algorithm
        self.offsets = []
        n = 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.numel = n
        self.buffer = torch.zeros(n, dtype=params[0].dtype, device=params[0].device)
        self.reset()

    def reset(self) -> None:
        self.ready = [False] * len(self.params)
        self.n_ready = 0
        self.handle: _group.Handle | None = None
        self.locally_unused: list[int] = []

    def view(self, k: int) -> torch.Tensor:
        p = self.params[k]
        return self.buffer[self.offsets[k] : self.offsets[k] + p.numel()].view_as(p)

    @property
    def complete(self) -> bool:
        return self.n_ready == len(self.params)


class GradSync:
    """The handle ``ddl.wrap`` returns: owns every hook it installed.

    ``remove()`` (idempotent) takes them all out; the handle is also a context manager.
    ``no_sync()`` skips reduction for gradient accumulation.

    Attributes:
        bucket_names: the plan, as parameter names per bucket (launch order).
        algorithms: the concrete algorithm of each bucket ("auto" resolved).
        launch_points: for the last backward, how many gradients were ready when each
            bucket launched (a bucket launched before the last gradient overlapped).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: WrapConfig,
        grad_ready: Callable[[list[torch.nn.Parameter]], None] | None,
    ):
        s = _group.current()
        if not isinstance(model, torch.nn.Module):
            raise DDLError(f"ddl.wrap needs a torch.nn.Module, got {type(model).__name__}")
        if grad_ready is not None and not callable(grad_ready):
            raise DDLError("grad_ready must be a callable taking a list of parameters")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise DDLError("ddl.wrap: the model has no parameters that require grad")
        live = _WRAPPED.get(model)
        if live is not None and not live._removed:
            raise DDLError(
                "ddl.wrap: this model is already wrapped; call remove() on the first handle "
                "(or use it as a context manager) before wrapping again"
            )
        for n, p in named:
            s.check_reducible(p.device, f"ddl.wrap: parameter {n!r}", "the model")
        self._config = config
        self._grad_ready = grad_ready
        self._lock = threading.RLock()
        self._phase = _Phase.IDLE
        self._end: weakref.ref | None = None  # the queued _EndOfBackward (NOTE rule 7)
        self._launched_in: _group._State | None = None  # the state buckets went out on
        self._sync = True
        self._removed = False
        self._model = weakref.ref(model)
        meta = [(p.numel() * p.element_size(), f"{p.device}/{p.dtype}") for _, p in named]
        plan = plan_buckets(meta, config.bucket_bytes, config.first_bucket_bytes)
        self._params = [p for _, p in named]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._buckets: list[_Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}
        for b, idx in enumerate(plan):
            ps = [self._params[i] for i in idx]
            nbytes = sum(p.numel() * p.element_size() for p in ps)
            alg = resolve_algorithm(config.algorithm, nbytes, s.topology)
            self._buckets.append(_Bucket(b, ps, alg))
            for k, i in enumerate(idx):
                self._where[i] = (b, k)
        self.bucket_names = tuple(tuple(named[i][0] for i in idx) for idx in plan)
        self.algorithms = tuple(b.algorithm for b in self._buckets)
        self.launch_points: list[int] = []
        # Same model everywhere? Checked before the broadcast, whose sizes depend on it.
        check = functools.partial(self._check_layout, s)
        _group.submit(s, torch.device("cpu"), check, None, "ddl.wrap", inline=True).wait()
        self._uid = next(_UIDS)
        if config.broadcast:
            with torch.no_grad():
                broadcast_([p.data for p in self._params] + [b.data for b in model.buffers()])
        self._hooks = [
            p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, i))
            for i, p in enumerate(self._params)
        ]
        # NOTE [Bucket lifecycle] rule 9: DDP's broadcast_buffers, only if there are any.
        self._buffers_next = True
        if config.broadcast_buffers and s.world_size > 1 and any(True for _ in model.buffers()):
            self._hooks.append(model.register_forward_pre_hook(self._pre_forward))
            self._hooks.append(model.register_forward_hook(self._post_forward))
        _WRAPPED[model] = self
        _LIVE.add(self)

    # ---------------------------------------------------------------- public surface

    def remove(self) -> None:
        """Remove every hook ``wrap`` installed; safe to call twice."""
        if self._removed:
            return
        self._removed = True
        _LIVE.discard(self)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        close = getattr(self._grad_ready, "close", None)
        if callable(close):
            close()  # NOTE [Bucket lifecycle] rule 6: no more announcements come

    def __enter__(self) -> GradSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Inside, backward accumulates local gradients without communication.

        Example:
            >>> import ddl, torch
            >>> _ = ddl.init()
            >>> model, x = torch.nn.Linear(2, 1), torch.ones(1, 2)
            >>> handle = ddl.wrap(model)
            >>> with handle.no_sync():
            ...     model(x).sum().backward()  # local only
            >>> model(x).sum().backward()  # reduces the accumulated gradients
            >>> model.weight.grad  # both backwards accumulated, then averaged over ranks
            tensor([[2., 2.]])
            >>> handle.remove()
            >>> ddl.shutdown()
        """
        prev = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = prev

    # ---------------------------------------------------------------- forward (buffers)

    def _pre_forward(self, module: torch.nn.Module, args: object) -> None:
        if self._removed or not self._buffers_next:
            return
        with torch.no_grad():
            broadcast_([b.data for b in module.buffers()])

    def _post_forward(self, module: torch.nn.Module, args: object, output: object) -> None:
        # DDP's require_forward_param_sync: the next forward syncs after a training one.
        self._buffers_next = torch.is_grad_enabled() and self._sync

    # ---------------------------------------------------------------- backward runtime

    def _on_grad(self, i: int, param: torch.Tensor) -> None:
        if self._removed:
            return
        if not self._sync:
            # No reduction in this step: the local gradient is already final for now, so
            # a gradient pager waiting on grad_ready may take it (NOTE rule 6).
            if self._grad_ready is not None:
                self._grad_ready([param])
            return
        with self._lock:
            if self._phase is _Phase.BACKWARD and self._end is not None and self._end() is None:
                self._recover_aborted()
            if self._phase is _Phase.IDLE:
                self._start_backward()
            b, k = self._where[i]
            bucket = self._buckets[b]
            if bucket.ready[k]:
                raise DDLError(
                    f"gradient of {self.bucket_names[b][k]!r} arrived twice in one backward: "
                    "either an earlier backward was interrupted by an exception before its "
                    "end (ranks are now out of step: restart the job), or the parameter's "
                    "gradient is accumulated twice per backward, which ddl.wrap does not support"
                )
            if param.grad.is_sparse:
                raise DDLError(
                    f"ddl.wrap: {self.bucket_names[b][k]!r} got a sparse gradient, which "
                    "buckets cannot hold; use dense gradients (e.g. nn.Embedding(sparse=False))"
                )
            with torch.no_grad():
                bucket.view(k).copy_(param.grad)
            bucket.ready[k] = True
            bucket.n_ready += 1
            self._n_ready += 1
            self._launch_in_order()
            self._deliver(block=False)

    def _recover_aborted(self) -> None:
        """The previous backward raised before its end (NOTE [Bucket lifecycle] rule 7)."""
        launched = self._next_launch
        if launched and self._launched_in is _group._STATE:
            raise DDLError(
                f"an earlier backward raised after ddl.wrap had started reducing {launched} of "
                f"{len(self._buckets)} gradient buckets, so this rank's collectives no longer "
                "pair up with the other ranks'; call ddl.shutdown() and ddl.init() again "
                "(usually: restart the job)"
            )
        self._phase = _Phase.IDLE  # nothing went out (or on a past ddl.init): start afresh
        self._end = None

    def _check_no_new_trainable(self) -> None:
        """NOTE [Bucket lifecycle] rule 8: a gradient ddl would not reduce must not exist."""
        model = self._model()
        if model is None:
            return
        for n, p in model.named_parameters():
            if p.requires_grad and id(p) not in self._index:
                raise DDLError(
                    f"ddl.wrap: parameter {n!r} requires grad now but did not when ddl.wrap was "
                    "called (or was added later), so its gradient would not be reduced and the "
                    "replicas would drift apart; call remove() on the handle and ddl.wrap the "
                    "model again after changing requires_grad (freezing later is fine)"
                )

    def _start_backward(self) -> None:
        self._check_no_new_trainable()
        self._phase = _Phase.BACKWARD
        for bucket in self._buckets:
            bucket.reset()
        self._n_ready = 0
        self._next_launch = 0
        self._next_deliver = 0
        self.launch_points = []
        self._launched_in = _group._STATE
        with _ENDS_LOCK:
            key = _graph_task()
            end = _ENDS.get(key)
            if end is None:
                end = _ENDS[key] = _EndOfBackward()
                torch.autograd.Variable._execution_engine.queue_callback(end)
            end.syncs.append(self)
        self._end = weakref.ref(end)

    def _launch_in_order(self) -> None:
        while self._next_launch < len(self._buckets):
            bucket = self._buckets[self._next_launch]
            if not bucket.complete:
                return
            self._launch(bucket)
            self._next_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        s = _group.current()
        grp = s.group_for(bucket.buffer.device)
        nccl = grp is s.world and s.backend == "nccl"
        used = [k for k in range(len(bucket.params)) if k not in bucket.locally_unused]
        self.launch_points.append(self._n_ready)
        check = len(_LIVE) > 1  # NOTE [Bucket lifecycle] rule 10

        def run() -> None:
            if check:
                self._check_turn(s, bucket.index, bucket.numel)
            buf = bucket.buffer
            # NOTE [Bucket lifecycle] rule 4. DDP multiplies by the reciprocal (not x / p):
            # the same for a power-of-two world size, one rounding apart otherwise.
            buf.mul_(1.0 / s.world_size)
            alg, down = bucket.algorithm, s.down_for(grp)
            allreduce_flat(buf, "sum", alg, s.rank, s.topology, grp, s.timeout, nccl, down)
            with torch.no_grad():
                for k in used:
                    bucket.params[k].grad.copy_(bucket.view(k))

        what = f"ddl.wrap bucket {bucket.index} ({bucket.numel} x {bucket.buffer.dtype})"
        bucket.handle = _group.submit(s, bucket.buffer.device, run, None, what)

    def _check_layout(self, s: _group._State) -> None:
        sizes = [b.numel for b in self._buckets]
        layout = [(b.numel, str(b.buffer.dtype), b.algorithm) for b in self._buckets]
        crc = zlib.crc32(repr(layout).encode())
        row = [KIND_WRAP, _group.current_seq(), len(sizes), sum(sizes), crc]
        check_same_everywhere(
            s,
            row,
            "ddl.wrap",
            advice="every rank must wrap the same model (same parameters, shapes, dtypes, "
            "bucket_size and algorithm) at the same point of the program",
        )

    def _check_turn(self, s: _group._State, index: int, numel: int) -> None:
        """Same handle and bucket on every rank at this point? (NOTE rule 10; worker.)"""
        row = [KIND_BUCKET, _group.current_seq(), self._uid, index, numel]
        check_same_everywhere(
            s,
            row,
            "ddl.wrap",
            advice="with several wrapped models, every rank must produce their gradients in "
            "the same order (run their forwards in the same order on every rank, and use a "
            "model's parameters alike), or wrap one module that holds them all",
        )

    def _deliver(self, block: bool) -> None:
        """Call grad_ready for finished buckets, in order (NOTE [Bucket lifecycle] rule 6)."""
        while self._next_deliver < self._next_launch:
            bucket = self._buckets[self._next_deliver]
            if bucket.locally_unused and not block:
                return  # needs the used-flags exchange of _finalize first
            if not block and not bucket.handle.done():
                return
            if not block and bucket.handle._future.exception() is not None:
                # Raised from a hook, the error would end this rank's backward here while
                # the others go on issuing collectives (out of step for good); _finalize
                # raises it after every collective of this backward is issued.
                return
            bucket.handle.wait()
            if bucket.locally_unused:
                self._write_unused(bucket)
            if self._grad_ready is not None:
                self._grad_ready([p for p in bucket.params if p.grad is not None])
            self._next_deliver += 1

    def _finalize(self) -> None:
        with self._lock:
            try:
                with torch.no_grad():
                    for bucket in self._buckets[self._next_launch :]:
                        for k, p in enumerate(bucket.params):
                            if bucket.ready[k]:
                                continue
                            bucket.locally_unused.append(k)
                            v = bucket.view(k)
                            v.copy_(p.grad) if p.grad is not None else v.zero_()
                            bucket.ready[k] = True
                            bucket.n_ready += 1
                self._launch_in_order()
                self._global_used = self._exchange_used_flags()
                self._deliver(block=True)
            finally:
                self._phase = _Phase.IDLE

    def _exchange_used_flags(self) -> torch.Tensor | None:
        """How many ranks used each parameter; None when every rank used every one."""
        s = _group.current()
        flags = torch.ones(len(self._params), dtype=torch.int32)
        for bucket in self._buckets:
            for k in bucket.locally_unused:
                flags[self._index[id(bucket.params[k])]] = 0

        check = len(_LIVE) > 1  # NOTE [Bucket lifecycle] rule 10

        def run() -> None:
            if check:
                self._check_turn(s, -1, flags.numel())
            work = dist.all_reduce(flags, group=s.cpu, async_op=True)
            work.wait(s.timeout)

        _group.submit(s, torch.device("cpu"), run, None, "ddl.wrap used-parameter flags").wait()
        return flags

    def _write_unused(self, bucket: _Bucket) -> None:
        with torch.no_grad():
            for k in bucket.locally_unused:
                p = bucket.params[k]
                if int(self._global_used[self._index[id(p)]]) == 0:
                    continue  # no rank used it: leave .grad as it was (None stays None)
                if p.grad is None:
                    p.grad = bucket.view(k).clone()
                else:
                    p.grad.copy_(bucket.view(k))


def wrap(
    model: torch.nn.Module,
    bucket_size: int | str = "25MiB",
    algorithm: str = "auto",
    grad_ready: Callable[[list[torch.nn.Parameter]], None] | None = None,
    *,
    first_bucket_size: int | str = "1MiB",
    broadcast: bool = True,
    broadcast_buffers: bool = True,
) -> GradSync:
    """Make every ``.grad`` the mean over all ranks when ``backward()`` returns.

    Gradients are bucketed and reduced during backward (see NOTE [Bucket lifecycle]);
    results equal ``torch.nn.parallel.DistributedDataParallel`` with
    ``find_unused_parameters=True``. The model itself is not replaced: call it as before.

    Args:
        model: the module whose parameters to synchronise (all that require grad).
        bucket_size: bytes per bucket, e.g. ``"25MiB"``.
        algorithm: allreduce algorithm per bucket (``"auto"`` asks the cost model).
        grad_ready: called with a bucket's parameters once their reduced gradients are
            in ``.grad``, in bucket order, during or at the end of backward (the hook
            point for ``lms`` gradient paging). If it has a ``close()`` method,
            ``remove()`` calls it.
        first_bucket_size: cap of the first bucket, so communication starts early.
        broadcast: copy rank 0's parameters and buffers to all ranks now.
        broadcast_buffers: copy rank 0's buffers to all ranks before forwards, as DDP's
            option of that name does (see ``WrapConfig``; NOTE rule 9).

    Returns:
        A :class:`GradSync` handle: ``remove()``, context manager, ``no_sync()``.

    Raises:
        DDLError: before ``ddl.init()``, bad sizes or algorithm, a model without
            trainable parameters, or ranks wrapping different models (the message
            lists what each rank has).

    Example:
        >>> import ddl, torch
        >>> _ = ddl.init()
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> handle = ddl.wrap(model, bucket_size="25MiB")
        >>> handle.bucket_names  # in reverse, the order in which backward produces grads
        (('bias', 'weight'),)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()  # grads averaged over ranks
        >>> opt.step()
        >>> handle.remove()
        >>> ddl.shutdown()
    """
    config = WrapConfig(
        bucket_size=bucket_size,
        first_bucket_size=first_bucket_size,
        algorithm=algorithm,
        broadcast=broadcast,
        broadcast_buffers=broadcast_buffers,
    )
    return GradSync(model, config, grad_ready)
