"""The alpha-beta cost model of ddl's allreduce algorithms, and an iteration simulator.

Pure arithmetic over plain data: nothing here touches torch.distributed or starts a process,
so ``ddl.allreduce(..., algorithm="auto")`` can ask :func:`choose_algorithm` on every call and
the tests can check the formulas in one process.

Example:
    >>> from ddl import costmodel
    >>> c = costmodel.Cluster(nodes=2, gpus_per_node=2, inter_bandwidth=125e6)  # 1 Gb/s
    >>> costmodel.choose_algorithm(64 << 20, 4, 2, c)
    'hierarchical'
    >>> round(costmodel.allreduce_time(64 << 20, "native", c), 3)
    0.812
"""

# NOTE [Alpha-beta model]
# Units are seconds and bytes. A message of n bytes over one link costs alpha + n * beta, where
# alpha is the link latency and beta = 1 / bandwidth (one direction of a full-duplex link).
# Reducing n bytes costs n * gamma, gamma = 1 / reduce_bandwidth. The formulas follow Thakur,
# Rabenseifner and Gropp (2005), "Optimization of collective communication operations in MPICH":
#   ring over p ranks: 2(p-1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma.
# Rules the code refers to:
#   1. A ring advances in lock step: each of its 2(p-1) steps moves n/p bytes per rank, and a step
#      lasts as long as its slowest link (alpha + chunk * beta of that link). A flat ring over
#      m > 1 nodes, ranks numbered node by node, crosses between nodes on every step, so the
#      inter-node link sets the pace.
#   2. A node's NICs are shared by everything that leaves the node at the same time. One ring has
#      one crossing out of (and one into) each node, so it uses one NIC in each direction; that is
#      already both directions of the NIC, so more rings over the same NIC gain nothing there.
#   3. Inside a node a ring uses each rank-to-rank link in one direction only. A second ring in the
#      reverse order uses the other direction of the same full-duplex links; that is what
#      "multiring" gains (intra lanes = min(rings, 2) when p >= 3 and ``intra_duplex``; with
#      p = 2 a single ring already uses both directions). Over TCP loopback both directions are
#      memory copies by the same CPUs, so ``intra_duplex`` is False there and there is no gain.
#      Rings can also be spread over several NICs per node (inter lanes = min(rings, nics)).
#      Nothing else is gained: the reduction work per rank is the same, and every ring pays the
#      full 2(p-1) latency steps.
#   4. "hierarchical" is two-level (Horovod's, and Thakur's two-level scheme): reduce-scatter over
#      the g local ranks (alpha_l, beta_l), then g inter-node rings of m nodes, one per local rank,
#      each over n/g bytes, running at once, then an all-gather over the g local ranks. The g rings
#      SHARE the node's NICs (Rule 2): per step the node sends g * (n/g)/m = n/m bytes over
#      min(g, nics_per_node) NICs. With one NIC per rank (nics_per_node = g) this is exactly
#      Thakur's 2(m-1) alpha_x + 2(m-1)/m (n/g) beta_x. With one NIC per node each NIC carries
#      2(m-1)/m n bytes each way, against 2(p-1)/p n for the flat ring (which crosses the NIC once
#      per step with n/p bytes for 2(p-1) steps): the same for many nodes (both about 2n), 1.5x
#      fewer for 2 nodes x 2 ranks. What hierarchical saves at scale is latency: 2(g-1) + 2(m-1)
#      steps instead of 2(mg-1).
#   5. "native" is modelled as the backend's ring (Gloo's default allreduce and NCCL's ring are
#      both rings of rank order) without ddl's per-step dispatch overhead. Algorithms that ddl
#      drives from Python (ring, multiring, hierarchical) pay ``dispatch_overhead`` per step and
#      per ring, the cost of issuing the point-to-point operations.
#   6. A ddl ring step in which a rank sends to and receives from the same peer (every ring of
#      two members; multiring's reverse ring against the forward one) needs that pair to carry
#      both directions at once. ``pair_duplex=False`` models a transport that moves one direction
#      at a time there: the pair's bytes add up. Measured with Gloo isend/irecv on one process
#      group between two namespaces over a 1 Gbit/s veth (benchmarks/two_node_veth.sh, 32 MiB
#      each way): 0.43-0.57 s on one group, 0.29-0.31 s with the two directions on two groups,
#      0.28-0.32 s one way alone. Gloo's own allreduce ("native") was full duplex there. ddl
#      now sends to lower ranks on a second Gloo group, so its pairs are duplex (the default).
#   7. ddl pipelines "hierarchical": the tensor is cut into P pieces (n // piece_bytes, at least
#      1, at most max_pieces; ddl/algorithms.py uses 2 MiB pieces on Gloo, 4 MiB on NCCL, and
#      at most 64) and piece k's intra-node reduce-scatter runs while piece k-1 crosses nodes.
#      With T_l and T_x the bytes (and adds) of all pieces on the intra-node and inter-node
#      links, and t_rs, t_x, t_ag those of one piece, each kind of link is busy for its own
#      work, and the inter link waits for the first piece's reduce-scatter and is followed by
#      the last piece's all-gather: bytes time = max(t_rs + T_x + t_ag, T_l + t_x). The
#      pieces' latency steps overlap (rounds carry steps of several pieces), each piece
#      starting one reduce-scatter after the previous: latency = one piece's steps + (P-1)
#      reduce-scatters' steps. With P = 1 this is the unpipelined sum; with one node or one
#      rank per node and P = 1, the plain ring.

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ddl.errors import DDLError

