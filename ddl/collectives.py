"""The public collectives: ``allreduce`` / ``allreduce_async`` (and ``broadcast`` for wrap).

Each collective is async first (see NOTE [One worker, one order] in ``ddl/group.py``): the
``*_async`` form returns a :class:`~ddl.group.Handle`; the blocking form is that plus
``wait()``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from . import group as _group
from .algorithms import OPS, allreduce_flat, resolve_algorithm
from .errors import DDLError
from .interop import SUPPORTED_DTYPES, FlatArray, flat_array
from .topology import CHOICES

__all__ = ["allreduce", "allreduce_async", "broadcast_", "check_same_everywhere"]

_MAX_DIMS = 6
_DIGEST_MOD = (1 << 61) - 1  # a prime: the shape digest of _header stays in an int64
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")
# Every header has the same length, whatever the operation, so that ranks calling
# different operations still exchange equal-sized headers and see the difference.
_HEADER_LEN = 16
KIND_ALLREDUCE, KIND_WRAP, KIND_BUCKET, KIND_REJECTED = 1, 2, 3, 4


def _header(seq: int, a: FlatArray, op: str, algorithm: str) -> list[int]:
    shape = a.shape
    dims = list(shape[:_MAX_DIMS]) + [-1] * (_MAX_DIMS - min(len(shape), _MAX_DIMS))
    dev = _DEVICE_TYPES.index(a.device.type) if a.device.type in _DEVICE_TYPES else 99
    return [
        KIND_ALLREDUCE,
        seq,
        a.numel,
        SUPPORTED_DTYPES.index(a.dtype),
        OPS.index(op) if op in OPS else 99,
        CHOICES.index(algorithm) if algorithm in CHOICES else 99,
        dev,
        len(shape),
        *dims,
        _shape_digest(shape),
    ]


def _shape_digest(shape: tuple[int, ...]) -> int:
    """A number that differs, but for a 2^-61 chance, between two different shapes.

    The header spells out only the first ``_MAX_DIMS`` sizes; this covers the rest, so
    that (1,1,1,1,1,1,2,3) and (1,1,1,1,1,1,3,2) are told apart too. Plain arithmetic,
    not ``hash()``, so that every process computes the same number.
    """
    h = len(shape)
    for d in shape:
        h = (h * 1_000_003 + int(d) + 1) % _DIGEST_MOD
    return h


def _describe(row: list[int]) -> str:
    """Words for a header row (see ``_header`` and ``wrap_header``)."""
    if row[0] == KIND_BUCKET:
        part = "used-parameter flags" if row[3] < 0 else f"bucket {row[3]}"
        return f"wrapped model #{row[2]}'s {part} ({row[4]} elements), collective #{row[1]}"
    if row[0] == KIND_WRAP:
        return f"ddl.wrap of {row[2]} buckets, {row[3]} gradient elements, collective #{row[1]}"
    if row[0] == KIND_REJECTED:
        return (
            "an allreduce it rejected as bad input before sending anything (the DDLError "
            f"on that rank says why), collective #{row[1]}"
        )
    if row[0] != KIND_ALLREDUCE:
        return f"unknown operation {row}"
    seq, numel, dt, op_i, alg_i, dev_i, ndim = row[1:8]
    dims = row[8 : 8 + min(ndim, _MAX_DIMS)]
    shape = str(tuple(dims))
    if ndim > _MAX_DIMS:  # the digest tells apart what the first dims do not show
        shape = f"{shape[:-1]}, ...) ({ndim} dims, digest {row[8 + _MAX_DIMS]:#x})"
    dtype = str(SUPPORTED_DTYPES[dt]).replace("torch.", "")
    op = OPS[op_i] if op_i < len(OPS) else "?"
    alg = CHOICES[alg_i] if alg_i < len(CHOICES) else "?"
    dev = _DEVICE_TYPES[dev_i] if dev_i < len(_DEVICE_TYPES) else "?"
    return (
        f"allreduce of shape {shape} {dtype} on {dev}, op={op!r}, algorithm={alg!r}, "
        f"collective #{seq}"
    )


def check_same_everywhere(
    s: Any,
    row: list[int],
    what: str,
    advice: str = "every rank must call the same collectives in the same order with tensors "
    "of the same shape and dtype and the same op and algorithm",
) -> None:
    """All-gather a small integer header on the Gloo group; raise if ranks disagree.

    Runs on the worker. Every rank sees the same table, so all raise together and no
    data message is left unmatched (NOTE [One worker, one order] rule 5).

    Args:
        s: the ddl state.
        row: this rank's header: ``[kind, seq, ...]``, padded here to a fixed length.
        what: the operation, for the message.
        advice: what the user should do, appended to the message.

    Raises:
        DDLError: the headers differ; the message groups ranks by what they passed.
    """
    row = list(row) + [0] * (_HEADER_LEN - len(row))
    mine = torch.tensor(row, dtype=torch.int64)
    table = [torch.empty_like(mine) for _ in range(s.world_size)]
    work = dist.all_gather(table, mine, group=s.cpu, async_op=True)
    work.wait(s.timeout)
    rows = [t.tolist() for t in table]
    if all(r == rows[0] for r in rows):
        return
    groups: dict[str, list[int]] = {}
    for rk, r in enumerate(rows):
        groups.setdefault(_describe(r), []).append(rk)
    detail = "; ".join(f"ranks {v}: {k}" for k, v in groups.items())
    raise DDLError(f"{what}: ranks disagree ({detail}); {advice}")


def allreduce_async(
    x: Any,
    op: str = "sum",
    algorithm: str = "auto",
    check: bool | None = None,
    _inline: bool = False,
) -> _group.Handle:
    """Start an in-place allreduce of ``x`` across all ranks; return a handle to wait on.

    Args:
        x: a torch tensor (any device ddl's backend reaches), a NumPy array, or a CuPy
            array; viewed through DLPack without a copy where possible. Its values are
            read when the collective's turn comes (after those submitted before it, so
            two queued on one tensor compose), and the result is written when it ends:
            keep it alive and leave it alone until the handle is waited on.
        op: ``"sum"`` or ``"mean"`` (``mean`` = sum / world size; floating dtypes only).
        algorithm: ``"native"``, ``"ring"``, ``"multiring"``, ``"hierarchical"`` or
            ``"auto"`` (asks ``ddl.costmodel.choose_algorithm``).
        check: verify first that every rank passes the same shape/dtype/op/algorithm;
            default: ``ddl.init(check=...)`` (True). Every rank must pass the same value.
            With ``False`` ranks that disagree are not caught: Gloo may abort the process
            on a size mismatch, or the collective waits out the timeout, and a rank that
            rejects its input (below) falls out of step with the others.

    Returns:
        A :class:`~ddl.group.Handle`; ``wait()`` returns ``x`` holding the result.

    Raises:
        DDLError: before ``init``; bad type, dtype, op or algorithm; an algorithm that does
            not fit the topology. Mismatches across ranks and timeouts surface from
            ``wait()``; so does another rank's rejection of its input, when ``check`` is
            on (the rejecting rank still takes its turn, so no rank falls out of step).

    Example:
        >>> import ddl, torch
        >>> _ = ddl.init()
        >>> grad = torch.full((3,), 2.0)
        >>> h = ddl.allreduce_async(grad, op="mean", algorithm="ring")
        >>> h.wait()  # grad itself, now the mean over ranks
        tensor([2., 2., 2.])
        >>> ddl.shutdown()
    """
    s = _group.current()
    what = f"ddl.allreduce(op={op!r}, algorithm={algorithm!r})"
    if not dist.is_initialized():
        # dist.destroy_process_group() also destroyed ddl's groups: a ring would fail on
        # the worker (and stop ddl with a misleading "transport" error) and native would
        # run on a destroyed group. Nothing can be exchanged any more, so just say so.
        raise DDLError(
            f"{what}: torch.distributed's process group was destroyed while ddl was "
            "running; call ddl.shutdown() before dist.destroy_process_group(), and "
            "ddl.init() again to reduce after that"
        )
    do_check = s.check if check is None else bool(check)
    try:
        if op not in OPS:
            raise DDLError(f"{what}: unknown op {op!r}; use one of {', '.join(OPS)}")
        a = flat_array(x, "ddl.allreduce")
        if op == "mean" and not a.dtype.is_floating_point:
            raise DDLError(f"{what}: op='mean' needs a floating dtype, got {a.dtype}; use op='sum'")
        s.check_reducible(a.device, f"{what}: tensor", "it")
        group = s.group_for(a.device)
        concrete = resolve_algorithm(algorithm, a.numel * a.dtype.itemsize, s.topology)
    except Exception as e:
        if do_check:
            _take_turn_rejected(s, what)
        if isinstance(e, DDLError):
            raise
        # Something the checks did not foresee (a tensor subclass, a producer's own
        # error): still ours, and the turn above keeps the ranks in step.
        raise DDLError(
            f"{what}: could not prepare the {type(x).__name__} ({type(e).__name__}: {e}); "
            "pass a plain torch tensor or NumPy array"
        ) from e
    nccl = group is s.world and s.backend == "nccl"

    def run() -> None:
        if do_check:
            check_same_everywhere(s, _header(_group.current_seq(), a, op, algorithm), what)
        # A tensor made under torch.inference_mode() (an eval loss, say) may be written in
        # place only inside inference mode, and a normal one only outside it where it is
        # saved for backward; inference mode is per thread, and this runs on the worker
        # or in the caller's thread. So the mode comes from the tensor itself: otherwise
        # the first in-place add fails after messages have moved, which reads as a failed
        # transport and stops ddl for good.
        with torch.inference_mode(a.inference):
            flat = a.load()  # now, not at submit: see ddl.interop.flat_array
            allreduce_flat(
                flat, op, concrete, s.rank, s.topology, group, s.timeout, nccl, s.down_for(group)
            )
            if a.store is not None:
                a.store(flat)

    return _group.submit(s, a.device, run, x, what, inline=_inline)


def _take_turn_rejected(s: Any, what: str) -> None:
    """Join the header exchange of the collective this rank just refused to start.

    The other ranks may have passed good input: they are already in (or on their way to)
    this collective's header all-gather. Had this rank only raised, it would take no
    sequence number and no turn, so its next collective would pair with theirs (silently
    reducing unrelated tensors) and every later one would be off by one until a timeout
    stopped ddl for good. Instead it queues its turn with a header that cannot match, so
    the others raise a DDLError naming it, and everyone stays in step. When every rank
    refused, their headers agree and nothing else happens. Not awaited: the caller gets
    the precise local error at once, and the exchange runs in order on the worker.
    """

    def run() -> None:
        check_same_everywhere(s, [KIND_REJECTED, _group.current_seq()], what)

    try:
        _group.submit(s, torch.device("cpu"), run, None, f"{what} (rejected input)")
    except DDLError:
        pass  # an earlier collective failed: every rank refuses everything now anyway


def allreduce(x: Any, op: str = "sum", algorithm: str = "auto", check: bool | None = None) -> Any:
    """Allreduce ``x`` in place across all ranks and return it (blocking form).

    Same arguments as :func:`allreduce_async`; equals ``allreduce_async(...).wait()``.

    Example:
        >>> import ddl, numpy as np
        >>> _ = ddl.init()
        >>> a = np.full(4, ddl.rank(), dtype=np.float32)
        >>> ddl.allreduce(a, op="mean")  # every rank now holds the mean rank (0 with one rank)
        array([0., 0., 0., 0.], dtype=float32)
        >>> ddl.shutdown()
    """
    return allreduce_async(x, op=op, algorithm=algorithm, check=check, _inline=True).wait()


_COALESCE_BYTES = 32 << 20


def _coalesced(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Runs of tensors with one device and dtype, up to ``_COALESCE_BYTES`` each."""
    runs: list[list[torch.Tensor]] = []
    open_: dict[tuple, tuple[list[torch.Tensor], list[int]]] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        run, size = open_.setdefault(key, ([], [0]))
        run.append(t)
        size[0] += t.numel() * t.element_size()
        if size[0] >= _COALESCE_BYTES:
            runs.append(run)
            del open_[key]
    runs.extend(run for run, _ in open_.values())
    return runs


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Broadcast tensors in place from ``src`` on ddl's groups (blocking, for ``wrap``).

    Tensors of one device and dtype travel as one flat message (as DDP coalesces its
    buffer broadcasts): ``wrap`` calls this before forwards for BatchNorm-style buffers,
    many small tensors, where one message each would cost a round trip each.
    """
    s = _group.current()
    if not tensors:
        return
    dev = tensors[0].device

    def run() -> None:
        for ts in _coalesced([t.detach() for t in tensors]):
            g = s.group_for(ts[0].device)
            flat = ts[0].reshape(-1) if len(ts) == 1 else torch.cat([t.reshape(-1) for t in ts])
            work = dist.broadcast(flat, src, group=g, async_op=True)
            if g is s.world and s.backend == "nccl":
                work.wait()
            else:
                work.wait(s.timeout)
            if len(ts) > 1 or flat.data_ptr() != ts[0].data_ptr():
                offset = 0
                for t in ts:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    _group.submit(s, dev, run, None, "ddl.wrap broadcast of parameters", inline=True).wait()
