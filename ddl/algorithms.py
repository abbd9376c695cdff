"""The allreduce algorithms: thin code that carries out a ``ddl.topology`` plan.

Every function here runs on the communication worker (see NOTE [One worker, one order] in
``ddl/group.py``) over one flat, contiguous 1-D tensor, in place.

# NOTE [Ring mechanics]
# 1. A ring step posts one send (to the next position) and one receive (from the previous)
#    per ring, all at once, then waits for all of them: concurrent rings (multiring) and
#    both link directions are busy in the same step. On NCCL the step's operations go in
#    one ``batch_isend_irecv`` group; on Gloo each is an ``isend``/``irecv`` with the
#    ring's index as tag, waited with the ddl timeout.
# 2. Reduce-scatter receives into a scratch buffer and adds into the chunk; all-gather
#    receives straight into place. Zero-length chunks (fewer elements than ranks) are
#    skipped on both sides, because every rank computes the same chunk bounds.
# 3. "mean" divides each owned chunk once, after its sum is complete and before it is
#    gathered, so every rank ends with bitwise the same values, equal to sum / world_size.
# 4. Reduction order differs between algorithms (ring: a chunk's sum is accumulated
#    around the ring), so results agree with the backend's all_reduce to rounding, not
#    bitwise; with two ranks a + b == b + a, so every algorithm is bitwise equal.
# 5. Each ring phase is a generator of steps; ``_run`` advances several generators in
#    lockstep rounds. All ranks build the same generators with the same step counts, so
#    round t holds matching sends and receives everywhere and nothing can deadlock;
#    distinct tags per ring keep concurrent messages between one pair apart.
# 6. "hierarchical" is pipelined: a large tensor is cut into pieces (2 MiB on Gloo, 4 MiB
#    on NCCL; at most 64), and piece k starts its node-local reduce-scatter while piece
#    k-1 is on the inter-node ring, so the slow links stay busy and the node-local phases
#    hide behind them; only the first piece's reduce-scatter and the last piece's
#    all-gather are exposed. A large "ring" on Gloo is cut into 4 MiB pieces (at most 64),
#    and a "multiring" of 4 MiB or more runs its rings on threads (rule 7). Why the sizes
#    differ, measured on 2 cores with 2 x 2 ranks and 64 MiB: on the veth of rule 7,
#    hierarchical took 0.60-0.62 s with 2 MiB pieces, 0.63-0.65 s with 4 MiB and 0.63 s
#    with 1 MiB (smaller pieces fill the slow link sooner, until their overhead wins),
#    while ring took the same with 2 or 4 MiB. Over loopback alone, where the CPUs and not
#    a link set the pace, smaller pieces cost (more pieces, more messages and thread
#    hand-offs): with 2 MiB, ring was 15-25% slower than with 4 MiB and hierarchical (2 x 2
#    simulated on one machine, 16-64 MiB) 10-25% slower. Hierarchical keeps 2 MiB because
#    slow links between nodes are what it is for; where every link is loopback, native is
#    1.25-1.6x faster than either anyway. NCCL keeps 4 MiB until a GPU run says otherwise.
#    DDL_PIECE_BYTES overrides the piece size of both.
# 7. On Gloo, pieces (of "hierarchical" and of a large "ring") and the rings of a large
#    "multiring" run on a few threads, each at its own pace, instead of in lockstep
#    rounds: a round waits for its slowest message, and the additions after it would
#    leave the slow link idle. Tags are distinct per piece and ring, so any interleaving
#    pairs up. Measured on the two-namespace veth (1 Gbit/s, 2 x 2 ranks, 64 MiB):
#    hierarchical (4 MiB pieces) 0.70-0.79 s in lockstep, 0.62 s on threads (floor 0.54 s); ring
#    0.92 s -> 0.87 s. On NCCL the lockstep rounds stay (one stream, one issue order).
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import DDLError
from .topology import (
    ALGORITHMS,
    Topology,
    all_gather_schedule,
    check_algorithm,
    chunk_bounds,
    hierarchical_groups,
    multiring_orders,
    reduce_scatter_schedule,
    ring_order,
)

__all__ = ["OPS", "allreduce_flat", "resolve_algorithm"]

OPS: tuple[str, ...] = ("sum", "mean")
_HIER_PIECE_BYTES = 2 << 20  # "hierarchical" pipeline piece on Gloo (NOTE [Ring mechanics] rule 6)
_PIECE_BYTES = 4 << 20  # the others: "ring" on Gloo, "hierarchical" on NCCL, multiring's threshold
_MAX_PIECES = 64
_PIPELINE_WIDTH = 4  # pieces in flight at once on Gloo (NOTE [Ring mechanics] rule 7)


def resolve_algorithm(algorithm: str, nbytes: int, topo: Topology) -> str:
    """Turn ``"auto"`` into a concrete algorithm via ``ddl.costmodel``; check the fit.

    Args:
        algorithm: one of ``ddl.topology.CHOICES``.
        nbytes: bytes each rank contributes.
        topo: the job's topology.

    Returns:
        A name in ``ddl.topology.ALGORITHMS`` that fits ``topo``.

    Raises:
        DDLError: unknown algorithm, or one that does not fit the topology.

    Example:
        >>> resolve_algorithm("ring", 1 << 20, Topology(4, 2))
        'ring'
    """
    check_algorithm(topo, algorithm)
    if algorithm != "auto":
        return algorithm
    from . import costmodel  # late: the cost model is optional for explicit algorithms

    chosen = costmodel.choose_algorithm(int(nbytes), topo.world_size, topo.local_size)
    if chosen not in ALGORITHMS:
        raise DDLError(
            f"ddl.costmodel.choose_algorithm returned {chosen!r}, not one of {ALGORITHMS}"
        )
    if chosen == "hierarchical" and not topo.uniform:
        chosen = "ring"  # the model should not pick it; stay safe if it does
    return chosen


def multiring_count() -> int:
    """Rings used by "multiring": ``DDL_RINGS`` (default 2: one per link direction)."""
    raw = os.environ.get("DDL_RINGS", "2")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise DDLError(f"DDL_RINGS={raw!r} must be a positive integer (rings for 'multiring')")
    return n


# One round of one ring: (sends, receives, what to do once both are complete).
_Msg = tuple[torch.Tensor, int, int]
_Step = tuple[list[_Msg], list[_Msg], Callable[[], None] | None]


@dataclass
class _Link:
    """Point-to-point plumbing for one collective (see NOTE [Ring mechanics] rule 1)."""

    group: object
    timeout: object  # datetime.timedelta
    nccl: bool
    rank: int = 0
    down: object = None  # Gloo: the group for messages to lower ranks (group.py rule 7)

    def _group(self, src: int, dst: int) -> object:
        return self.down if self.down is not None and dst < src else self.group

    def step(self, sends: list[_Msg], recvs: list[_Msg]) -> None:
        """Post all ``(tensor, peer, tag)`` sends and receives of one step, wait for all."""
        if self.nccl:
            ops = [dist.P2POp(dist.isend, t, peer, self.group, tag) for t, peer, tag in sends]
            ops += [dist.P2POp(dist.irecv, t, peer, self.group, tag) for t, peer, tag in recvs]
            if not ops:
                return
            for w in dist.batch_isend_irecv(ops):
                w.wait()  # stream-ordered; NCCL's watchdog enforces the group timeout
            return
        me = self.rank
        works = [
            dist.isend(t, peer, group=self._group(me, peer), tag=tag) for t, peer, tag in sends
        ]
        works += [
            dist.irecv(t, peer, group=self._group(peer, me), tag=tag) for t, peer, tag in recvs
        ]
        for w in works:
            w.wait(self.timeout)

    def wait(self, work: object) -> None:
        if self.nccl:
            work.wait()
        else:
            work.wait(self.timeout)


@dataclass
class _Ring:
    """One ring over ``buf``: ``order`` lists global ranks; ``tag`` tells its messages apart."""

    order: tuple[int, ...]
    buf: torch.Tensor
    tag: int

    def __post_init__(self) -> None:
        self.p = len(self.order)
        self.bounds = chunk_bounds(self.buf.numel(), self.p)

    def chunk(self, c: int) -> torch.Tensor:
        a, b = self.bounds[c]
        return self.buf[a:b]


def _reduce_scatter_steps(rank: int, r: _Ring) -> Iterator[_Step]:
    """After these steps, position ``i`` holds the sum of chunk ``i``."""
    if r.p == 1:
        return
    pos = r.order.index(rank)
    nxt, prv = r.order[(pos + 1) % r.p], r.order[(pos - 1) % r.p]
    scratch = torch.empty(max(b - a for a, b in r.bounds), dtype=r.buf.dtype, device=r.buf.device)
    for send_c, recv_c in reduce_scatter_schedule(pos, r.p):
        out, dst = r.chunk(send_c), r.chunk(recv_c)
        tmp = scratch[: dst.numel()]
        sends = [(out, nxt, r.tag)] if out.numel() else []
        recvs = [(tmp, prv, r.tag)] if dst.numel() else []
        yield sends, recvs, functools.partial(dst.add_, tmp)


def _all_gather_steps(rank: int, r: _Ring) -> Iterator[_Step]:
    """From "position ``i`` owns chunk ``i``" to every position holding every chunk."""
    if r.p == 1:
        return
    pos = r.order.index(rank)
    nxt, prv = r.order[(pos + 1) % r.p], r.order[(pos - 1) % r.p]
    for send_c, recv_c in all_gather_schedule(pos, r.p):
        out, dst = r.chunk(send_c), r.chunk(recv_c)
        sends = [(out, nxt, r.tag)] if out.numel() else []
        recvs = [(dst, prv, r.tag)] if dst.numel() else []
        yield sends, recvs, None


def _allreduce_steps(rank: int, r: _Ring, divisor: int | None) -> Iterator[_Step]:
    yield from _reduce_scatter_steps(rank, r)
    if divisor is not None:  # NOTE [Ring mechanics] rule 3; a round without messages
        yield [], [], functools.partial(r.chunk(r.order.index(rank)).div_, divisor)
    yield from _all_gather_steps(rank, r)


def _run(link: _Link, chains: list[Iterator[_Step]], starts: list[int] | None = None) -> None:
    """Advance every chain one step per round, all messages of a round at once.

    Chain ``k`` joins at round ``starts[k]`` (default 0). Every rank builds the same chains
    with the same step counts, so round ``t`` pairs every send with its receive on the
    peer (NOTE [Ring mechanics] rule 5).
    """
    starts = starts or [0] * len(chains)
    pending = sorted(zip(starts, range(len(chains))))
    active: list[Iterator[_Step]] = []
    t = 0
    while pending or active:
        while pending and pending[0][0] <= t:
            active.append(chains[pending.pop(0)[1]])
        sends, recvs, after, alive = [], [], [], []
        for chain in active:
            step = next(chain, None)
            if step is None:
                continue
            alive.append(chain)
            sends += step[0]
            recvs += step[1]
            if step[2] is not None:
                after.append(step[2])
        active = alive
        link.step(sends, recvs)
        for fn in after:
            fn()
        t += 1


def _run_threads(link: _Link, chains: list[Iterator[_Step]], stagger: int, width: int) -> None:
    """Gloo only: run chains on ``width`` threads, each at its own pace (NOTE rule 7).

    Chain ``k`` starts once chain ``k-1`` has finished ``stagger`` steps (or ended), and
    at most ``width`` chains are in flight. Messages of different chains carry different
    tags, so they pair up whatever the interleaving.
    """
    n = len(chains)
    # Inference mode is per thread: carry the caller's into the chain threads, whose adds
    # and divisions write into an inference tensor when the caller reduces one.
    inference = torch.is_inference_mode_enabled()
    gates = [threading.Event() for _ in range(n)]
    gates[0].set()
    lock = threading.Lock()
    next_chain = [0]
    errors: list[BaseException] = []

    def drive(k: int) -> None:
        done = 0
        if stagger == 0 and k + 1 < n:
            gates[k + 1].set()
        try:
            for sends, recvs, after in chains[k]:
                if errors:
                    return
                link.step(sends, recvs)
                if after is not None:
                    after()
                done += 1
                if done == stagger and k + 1 < n:
                    gates[k + 1].set()
        except BaseException as e:  # re-raised by the caller below
            errors.append(e)
        finally:
            if k + 1 < n:
                gates[k + 1].set()

    def worker() -> None:
        while not errors:
            with lock:
                k = next_chain[0]
                if k >= n:
                    return
                next_chain[0] += 1
            gates[k].wait()
            with torch.inference_mode(inference):
                drive(k)

    threads = [threading.Thread(target=worker, name="ddl-chain") for _ in range(min(width, n))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _pieces(nbytes: int, piece: int) -> int:
    """How many pipelined pieces of about ``piece`` bytes to cut a tensor into (NOTE rule 6).

    ``DDL_PIECE_BYTES`` overrides the piece size (a tuning knob; 0 turns pipelining off).
    """
    raw = os.environ.get("DDL_PIECE_BYTES")
    if raw:
        try:
            piece = int(raw)
        except ValueError:
            raise DDLError(f"DDL_PIECE_BYTES={raw!r} must be an integer number of bytes") from None
        if piece <= 0:
            return 1
    return max(1, min(_MAX_PIECES, nbytes // piece))


def allreduce_flat(
    flat: torch.Tensor,
    op: str,
    algorithm: str,
    rank: int,
    topo: Topology,
    group: object,
    timeout: object,
    nccl: bool,
    group_down: object = None,
) -> None:
    """Reduce the 1-D contiguous ``flat`` in place across all ranks with ``algorithm``.

    Args:
        flat: this rank's contribution; overwritten with the result.
        op: ``"sum"`` or ``"mean"``.
        algorithm: a concrete name from ``ALGORITHMS`` (``"auto"`` resolved already).
        rank: this process's global rank.
        topo: the topology every rank shares.
        group: the process group spanning all ranks to talk on.
        timeout: per-operation ``datetime.timedelta`` (Gloo); NCCL uses its watchdog.
        nccl: whether ``group`` is an NCCL group (batched point-to-point, stream waits).
        group_down: Gloo only: a second group for messages to lower ranks, so each TCP
            connection carries one direction (ddl/group.py NOTE rule 7); None: use ``group``.

    Raises:
        DDLError: unknown algorithm or op.

    Example:
        >>> import ddl, torch
        >>> from ddl.algorithms import allreduce_flat
        >>> topo = ddl.init()
        >>> s = ddl.group.current()  # ddl's groups and timeout, as ddl.allreduce passes them
        >>> t = torch.ones(2, 2)
        >>> allreduce_flat(t.view(-1), "sum", "ring", s.rank, topo, s.cpu, s.timeout, False)
        >>> t  # the sum over ranks: world_size (1 here) everywhere
        tensor([[1., 1.],
                [1., 1.]])
        >>> ddl.shutdown()
    """
    if op not in OPS:
        raise DDLError(f"unknown op {op!r}; use one of {', '.join(OPS)}")
    ws = topo.world_size
    divisor = ws if op == "mean" else None
    if ws == 1:
        return
    link = _Link(group, timeout, nccl, rank, None if nccl else group_down)
    if algorithm == "native":
        try:
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
        except RuntimeError:
            if nccl or flat.dtype not in (torch.bfloat16, torch.float16):
                raise
            # Older Gloo builds reject 16-bit floats before any message moves (on every
            # rank alike): reduce a float32 copy and round once at the end instead.
            wide = flat.float()
            link.wait(dist.all_reduce(wide, op=dist.ReduceOp.SUM, group=group, async_op=True))
            flat.copy_(wide.div_(divisor) if divisor is not None else wide)
            return
        link.wait(work)
        if divisor is not None:
            flat.div_(divisor)
    elif algorithm == "ring":
        order = ring_order(topo)
        pieces = 1 if link.nccl else _pieces(flat.numel() * flat.element_size(), _PIECE_BYTES)
        if pieces == 1:
            _run(link, [_allreduce_steps(rank, _Ring(order, flat, 0), divisor)])
        else:  # pipelined like hierarchical (NOTE rule 7): adds overlap other pieces' sends
            bounds = chunk_bounds(flat.numel(), pieces)
            chains = [
                _allreduce_steps(rank, _Ring(order, flat[a:b], k), divisor)
                for k, (a, b) in enumerate(bounds)
            ]
            _run_threads(link, chains, 1, _PIPELINE_WIDTH)
    elif algorithm == "multiring":
        orders = multiring_orders(topo, multiring_count())
        parts = chunk_bounds(flat.numel(), len(orders))
        rings = [_Ring(o, flat[a:b], k) for k, (o, (a, b)) in enumerate(zip(orders, parts))]
        chains = [_allreduce_steps(rank, r, divisor) for r in rings]
        if link.nccl or flat.numel() * flat.element_size() < _PIECE_BYTES:
            _run(link, chains)  # small: one thread, lockstep, less overhead
        else:
            _run_threads(link, chains, 0, len(chains))
    elif algorithm == "hierarchical":
        intra, inter = hierarchical_groups(topo)
        node, j = intra[topo.node_of(rank)], topo.local_rank_of(rank)
        chains = []
        piece = _PIECE_BYTES if link.nccl else _HIER_PIECE_BYTES
        for k, (a, b) in enumerate(
            chunk_bounds(flat.numel(), _pieces(flat.numel() * flat.element_size(), piece))
        ):
            # Piece k: reduce-scatter in the node; shard j (held by local rank j on every
            # node) crosses nodes on its own ring, all local ranks at once; all-gather back.
            local = _Ring(node, flat[a:b], 2 * k)
            across = _Ring(inter[j], local.chunk(j), 2 * k + 1)
            chains.append(
                itertools.chain(
                    _reduce_scatter_steps(rank, local),
                    _allreduce_steps(rank, across, divisor),
                    _all_gather_steps(rank, local),
                )
            )
        # Stagger: piece k starts its node-local reduce-scatter while piece k-1 crosses.
        if link.nccl or len(chains) == 1:
            _run(link, chains, [k * (len(node) - 1) for k in range(len(chains))])
        else:
            _run_threads(link, chains, len(node) - 1, _PIPELINE_WIDTH)
    else:
        raise DDLError(f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