__all__ = [
    "ALGORITHMS",
    "Cluster",
    "Cost",
    "Layer",
    "Bucket",
    "IterationEstimate",
    "allreduce_cost",
    "allreduce_time",
    "hierarchical_pieces",
    "feasible_algorithms",
    "default_cluster",
    "choose_algorithm",
    "plan_buckets",
    "simulate_iteration",
    "bus_bandwidth",
    "powerai_cluster",
    "resnet50_layers",
    "powerai_resnet50",
]

ALGORITHMS: tuple[str, ...] = ("native", "ring", "multiring", "hierarchical")

# Order in which ties are broken by choose_algorithm: the backend's own code first, then the
# algorithm that needs the fewest messages.
_PREFERENCE: tuple[str, ...] = ("native", "hierarchical", "multiring", "ring")


def _check_positive(
    name: str, value: float, *, integer: bool = False, zero_ok: bool = False
) -> None:
    bad_type = not isinstance(value, int) if integer else not isinstance(value, (int, float))
    if isinstance(value, bool) or bad_type:
        kind = "an int" if integer else "a number"
        raise DDLError(f"Cluster.{name} must be {kind}, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        need = ">= 0" if zero_ok else "> 0"
        raise DDLError(f"Cluster.{name} must be finite and {need}, got {value!r}")


@dataclass(frozen=True)
class Cluster:
    """The machine the model predicts for: nodes of ranks joined by two kinds of links.

    The defaults describe Gloo over TCP: ranks on one host talk over loopback, hosts over
    10 Gb/s Ethernet. They are typical, not measured; pass your own numbers for a real cluster
    (see :func:`powerai_cluster` for a GPU cluster).

    Attributes:
        nodes: number of nodes (m).
        gpus_per_node: ranks per node (g); the world size is ``nodes * gpus_per_node``.
        intra_latency: alpha_l, seconds per message between two ranks of one node.
        intra_bandwidth: 1 / beta_l, bytes per second one rank can send to another rank of its
            node in one direction (full duplex: the other direction is a separate lane).
        inter_latency: alpha_x, seconds per message between two nodes.
        inter_bandwidth: 1 / beta_x, bytes per second of one NIC in one direction.
        nics_per_node: NICs per node; rings leaving a node at the same time share them.
        reduce_bandwidth: 1 / gamma, bytes per second one rank reduces (adds) incoming data.
        dispatch_overhead: seconds per step and per ring that algorithms driven by ddl pay on top
            of the link latency (issuing point-to-point operations from Python). Not paid by
            ``"native"``.
        multiring_rings: how many rings ``"multiring"`` runs at once.
        pair_duplex: whether ddl's point-to-point steps move data both ways between two ranks
            at once (NOTE Rule 6); False for Gloo on one process group, as measured.
        pipeline_piece_bytes: ``"hierarchical"`` cuts a tensor into pieces of this size ...
        pipeline_max_pieces: ... but at most this many, and pipelines them (NOTE Rule 7).
        intra_duplex: whether the two directions of an intra-node link are independent lanes of
            ``intra_bandwidth`` each (NVLink, PCIe: True; TCP over loopback, where both directions
            are copies made by the same CPUs: False).

    Raises:
        DDLError: if a count is not a positive int or a time or speed is not a finite number > 0
            (latencies and ``dispatch_overhead`` may be 0).

    Example:
        >>> Cluster(nodes=2, gpus_per_node=2, inter_bandwidth=125e6).world_size
        4
    """

    nodes: int = 1
    gpus_per_node: int = 1
    intra_latency: float = 20e-6  # TCP round trip over loopback, order of 10-30 us
    intra_bandwidth: float = 4e9  # one TCP stream over loopback, a few GB/s
    inter_latency: float = 50e-6  # TCP over a switched Ethernet hop
    inter_bandwidth: float = 1.25e9  # 10 Gb/s Ethernet
    nics_per_node: int = 1
    reduce_bandwidth: float = 8e9  # vectorised add on one CPU core, a few GB/s of input
    dispatch_overhead: float = 50e-6  # Python issuing isend/irecv and waiting, per step
    multiring_rings: int = 2
    intra_duplex: bool = False  # loopback: both directions are CPU copies
    pair_duplex: bool = True  # see NOTE Rule 6
    pipeline_piece_bytes: int = 2 << 20  # ddl/algorithms.py _HIER_PIECE_BYTES (Gloo; NCCL: 4 MiB)
    pipeline_max_pieces: int = 64  # ddl/algorithms.py _MAX_PIECES; 1 = not pipelined

    def __post_init__(self) -> None:
        for name in (
            "nodes",
            "gpus_per_node",
            "nics_per_node",
            "multiring_rings",
            "pipeline_piece_bytes",
            "pipeline_max_pieces",
        ):
            _check_positive(name, getattr(self, name), integer=True)
        for name in ("intra_bandwidth", "inter_bandwidth", "reduce_bandwidth"):
            _check_positive(name, getattr(self, name))
        for name in ("intra_latency", "inter_latency", "dispatch_overhead"):
            _check_positive(name, getattr(self, name), zero_ok=True)
        for name in ("intra_duplex", "pair_duplex"):
            if not isinstance(getattr(self, name), bool):
                raise DDLError(f"Cluster.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def world_size(self) -> int:
        """Total number of ranks, ``nodes * gpus_per_node``."""
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Cost:
    """The time of one allreduce split into its alpha, beta and gamma terms (seconds).

    Attributes:
        latency: the alpha terms (link latency and dispatch overhead, all steps).
        transfer: the beta terms (bytes over the bottleneck links).
        reduction: the gamma terms (adding incoming data).
    """

    latency: float
    transfer: float
    reduction: float

    @property
    def total(self) -> float:
        """The predicted time of the allreduce: ``latency + transfer + reduction``."""
        return self.latency + self.transfer + self.reduction


def _check_nbytes(nbytes: int) -> None:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise DDLError(f"nbytes must be an int >= 0 (the message size in bytes), got {nbytes!r}")


def _flat_ring(nbytes: int, c: Cluster, *, rings: int, overhead: float, p2p: bool) -> Cost:
    """A ring (or ``rings`` concurrent rings) over all ranks, numbered node by node (Rules 1-3).

    ``p2p`` says the ring is ddl's own point-to-point code, which Rule 6 applies to.
    """
    p = c.world_size
    if p == 1 or nbytes == 0:
        return Cost(0.0, 0.0, 0.0)
    steps = 2 * (p - 1)
    chunk = nbytes / p  # bytes each rank sends per step, summed over the rings
    half = p2p and not c.pair_duplex  # Rule 6
    if half and p == 2:
        chunk *= 2  # the two ranks send to each other over the one pair
    # Each link type: (latency, seconds per byte per step after spreading over its lanes).
    links = []
    if c.gpus_per_node > 1:
        duplex = c.intra_duplex and not half  # Rule 6: the reverse ring shares the pair
        intra_lanes = min(rings, 2) if p >= 3 and duplex else 1  # Rule 3
        links.append((c.intra_latency, chunk / (intra_lanes * c.intra_bandwidth)))
    if c.nodes > 1:
        inter_lanes = min(rings, c.nics_per_node)  # Rule 2
        links.append((c.inter_latency, chunk / (inter_lanes * c.inter_bandwidth)))
    # Rule 1: the step lasts as long as its slowest link.
    alpha, per_step = max(links, key=lambda link: link[0] + link[1])
    return Cost(
        latency=steps * (alpha + rings * overhead),
        transfer=steps * per_step,
        reduction=(p - 1) / p * nbytes / c.reduce_bandwidth,
    )


def _hierarchical_phases(n: float, c: Cluster) -> tuple[Cost, Cost, Cost]:
    """One unpipelined pass over ``n`` bytes: (reduce-scatter, inter-node, all-gather), Rule 4."""
    g, m = c.gpus_per_node, c.nodes
    o = c.dispatch_overhead
    # Rule 6: in a ring of two members both send to each other over the one pair.
    intra_pair = 2 if g == 2 and not c.pair_duplex else 1
    inter_pair = 2 if m == 2 and not c.pair_duplex else 1
    # Intra-node reduce-scatter and all-gather: (g-1) steps each, n/g bytes per step.
    half_latency = (g - 1) * (c.intra_latency + o)
    half_transfer = (g - 1) * intra_pair * (n / g) / c.intra_bandwidth
    rs = Cost(half_latency, half_transfer, (g - 1) / g * n / c.reduce_bandwidth)
    ag = Cost(half_latency, half_transfer, 0.0)
    # Inter-node: g rings of m nodes over n/g bytes each; per step the node sends n/m bytes in
    # total over min(g, nics) NICs.
    steps = 2 * (m - 1)
    lanes = min(g, c.nics_per_node)
    x = Cost(
        steps * (c.inter_latency + o),
        steps * inter_pair * (n / m) / (lanes * c.inter_bandwidth),
        (m - 1) / m * (n / g) / c.reduce_bandwidth,
    )
    return rs, x, ag


def hierarchical_pieces(nbytes: int, cluster: Cluster) -> int:
    """How many pipelined pieces ddl's "hierarchical" cuts ``nbytes`` into (Rule 7).

    Example:
        >>> hierarchical_pieces(64 << 20, Cluster())
        32
    """
    return max(1, min(cluster.pipeline_max_pieces, nbytes // cluster.pipeline_piece_bytes))


def _scaled(cost: Cost, k: float) -> Cost:
    return Cost(cost.latency * k, cost.transfer * k, cost.reduction * k)


def _summed(*costs: Cost) -> Cost:
    return Cost(*(sum(getattr(c, f) for c in costs) for f in ("latency", "transfer", "reduction")))


def _hierarchical(nbytes: int, c: Cluster) -> Cost:
    """Pipelined reduce-scatter in the node, g inter-node rings, all-gather (Rules 4, 6, 7)."""
    if c.world_size == 1 or nbytes == 0:
        return Cost(0.0, 0.0, 0.0)
    pieces = hierarchical_pieces(nbytes, c)
    rs, x, ag = _hierarchical_phases(nbytes / pieces, c)  # one piece
    # Bytes: each kind of link carries its own work of all pieces (Rule 7).
    inter_bound = _summed(rs, _scaled(x, pieces), ag)  # the inter-node link's critical path
    intra_bound = _summed(_scaled(rs, pieces), _scaled(ag, pieces), x)  # the intra-node one
    bound = max(inter_bound, intra_bound, key=lambda cost: cost.transfer + cost.reduction)
    # Latency: pieces overlap their steps; each later piece starts one reduce-scatter later.
    latency = rs.latency + x.latency + ag.latency + (pieces - 1) * rs.latency
    return Cost(latency, bound.transfer, bound.reduction)


def allreduce_cost(nbytes: int, algorithm: str, cluster: Cluster) -> Cost:
    """Predict one allreduce of ``nbytes`` per rank on ``cluster``, split into its terms.

    Args:
        nbytes: bytes of the tensor each rank contributes.
        algorithm: one of :data:`ALGORITHMS`.
        cluster: the machine (see :class:`Cluster`).

    Returns:
        The :class:`Cost`; ``.total`` is the time in seconds. One rank or zero bytes cost 0.

    Raises:
        DDLError: for an unknown algorithm, a negative size, or ``"hierarchical"`` on a cluster
            it does not fit (see :func:`feasible_algorithms`).

    Example:
        >>> c = Cluster(nodes=4, gpus_per_node=1, inter_latency=0.0, dispatch_overhead=0.0)
        >>> round(allreduce_cost(1 << 20, "ring", c).transfer * 1e3, 3)  # 1.5 MiB over 1.25 GB/s
        1.258
    """
    _check_nbytes(nbytes)
    if not isinstance(cluster, Cluster):
        raise DDLError(f"cluster must be a ddl.costmodel.Cluster, got {type(cluster).__name__}")
    if algorithm == "native":
        return _flat_ring(nbytes, cluster, rings=1, overhead=0.0, p2p=False)
    if algorithm == "ring":
        return _flat_ring(nbytes, cluster, rings=1, overhead=cluster.dispatch_overhead, p2p=True)
    if algorithm == "multiring":
        return _flat_ring(
            nbytes,
            cluster,
            rings=cluster.multiring_rings,
            overhead=cluster.dispatch_overhead,
            p2p=True,
        )
    if algorithm == "hierarchical":
        if algorithm not in feasible_algorithms(cluster.world_size, cluster.gpus_per_node):
            raise DDLError(
                f"'hierarchical' needs more than one node and more than one rank per node; this "
                f"cluster has {cluster.nodes} node(s) x {cluster.gpus_per_node} rank(s); "
                f"use 'ring' or 'native'"
            )
        return _hierarchical(nbytes, cluster)
    raise DDLError(f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")


def allreduce_time(nbytes: int, algorithm: str, cluster: Cluster) -> float:
    """Predict the seconds of one allreduce of ``nbytes`` per rank with ``algorithm``.

    Args:
        nbytes: bytes of the tensor each rank contributes.
        algorithm: one of :data:`ALGORITHMS`.
        cluster: the machine (see :class:`Cluster`).

    Returns:
        Seconds; ``allreduce_cost(...).total``.

    Raises:
        DDLError: as :func:`allreduce_cost`.

    Example:
        >>> allreduce_time(4096, "native", Cluster(nodes=1, gpus_per_node=1))
        0.0
    """
    return allreduce_cost(nbytes, algorithm, cluster).total


def bus_bandwidth(nbytes: int, seconds: float, world_size: int) -> float:
    """The nccl-tests bus bandwidth of an allreduce: ``nbytes / seconds * 2(p-1)/p`` (bytes/s).

    Example:
        >>> bus_bandwidth(100, 1.0, 4)
        150.0
    """
    if seconds <= 0:
        raise DDLError(f"seconds must be > 0 to compute a bandwidth, got {seconds!r}")
    return nbytes / seconds * 2 * (world_size - 1) / world_size


def _check_topology(world_size: int, local_size: int) -> None:
    for name, value in (("world_size", world_size), ("local_size", local_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DDLError(f"{name} must be an int >= 1, got {value!r}")


def feasible_algorithms(world_size: int, local_size: int) -> tuple[str, ...]:
    """The algorithms that fit a topology of ``world_size`` ranks, ``local_size`` per node.

    ``"hierarchical"`` fits only when ``local_size`` divides ``world_size`` and there is more than
    one node and more than one rank per node. The others fit any topology.

    Raises:
        DDLError: if a size is not an int >= 1.

    Example:
        >>> feasible_algorithms(6, 4)
        ('native', 'ring', 'multiring')
    """
    _check_topology(world_size, local_size)
    hier = world_size % local_size == 0 and 1 < local_size < world_size
    return ALGORITHMS if hier else ALGORITHMS[:3]


# Whether ddl's Gloo point-to-point steps move both directions between two ranks at once
# (NOTE [Alpha-beta model] Rule 6). Not while both directions share one process group; ddl puts
# messages to lower ranks on a second group (ddl/group.py rule 7), so they do.
GLOO_PAIR_DUPLEX = True


def default_cluster(world_size: int, local_size: int) -> Cluster:
    """The cluster :func:`choose_algorithm` assumes when given none.

    The link numbers are :class:`Cluster`'s defaults (Gloo over TCP: loopback inside a node,
    10 Gb/s Ethernet between nodes), with ``pair_duplex=GLOO_PAIR_DUPLEX``. When ``local_size``
    does not divide ``world_size`` the nodes are uneven, which the model does not describe; it
    then assumes every link is inter-node (``world_size`` nodes of one rank), the pessimistic
    case.

    Example:
        >>> default_cluster(8, 4).nodes
        2
    """
    _check_topology(world_size, local_size)
    if world_size % local_size:
        return Cluster(nodes=world_size, gpus_per_node=1, pair_duplex=GLOO_PAIR_DUPLEX)
    return Cluster(
        nodes=world_size // local_size, gpus_per_node=local_size, pair_duplex=GLOO_PAIR_DUPLEX
    )


def choose_algorithm(
    nbytes: int, world_size: int, local_size: int, cluster: Cluster | None = None
) -> str:
    """Pick the algorithm with the smallest predicted time for one allreduce.

    Only algorithms that fit the topology are considered (:func:`feasible_algorithms`). Ties go to
    ``"native"`` first, then ``"hierarchical"``, ``"multiring"``, ``"ring"``.

    Args:
        nbytes: bytes of the tensor each rank contributes.
        world_size: number of ranks.
        local_size: ranks per node.
        cluster: the machine; must describe ``world_size`` ranks with ``local_size`` per node.
            ``None`` means :func:`default_cluster`.

    Returns:
        One of ``"native"``, ``"ring"``, ``"multiring"``, ``"hierarchical"``.

    Raises:
        DDLError: for a negative size, sizes that are not ints >= 1, or a cluster whose shape
            differs from ``world_size`` / ``local_size``.

    Example:
        >>> choose_algorithm(1 << 20, 16, 4)  # 4 nodes x 4: fewer latency steps
        'hierarchical'
        >>> choose_algorithm(64 << 20, 4, 4)
        'native'
    """
    _check_nbytes(nbytes)
    feasible = feasible_algorithms(world_size, local_size)
    if cluster is None:
        cluster = default_cluster(world_size, local_size)
    elif not isinstance(cluster, Cluster):
        raise DDLError(f"cluster must be a ddl.costmodel.Cluster, got {type(cluster).__name__}")
    elif cluster.world_size != world_size or (
        world_size % local_size == 0 and cluster.gpus_per_node != local_size
    ):
        raise DDLError(
            f"cluster describes {cluster.nodes} node(s) x {cluster.gpus_per_node} rank(s), but the "
            f"job has world_size={world_size}, local_size={local_size}; pass "
            f"dataclasses.replace(cluster, nodes={max(world_size // local_size, 1)}, "
            f"gpus_per_node={local_size})"
        )
    times = {a: allreduce_time(nbytes, a, cluster) for a in _PREFERENCE if a in feasible}
    return min(times, key=times.__getitem__)  # min keeps the first of equal keys: the preference


# ----------------------------------------------------------------------------------------------
# Iteration simulator
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One gradient-producing unit of a model, in registration (forward) order.

    Attributes:
        name: label, for reports.
        grad_bytes: bytes of its gradients (all its parameters together).
        backward_time: seconds its backward takes on one rank.
    """

    name: str
    grad_bytes: int
    backward_time: float

    def __post_init__(self) -> None:
        if isinstance(self.grad_bytes, bool) or not isinstance(self.grad_bytes, int):
            raise DDLError(
                f"Layer {self.name!r}: grad_bytes must be an int, got {self.grad_bytes!r}"
            )
        if self.grad_bytes < 0:
            raise DDLError(f"Layer {self.name!r}: grad_bytes must be >= 0, got {self.grad_bytes}")
        if not math.isfinite(self.backward_time) or self.backward_time < 0:
            raise DDLError(
                f"Layer {self.name!r}: backward_time must be finite and >= 0, "
                f"got {self.backward_time!r}"
            )


@dataclass(frozen=True)
class Bucket:
    """A group of layers whose gradients are reduced in one allreduce, with its timeline.

    Attributes:
        layers: names of its layers, in the order their gradients become ready.
        nbytes: bytes reduced.
        ready: seconds after backward starts at which its last gradient is ready.
        start: when its allreduce starts (ready, and the previous bucket's allreduce done).
        end: when its allreduce finishes.
    """

    layers: tuple[str, ...]
    nbytes: int
    ready: float = 0.0
    start: float = 0.0
    end: float = 0.0


@dataclass(frozen=True)
class IterationEstimate:
    """The predicted timeline of one data-parallel training iteration.

    Attributes:
        algorithm: the allreduce algorithm used for every bucket.
        forward: seconds of forward.
        backward: seconds of backward compute.
        optimizer: seconds of the optimizer step.
        comm: total seconds of all bucket allreduces (serialised on one channel).
        iteration: predicted seconds of the iteration,
            ``forward + max(backward, end of the last allreduce) + optimizer``.
        single: seconds of the same iteration on one rank (no communication).
        buckets: the buckets with their timelines, in the order they are reduced.
    """

    algorithm: str
    forward: float
    backward: float
    optimizer: float
    comm: float
    iteration: float
    single: float
    buckets: tuple[Bucket, ...] = field(repr=False)

    @property
    def efficiency(self) -> float:
        """Scaling efficiency: single-rank iteration time / predicted iteration time (<= 1)."""
        return self.single / self.iteration if self.iteration > 0 else 1.0

    @property
    def exposed_comm(self) -> float:
        """Seconds of communication not hidden behind backward."""
        return self.iteration - self.single


def plan_buckets(
    layers: Sequence[Layer], bucket_bytes: int, first_bucket_bytes: int | None = None
) -> list[Bucket]:
    """Group layers into buckets in reverse registration order, the way DDP does.

    A bucket closes as soon as it holds at least its cap; the first bucket (the last layers of
    the model, whose gradients are ready first) has cap ``first_bucket_bytes`` so that
    communication starts early. Timelines are left at 0; :func:`simulate_iteration` fills them.

    Args:
        layers: the model's layers in registration (forward) order.
        bucket_bytes: cap of every bucket after the first, in bytes (> 0).
        first_bucket_bytes: cap of the first bucket; ``None`` means ``bucket_bytes``.

    Returns:
        Buckets in the order they become ready.

    Raises:
        DDLError: if a cap is not an int > 0.

    Example:
        >>> ls = [Layer(str(i), 4, 0.0) for i in range(5)]
        >>> [b.layers for b in plan_buckets(ls, 8, 4)]
        [('4',), ('3', '2'), ('1', '0')]
    """
    if first_bucket_bytes is None:
        first_bucket_bytes = bucket_bytes
    for name, cap in (("bucket_bytes", bucket_bytes), ("first_bucket_bytes", first_bucket_bytes)):
        if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
            raise DDLError(f"{name} must be an int > 0 (bytes), got {cap!r}")
    buckets: list[Bucket] = []
    names: list[str] = []
    size = 0
    for layer in reversed(layers):
        names.append(layer.name)
        size += layer.grad_bytes
        if size >= (first_bucket_bytes if not buckets else bucket_bytes):
            buckets.append(Bucket(tuple(names), size))
            names, size = [], 0
    if names:
        buckets.append(Bucket(tuple(names), size))
    return buckets


def simulate_iteration(
    layers: Sequence[Layer],
    cluster: Cluster,
    algorithm: str,
    *,
    forward_time: float,
    optimizer_time: float = 0.0,
    bucket_bytes: int = 25 << 20,
    first_bucket_bytes: int | None = 1 << 20,
) -> IterationEstimate:
    """Predict one iteration of data-parallel training with bucketed, overlapped allreduce.

    Backward runs the layers in reverse registration order; a bucket is ready when its last
    gradient is; allreduces run one at a time on one channel, each starting when its bucket is
    ready and the previous one is done, overlapping the rest of backward. Backward returns when
    both compute and the last allreduce are done, so
    ``iteration = forward + max(backward, last allreduce end) + optimizer``.

    Args:
        layers: the model's layers in registration (forward) order.
        cluster: the machine.
        algorithm: the allreduce algorithm for every bucket (one of :data:`ALGORITHMS`).
        forward_time: seconds of forward on one rank.
        optimizer_time: seconds of the optimizer step.
        bucket_bytes: bucket cap (DDP's default 25 MiB).
        first_bucket_bytes: first bucket cap (DDP's default 1 MiB); ``None`` for ``bucket_bytes``.

    Returns:
        The :class:`IterationEstimate`; ``.efficiency`` is the scaling efficiency.

    Raises:
        DDLError: for empty ``layers``, negative times, bad caps, or an algorithm that does not
            fit the cluster.

    Example:
        >>> ls = [Layer("a", 1 << 20, 0.01), Layer("b", 1 << 20, 0.01)]
        >>> est = simulate_iteration(ls, Cluster(nodes=2), "ring", forward_time=0.01)
        >>> est.efficiency <= 1.0
        True
    """
    if not layers:
        raise DDLError("simulate_iteration needs at least one Layer")
    for name, value in (("forward_time", forward_time), ("optimizer_time", optimizer_time)):
        if not math.isfinite(value) or value < 0:
            raise DDLError(f"{name} must be finite and >= 0 seconds, got {value!r}")
    planned = plan_buckets(layers, bucket_bytes, first_bucket_bytes)
    # Time at which each layer's gradient is ready: backward runs the layers in reverse order.
    ready_at: list[float] = []
    t = 0.0
    for layer in reversed(layers):
        t += layer.backward_time
        ready_at.append(t)
    backward = t
    timed: list[Bucket] = []
    channel_free = 0.0
    k = 0  # index into ready_at (reverse order), advanced by each bucket's layer count
    for b in planned:
        k += len(b.layers)
        ready = ready_at[k - 1]
        start = max(ready, channel_free)
        end = start + allreduce_time(b.nbytes, algorithm, cluster)
        timed.append(Bucket(b.layers, b.nbytes, ready, start, end))
        channel_free = end
    comm = sum(b.end - b.start for b in timed)
    iteration = forward_time + max(backward, channel_free) + optimizer_time
    single = forward_time + backward + optimizer_time
    return IterationEstimate(
        algorithm=algorithm,
        forward=forward_time,
        backward=backward,
        optimizer=optimizer_time,
        comm=comm,
        iteration=iteration,
        single=single,
        buckets=tuple(timed),
    )


# ----------------------------------------------------------------------------------------------
# The PowerAI DDL configuration: ResNet-50 on 64 nodes x 4 P100
# ----------------------------------------------------------------------------------------------

# NOTE [PowerAI assumptions]
# The PowerAI DDL paper (Cho et al. 2017, arXiv:1708.02188) reports 95% scaling efficiency for
# Caffe ResNet-50 on 64 IBM S822LC servers with 4 P100 each, NVLink inside, InfiniBand between.
# It does not give every number the model needs, so these are stated assumptions:
#   1. Compute: 195 images/s per P100 for ResNet-50 at batch 32 (TensorFlow's published 2017
#      benchmark, DGX-1 P100, synthetic data; 219 images/s at batch 64), so one iteration at
#      batch 32 per GPU is 32 / 195 = 0.164 s. Forward is a third of it and backward two thirds
#      (backward does about twice forward's FLOPs), minus a 1 ms SGD update (25.6M parameters,
#      about 16 bytes of memory traffic each, on 732 GB/s of HBM2).
#   2. Inside a node: 30 GB/s per direction between ranks. P100 pairs have two NVLink 1.0 bricks
#      (40 GB/s per direction); a 4-GPU ring also crosses between the sockets through the CPUs
#      (POWER8 X bus, about 38 GB/s), which bounds it. 10 us per message (CUDA IPC and a stream
#      synchronisation). NVLink is full duplex, so intra_duplex=True.
#   3. Between nodes: one EDR InfiniBand NIC per node, 100 Gb/s = 12.5 GB/s signalling, about
#      12 GB/s achievable per direction; 5 us per message (MPI over verbs with GPU buffers). The
#      number of NICs is not in the paper; the table also shows two.
#   4. Reduction: 200 GB/s of incoming data per GPU (HBM2 732 GB/s; an add reads two operands and
#      writes one).
#   5. Each algorithm is modelled as a native implementation (dispatch_overhead = 0), as DDL's
#      C++/MPI code was; so "native" and "ring" predict the same.

P100_RESNET50_IMAGES_PER_S = 195.0  # Rule 1 of NOTE [PowerAI assumptions]
P100_BATCH = 32


def powerai_cluster(nics_per_node: int = 1) -> Cluster:
    """The PowerAI DDL cluster: 64 nodes x 4 P100, NVLink inside, EDR InfiniBand between.

    See NOTE [PowerAI assumptions] for where each number comes from.

    Args:
        nics_per_node: InfiniBand NICs per node (the paper does not say; 1 assumed).

    Example:
        >>> powerai_cluster().world_size
        256
    """
    return Cluster(
        nodes=64,
        gpus_per_node=4,
        intra_latency=10e-6,
        intra_bandwidth=30e9,
        inter_latency=5e-6,
        inter_bandwidth=12e9,
        nics_per_node=nics_per_node,
        reduce_bandwidth=200e9,
        dispatch_overhead=0.0,
        multiring_rings=2,
        intra_duplex=True,
    )


def _resnet50_shapes() -> list[tuple[str, int, int]]:
    """(name, parameters, forward FLOPs at 224x224) of each conv+BN unit and the fc, in order.

    ResNet-50 v1 as in He et al. 2015 (the Caffe model): bottleneck blocks [3, 4, 6, 3], stride
    in the first 1x1 convolution of a downsampling block, batch norm (2 parameters per channel)
    after every convolution, convolutions without bias.
    """
    units: list[tuple[str, int, int]] = []

    def conv(name: str, k: int, cin: int, cout: int, hw_out: int) -> None:
        params = k * k * cin * cout + 2 * cout  # weights + BN scale and shift
        units.append((name, params, 2 * k * k * cin * cout * hw_out * hw_out))

    conv("conv1", 7, 3, 64, 112)
    cin, hw = 64, 56  # after the 3x3 max pool
    for stage, (blocks, mid, out, stride) in enumerate(
        [(3, 64, 256, 1), (4, 128, 512, 2), (6, 256, 1024, 2), (3, 512, 2048, 2)], start=1
    ):
        for b in range(blocks):
            s = stride if b == 0 else 1
            hw_out = hw // s
            name = f"layer{stage}.{b}"
            conv(f"{name}.conv1", 1, cin, mid, hw_out)
            conv(f"{name}.conv2", 3, mid, mid, hw_out)
            conv(f"{name}.conv3", 1, mid, out, hw_out)
            if b == 0:
                conv(f"{name}.downsample", 1, cin, out, hw_out)
            cin, hw = out, hw_out
    units.append(("fc", 2048 * 1000 + 1000, 2 * 2048 * 1000))
    return units


def resnet50_layers(backward_time: float, dtype_bytes: int = 4) -> list[Layer]:
    """ResNet-50's gradient-producing layers, with backward time shared out by FLOPs.

    Args:
        backward_time: seconds of the whole backward on one GPU.
        dtype_bytes: bytes per gradient element (4 for fp32).

    Returns:
        54 layers in registration order (53 conv+BN units and the fc), 25,557,032 parameters.

    Example:
        >>> sum(layer.grad_bytes for layer in resnet50_layers(0.1)) // 4
        25557032
    """
    shapes = _resnet50_shapes()
    total_flops = sum(f for _, _, f in shapes)
    return [
        Layer(name, params * dtype_bytes, backward_time * flops / total_flops)
        for name, params, flops in shapes
    ]


def powerai_resnet50(algorithm: str, nics_per_node: int = 1, **kwargs: object) -> IterationEstimate:
    """Predict one ResNet-50 iteration on the PowerAI cluster (NOTE [PowerAI assumptions]).

    Args:
        algorithm: one of :data:`ALGORITHMS`.
        nics_per_node: InfiniBand NICs per node.
        **kwargs: passed to :func:`simulate_iteration` (``bucket_bytes``, ``first_bucket_bytes``).

    Returns:
        The :class:`IterationEstimate`; ``.efficiency`` is the predicted scaling efficiency.

    Example:
        >>> 0.9 < powerai_resnet50("hierarchical").efficiency <= 1.0
        True
    """
    optimizer = 1e-3
    compute = P100_BATCH / P100_RESNET50_IMAGES_PER_S - optimizer
    return simulate_iteration(
        resnet50_layers(backward_time=compute * 2 / 3),
        powerai_cluster(nics_per_node),
        algorithm,
        forward_time=compute / 3,
        optimizer_time=optimizer,
        **kwargs,
    )
