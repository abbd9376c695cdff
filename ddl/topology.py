"""Pure planning: nodes, local ranks, rings, groups and ring schedules over plain integers.

Nothing in this module touches processes, tensors or ``torch.distributed``; every function
takes and returns plain data, so the whole plan is tested in one process with any world
size (see ``tests/ddl/test_topology.py``). ``ddl.algorithms`` carries a plan out.

# NOTE [Rank layout]
# 1. Ranks are node-major, as torchrun assigns them: node ``n`` holds the global ranks
#    ``n*g .. n*g+g-1`` where ``g`` is the local size (``LOCAL_WORLD_SIZE``).
# 2. A local size that does not divide the world size is allowed for the flat algorithms
#    (the last node is then smaller), but not for "hierarchical", which needs the same
#    number of ranks on every node (``check_algorithm`` says so).
# 3. Every rank computes the same plan from the same two integers, so no plan is ever
#    exchanged: agreeing on ``(world_size, local_size)`` is agreeing on the plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import DDLError

__all__ = [
    "ALGORITHMS",
    "CHOICES",
    "Topology",
    "all_gather_schedule",
    "check_algorithm",
    "chunk_bounds",
    "hierarchical_groups",
    "local_size_from_env",
    "multiring_orders",
    "reduce_scatter_schedule",
    "ring_order",
]

# The concrete algorithms; "auto" resolves to one of them through ddl.costmodel.
ALGORITHMS: tuple[str, ...] = ("native", "ring", "multiring", "hierarchical")
CHOICES: tuple[str, ...] = ALGORITHMS + ("auto",)


@dataclass(frozen=True)
class Topology:
    """How many ranks there are and how many share a node.

    Attributes:
        world_size: number of ranks in the job (>= 1).
        local_size: ranks per node (1 <= local_size <= world_size); see NOTE [Rank layout].

    Example:
        >>> t = Topology(world_size=8, local_size=4)
        >>> t.nodes, t.node_of(5), t.local_rank_of(5), t.node_ranks(1)
        (2, 1, 1, (4, 5, 6, 7))
    """

    world_size: int
    local_size: int

    def __post_init__(self) -> None:
        for name in ("world_size", "local_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DDLError(f"{name} must be a positive integer, got {v!r}")
        if self.local_size > self.world_size:
            raise DDLError(
                f"local_size {self.local_size} is larger than world_size {self.world_size}; "
                "set DDL_LOCAL_SIZE / ddl.init(local_size=...) to at most the world size"
            )

    @property
    def nodes(self) -> int:
        """Number of nodes (the last one may be smaller when local_size does not divide)."""
        return -(-self.world_size // self.local_size)

    @property
    def uniform(self) -> bool:
        """True when every node holds exactly ``local_size`` ranks."""
        return self.world_size % self.local_size == 0

    def node_of(self, rank: int) -> int:
        """Node index of a global rank."""
        self._check_rank(rank)
        return rank // self.local_size

    def local_rank_of(self, rank: int) -> int:
        """Rank within its node."""
        self._check_rank(rank)
        return rank % self.local_size

    def node_ranks(self, node: int) -> tuple[int, ...]:
        """Global ranks on ``node``, in local-rank order."""
        if not 0 <= node < self.nodes:
            raise DDLError(f"node {node} out of range for {self.nodes} nodes")
        start = node * self.local_size
        return tuple(range(start, min(start + self.local_size, self.world_size)))

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise DDLError(f"rank {rank} out of range for world_size {self.world_size}")


def local_size_from_env(
    env: Mapping[str, str], world_size: int, override: int | None = None
) -> int:
    """Ranks per node: ``override``, else ``DDL_LOCAL_SIZE``, else ``LOCAL_WORLD_SIZE``, else all.

    Args:
        env: the environment (``os.environ`` or a dict in tests).
        world_size: the job's world size; the fallback when nothing else says.
        override: ``ddl.init(local_size=...)``; wins over the environment.

    Returns:
        The local size, validated against ``world_size`` by :class:`Topology`.

    Raises:
        DDLError: when a value is not a positive integer or exceeds the world size.

    Example:
        >>> local_size_from_env({"LOCAL_WORLD_SIZE": "4", "DDL_LOCAL_SIZE": "2"}, 4)
        2
    """
    if override is not None:
        value, source = override, "ddl.init(local_size=...)"
    elif env.get("DDL_LOCAL_SIZE"):
        value, source = env["DDL_LOCAL_SIZE"], "DDL_LOCAL_SIZE"
    elif env.get("LOCAL_WORLD_SIZE"):
        value, source = env["LOCAL_WORLD_SIZE"], "LOCAL_WORLD_SIZE"
    else:
        return world_size
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise DDLError(
            f"{source}={value!r} is not an integer; set it to the ranks per node"
        ) from None
    if isinstance(value, bool) or size < 1 or size > world_size:
        raise DDLError(
            f"{source}={value!r} must be between 1 and the world size {world_size}; "
            "it is the number of ranks per node"
        )
    return size


def check_algorithm(topo: Topology, algorithm: str) -> None:
    """Raise :class:`DDLError` unless ``algorithm`` is known and fits ``topo``.

    Example:
        >>> check_algorithm(Topology(4, 2), "hierarchical")  # fine: 2 nodes x 2
    """
    if algorithm not in CHOICES:
        raise DDLError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(CHOICES)}")
    if algorithm == "hierarchical" and not topo.uniform:
        raise DDLError(
            f"algorithm 'hierarchical' needs the same number of ranks on every node, but "
            f"local_size {topo.local_size} does not divide world_size {topo.world_size}; "
            "fix DDL_LOCAL_SIZE / LOCAL_WORLD_SIZE or use algorithm='ring'"
        )


def chunk_bounds(numel: int, parts: int) -> tuple[tuple[int, int], ...]:
    """Split ``range(numel)`` into ``parts`` contiguous pieces whose sizes differ by at most 1.

    The first ``numel % parts`` pieces get the extra element; pieces may be empty when
    ``numel < parts`` (a 1-element tensor on 4 ranks), which the ring handles as
    zero-length messages skipped on both sides.

    Example:
        >>> chunk_bounds(10, 4)
        ((0, 3), (3, 6), (6, 8), (8, 10))
    """
    if numel < 0 or parts < 1:
        raise DDLError(f"cannot split {numel} elements into {parts} parts")
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return tuple(bounds)


def ring_order(topo: Topology) -> tuple[int, ...]:
    """The single ring: node-major rank order, so it crosses each node boundary once.

    Example:
        >>> ring_order(Topology(4, 2))
        (0, 1, 2, 3)
    """
    return tuple(range(topo.world_size))


def multiring_orders(topo: Topology, n_rings: int = 2) -> tuple[tuple[int, ...], ...]:
    """Orders for ``n_rings`` concurrent rings that together use every link both ways.

    Ring ``k`` visits the nodes in order; inside each node it starts at local rank
    ``(k // 2) % local_size`` (so successive ring pairs leave each node through a different
    rank, which on real clusters is a different NIC), and odd rings run in reverse, so
    each directed link carries one ring's traffic and its reverse carries another's.

    Args:
        topo: the topology.
        n_rings: how many rings (>= 1). Two (one per direction) is the default.

    Returns:
        ``n_rings`` tuples, each a permutation of ``range(world_size)``.

    Example:
        >>> multiring_orders(Topology(4, 2), 4)
        ((0, 1, 2, 3), (3, 2, 1, 0), (1, 0, 3, 2), (2, 3, 0, 1))
    """
    if isinstance(n_rings, bool) or not isinstance(n_rings, int) or n_rings < 1:
        raise DDLError(f"n_rings must be a positive integer, got {n_rings!r}")
    orders = []
    for k in range(n_rings):
        rot = (k // 2) % topo.local_size
        order: list[int] = []
        for node in range(topo.nodes):
            ranks = topo.node_ranks(node)
            r = rot % len(ranks)
            order.extend(ranks[r:] + ranks[:r])
        if k % 2 == 1:
            order.reverse()
        orders.append(tuple(order))
    return tuple(orders)


def hierarchical_groups(
    topo: Topology,
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """Intra-node groups (one per node) and inter-node groups (one per local rank).

    Returns:
        ``(intra, inter)``: ``intra[n]`` lists node ``n``'s ranks; ``inter[j]`` lists the
        ranks with local rank ``j`` on every node, in node order (the ring across nodes
        that carries shard ``j``).

    Raises:
        DDLError: when the topology is not uniform (see ``check_algorithm``).

    Example:
        >>> hierarchical_groups(Topology(4, 2))
        (((0, 1), (2, 3)), ((0, 2), (1, 3)))
    """
    check_algorithm(topo, "hierarchical")
    intra = tuple(topo.node_ranks(n) for n in range(topo.nodes))
    g = topo.local_size
    inter = tuple(tuple(n * g + j for n in range(topo.nodes)) for j in range(g))
    return intra, inter


def reduce_scatter_schedule(position: int, ring_size: int) -> tuple[tuple[int, int], ...]:
    """Chunks to ``(send, receive-and-add)`` at each reduce-scatter step of a ring.

    Position ``i`` sends to position ``i+1`` and receives from ``i-1``. After the
    ``ring_size - 1`` steps position ``i`` holds the full sum of chunk ``i``.

    Example:
        >>> reduce_scatter_schedule(0, 3)
        ((2, 1), (1, 0))
    """
    p, i = ring_size, position
    return tuple(((i - s - 1) % p, (i - s - 2) % p) for s in range(p - 1))


def all_gather_schedule(position: int, ring_size: int) -> tuple[tuple[int, int], ...]:
    """Chunks to ``(send, receive-into-place)`` at each all-gather step of a ring.

    Starts from the state ``reduce_scatter_schedule`` leaves (position ``i`` owns chunk
    ``i``) and ends with every position holding every chunk.

    Example:
        >>> all_gather_schedule(0, 3)
        ((0, 2), (2, 1))
    """
    p, i = ring_size, position
    return tuple(((i - s) % p, (i - s - 1) % p) for s in range(p - 1))
