"""Pure planning, in one process: topology arithmetic, rings, groups, ring schedules.

The schedules are checked by simulating a ring allreduce on plain Python lists for many
ring sizes: every position must end with the full sum of every chunk.
"""

from __future__ import annotations

import itertools

import pytest

from ddl import DDLError
from ddl.topology import (
    Topology,
    all_gather_schedule,
    check_algorithm,
    chunk_bounds,
    hierarchical_groups,
    local_size_from_env,
    multiring_orders,
    reduce_scatter_schedule,
    ring_order,
)


def test_topology_arithmetic():
    t = Topology(8, 4)
    assert (t.nodes, t.uniform) == (2, True)
    assert [t.node_of(r) for r in range(8)] == [0] * 4 + [1] * 4
    assert [t.local_rank_of(r) for r in range(8)] == [0, 1, 2, 3] * 2
    assert t.node_ranks(1) == (4, 5, 6, 7)
    odd = Topology(5, 2)
    assert (odd.nodes, odd.uniform, odd.node_ranks(2)) == (3, False, (4,))


@pytest.mark.parametrize("ws,ls", [(0, 1), (4, 0), (2, 3), (4, 1.5), (True, 1)])
def test_topology_rejects_nonsense(ws, ls):
    with pytest.raises(DDLError):
        Topology(ws, ls)


def test_local_size_precedence_and_errors():
    env = {"LOCAL_WORLD_SIZE": "4", "DDL_LOCAL_SIZE": "2"}
    assert local_size_from_env(env, 8) == 2
    assert local_size_from_env(env, 8, override=1) == 1
    assert local_size_from_env({"LOCAL_WORLD_SIZE": "4"}, 8) == 4
    assert local_size_from_env({}, 8) == 8
    with pytest.raises(DDLError, match="DDL_LOCAL_SIZE"):
        local_size_from_env({"DDL_LOCAL_SIZE": "two"}, 8)
    with pytest.raises(DDLError, match="between 1 and the world size 4"):
        local_size_from_env({"DDL_LOCAL_SIZE": "8"}, 4)


def test_check_algorithm():
    for alg in ("native", "ring", "multiring", "hierarchical", "auto"):
        check_algorithm(Topology(4, 2), alg)
    with pytest.raises(DDLError, match="local_size 3 does not divide world_size 4"):
        check_algorithm(Topology(4, 3), "hierarchical")
    check_algorithm(Topology(4, 3), "ring")  # flat algorithms do not care
    with pytest.raises(DDLError, match="unknown algorithm 'tree'"):
        check_algorithm(Topology(4, 2), "tree")


@pytest.mark.parametrize("numel,parts", [(0, 3), (1, 4), (10, 4), (12, 4), (7, 1), (1 << 20, 3)])
def test_chunk_bounds_cover_everything(numel, parts):
    b = chunk_bounds(numel, parts)
    assert len(b) == parts and b[0][0] == 0 and b[-1][1] == numel
    assert all(b[i][1] == b[i + 1][0] for i in range(parts - 1))
    sizes = [hi - lo for lo, hi in b]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("ws,ls", [(2, 1), (4, 2), (8, 4), (6, 2), (5, 2), (16, 4)])
def test_rings_are_permutations_and_use_links_both_ways(ws, ls):
    t = Topology(ws, ls)
    assert ring_order(t) == tuple(range(ws))
    orders = multiring_orders(t, 4)
    for o in orders:
        assert sorted(o) == list(range(ws))
    # Every directed link of ring 0 is carried in the opposite direction by ring 1.
    fwd = {(o, n) for o, n in zip(orders[0], orders[0][1:] + orders[0][:1])}
    rev = {(n, o) for o, n in zip(orders[1], orders[1][1:] + orders[1][:1])}
    assert fwd == rev
    # Ring orders stay node-major: each ring crosses each node boundary exactly once
    # per direction it runs, so inter-node traffic is not multiplied.
    for o in orders:
        crossings = sum(t.node_of(a) != t.node_of(b) for a, b in zip(o, o[1:] + o[:1]))
        assert crossings == (t.nodes if t.nodes > 1 else 0)


def test_multiring_rotates_the_node_exit():
    orders = multiring_orders(Topology(8, 4), 4)
    assert orders[0][:4] == (0, 1, 2, 3) and orders[2][:4] == (1, 2, 3, 0)
    with pytest.raises(DDLError):
        multiring_orders(Topology(4, 2), 0)


def test_hierarchical_groups():
    intra, inter = hierarchical_groups(Topology(8, 4))
    assert intra == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert inter == ((0, 4), (1, 5), (2, 6), (3, 7))
    with pytest.raises(DDLError, match="hierarchical"):
        hierarchical_groups(Topology(6, 4))


def _simulate_ring_allreduce(values, numel):
    """Run the schedules on lists: values[pos] is position pos's vector."""
    p = len(values)
    bounds = chunk_bounds(numel, p)
    bufs = [list(v) for v in values]
    for phase, schedule in (("rs", reduce_scatter_schedule), ("ag", all_gather_schedule)):
        for s in range(p - 1):
            msgs = {}
            for pos in range(p):
                send_c, _ = schedule(pos, p)[s]
                lo, hi = bounds[send_c]
                msgs[(pos + 1) % p] = (send_c, bufs[pos][lo:hi])
            for pos in range(p):
                _, recv_c = schedule(pos, p)[s]
                got_c, data = msgs[pos]
                assert got_c == recv_c, "sender and receiver disagree on the chunk"
                lo, hi = bounds[recv_c]
                for k, v in zip(range(lo, hi), data):
                    bufs[pos][k] = bufs[pos][k] + v if phase == "rs" else v
        if phase == "rs":
            for pos in range(p):  # position pos owns the full sum of chunk pos
                lo, hi = bounds[pos]
                want = [sum(values[q][k] for q in range(p)) for k in range(lo, hi)]
                assert bufs[pos][lo:hi] == want
    return bufs


@pytest.mark.parametrize("p,numel", list(itertools.product([1, 2, 3, 4, 7], [1, 5, 13])))
def test_ring_schedules_compute_the_sum_everywhere(p, numel):
    values = [[(q + 1) * 10**k for k in range(numel)] for q in range(p)]
    out = _simulate_ring_allreduce(values, numel)
    total = [sum(v[k] for v in values) for k in range(numel)]
    assert all(b == total for b in out)
