"""Helper of benchmarks/two_node_veth.sh: link probes, and the summary beside the cost model.

Usage (the shell script calls these; each is bounded in time):
    python benchmarks/veth_summary.py serve HOST PORT             # TCP sink, answers pings
    python benchmarks/veth_summary.py probe HOST PORT NBYTES      # prints JSON: goodput, latency
    python benchmarks/veth_summary.py combine PROBE.json...       # streams that ran together
    python benchmarks/veth_summary.py reduce                      # prints JSON: add throughput
    python benchmarks/veth_summary.py summarize --allreduce FILE --rate-bps R --out FILE ...

``probe`` measures one TCP stream's goodput (bytes/s) and half the round trip of a 1-byte
ping-pong (seconds) to a ``serve`` on HOST:PORT. The script probes the veth with one stream
(the link's capacity), and loopback with four streams at once, two in each namespace, as the
intra-node phases of "hierarchical" run them: on a small machine loopback is CPU-bound, and
the per-stream goodput under that load, not one stream's on an idle machine, is what the
model's intra-node bandwidth should be. ``summarize`` reads the benchmark's JSON, computes bus
bandwidths (nccl-tests: busbw = algbw * 2(p-1)/p), the inter-node link floor
(2(m-1)/m * bytes over the limited link, m nodes), the targets of issue 5, and the cost model's
prediction for the same setup, prints them and writes JSON with a ``summary`` list.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import socket
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

CHUNK = 1 << 20
PINGS = 200
DEADLINE_S = 30.0  # every socket operation and the whole serve loop are bounded by this


def serve(host: str, port: int) -> int:
    """Accept one probe connection: answer PINGS one-byte pings, then sink the bulk bytes."""
    with socket.create_server((host, port)) as srv:
        srv.settimeout(DEADLINE_S)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(DEADLINE_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(PINGS):
                conn.sendall(conn.recv(1))
            total = int.from_bytes(conn.recv(8).rjust(8, b"\0"), "big")
            got = 0
            while got < total:
                data = conn.recv(CHUNK)
                if not data:
                    break
                got += len(data)
            conn.sendall(b"k")  # the sender stops its clock when everything has arrived
    return 0


def probe(host: str, port: int, nbytes: int) -> dict:
    """Measure half the round trip and one stream's goodput to ``serve`` on host:port."""
    end = time.monotonic() + DEADLINE_S
    while True:  # the server may still be starting; retry until the deadline
        try:
            conn = socket.create_connection((host, port), timeout=DEADLINE_S)
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        for _ in range(PINGS):
            conn.sendall(b"p")
            conn.recv(1)
        latency = (time.perf_counter() - t0) / PINGS / 2
        buf = b"\0" * CHUNK
        conn.sendall(nbytes.to_bytes(8, "big"))
        t0 = time.perf_counter()
        sent = 0
        while sent < nbytes:
            sent += conn.send(buf[: min(CHUNK, nbytes - sent)])
        conn.recv(1)
        seconds = time.perf_counter() - t0
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "goodput_Bps": nbytes / seconds,
        "latency_s": latency,
    }


def combine(paths: list[str]) -> dict:
    """Several probes that ran at the same time: mean per-stream goodput and latency."""
    runs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    return {
        "streams": len(runs),
        "goodput_Bps": sum(r["goodput_Bps"] for r in runs) / len(runs),
        "latency_s": sum(r["latency_s"] for r in runs) / len(runs),
        "runs": runs,
    }


def reduce_bandwidth() -> float:
    """Bytes/s of incoming data one process adds (``a.add_(b)`` on 16 MiB of float32)."""
    import torch

    a, b = torch.ones(4 << 20), torch.ones(4 << 20)
    a.add_(b)
    t0 = time.perf_counter()
    for _ in range(10):
        a.add_(b)
    return 10 * b.numel() * 4 / (time.perf_counter() - t0)


def _rows(bench: dict) -> list[dict]:
    """The per-(algorithm, size) rows of benchmarks/allreduce.py's JSON."""
    for key in ("results", "rows"):
        if isinstance(bench.get(key), list):
            return bench[key]
    raise SystemExit(f"no 'results' list in the allreduce JSON; keys: {sorted(bench)}")


def summarize(args: argparse.Namespace) -> int:
    from ddl import costmodel as cm

    bench = json.loads(pathlib.Path(args.allreduce).read_text())
    veth = json.loads(pathlib.Path(args.veth_probe).read_text())
    loop = json.loads(pathlib.Path(args.loop_probe).read_text())
    m, g = args.nodes, args.local_size
    p = m * g
    rate = args.rate_bps / 8  # tc rate, bytes/s
    measured = {}
    for row in _rows(bench):
        # benchmarks/allreduce.py reports time_us (mean over iterations of the slowest rank);
        # "auto->x" rows repeat an algorithm and are left out.
        seconds = row["time_s"] if "time_s" in row else row["time_us"] * 1e-6
        if int(row["bytes"]) == args.size and "->" not in row["algorithm"]:
            measured[row["algorithm"]] = float(seconds)
    if "native" not in measured:
        raise SystemExit(f"no 'native' row for {args.size} bytes in {args.allreduce}")
    n = args.size
    floor_s = 2 * (m - 1) / m * n / rate  # the inter-node link floor at the tc rate
    floor_goodput_s = 2 * (m - 1) / m * n / veth["goodput_Bps"]  # at measured TCP goodput

    def busbw(seconds: float) -> float:
        return cm.bus_bandwidth(n, seconds, p)

    cluster = cm.Cluster(
        nodes=m,
        gpus_per_node=g,
        intra_latency=loop["latency_s"],
        intra_bandwidth=loop["goodput_Bps"],
        inter_latency=veth["latency_s"],
        inter_bandwidth=veth["goodput_Bps"],
        nics_per_node=1,
        reduce_bandwidth=json.loads(pathlib.Path(args.reduce_probe).read_text())["reduce_Bps"],
        pair_duplex=True,  # ddl puts each direction of a Gloo pair on its own group
    )
    piece = os.environ.get("DDL_PIECE_BYTES")  # the run's override, so the model pipelines alike
    if piece and piece.strip().isdigit():
        cluster = dataclasses.replace(
            cluster,
            pipeline_piece_bytes=max(1, int(piece)),
            pipeline_max_pieces=cluster.pipeline_max_pieces if int(piece) > 0 else 1,
        )
    one_way = dataclasses.replace(cluster, pair_duplex=False)  # NOTE [Alpha-beta model] Rule 6
    rows = []
    for algo in cm.ALGORITHMS:
        if algo not in measured:
            continue
        t = measured[algo]
        pred = cm.allreduce_time(n, algo, cluster)
        pred_one_way = cm.allreduce_time(n, algo, one_way)
        rows.append(
            {
                "algorithm": algo,
                "bytes": n,
                "time_s": round(t, 4),
                "busbw_MBps": round(busbw(t) / 1e6, 1),
                "vs_native_busbw": round(measured["native"] / t, 3),
                "vs_floor_time": round(t / floor_s, 3),
                "predicted_s": round(pred, 4),
                "predicted_busbw_MBps": round(busbw(pred) / 1e6, 1),
                "predicted_one_way_pairs_s": round(pred_one_way, 4),
            }
        )
    print(
        f"\n=== {n >> 20} MiB allreduce, {m} nodes x {g} ranks, link {args.rate_bps / 1e9:g} Gbit/s"
    )
    print(
        f"link probe: veth {veth['goodput_Bps'] / 1e6:.1f} MB/s TCP goodput, "
        f"{veth['latency_s'] * 1e6:.0f} us half round trip; loopback "
        f"{loop['goodput_Bps'] / 1e6:.0f} MB/s per stream with {loop.get('streams', 1)} at once, "
        f"{loop['latency_s'] * 1e6:.0f} us; "
        f"reduction {cluster.reduce_bandwidth / 1e9:.1f} GB/s"
    )
    print(
        f"inter-node floor 2(m-1)/m x bytes / link: {floor_s:.3f} s at the tc rate "
        f"(busbw {busbw(floor_s) / 1e6:.1f} MB/s), {floor_goodput_s:.3f} s at the measured goodput"
    )
    head = f"{'algorithm':<13}{'time s':>8}{'busbw MB/s':>11}{'x native':>9}{'/ floor':>8}"
    print(head + f"{'model s':>9}{'model MB/s':>11}{'one-way pairs s':>17}")
    for r in rows:
        print(
            f"{r['algorithm']:<13}{r['time_s']:>8.3f}{r['busbw_MBps']:>11.1f}"
            f"{r['vs_native_busbw']:>9.2f}{r['vs_floor_time']:>8.2f}"
            f"{r['predicted_s']:>9.3f}{r['predicted_busbw_MBps']:>11.1f}"
            f"{r['predicted_one_way_pairs_s']:>17.3f}"
        )
    print(
        "model s: the cost model (ddl.costmodel) with this run's probes; one-way pairs s: the "
        "same if ddl's two-member rings moved one direction at a time, as Gloo does when both "
        "directions of a pair share one process group (NOTE [Alpha-beta model] Rule 6)."
    )
    targets = {}
    if "hierarchical" in measured:
        h = measured["hierarchical"]
        targets = {
            "hierarchical_vs_native_busbw": round(measured["native"] / h, 3),
            "target_vs_native": 1.4,
            "met_vs_native": measured["native"] / h >= 1.4,
            "hierarchical_vs_floor": round(h / floor_s, 3),
            "target_vs_floor": 1.25,
            "met_vs_floor": h / floor_s <= 1.25,
        }
        print(
            f"targets: hierarchical busbw = {targets['hierarchical_vs_native_busbw']:.3f}x native "
            f"(need >= 1.4: {'met' if targets['met_vs_native'] else 'NOT met'}); time = "
            f"{targets['hierarchical_vs_floor']:.3f}x the floor (need <= 1.25: "
            f"{'met' if targets['met_vs_floor'] else 'NOT met'})"
        )
    result = {
        "command": args.command,
        "date": args.date,
        "device": "cpu, 2 network namespaces on one host, veth limited by tc tbf",
        "rate_bps": args.rate_bps,
        "nodes": m,
        "local_size": g,
        "bytes": n,
        "floor_s": floor_s,
        "floor_goodput_s": floor_goodput_s,
        "veth_probe": veth,
        "loopback_probe": loop,
        "model_cluster": {k: getattr(cluster, k) for k in cluster.__dataclass_fields__},
        "targets": targets,
        "summary": rows,
        "allreduce": bench,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("host")
    s.add_argument("port", type=int)
    pr = sub.add_parser("probe")
    pr.add_argument("host")
    pr.add_argument("port", type=int)
    pr.add_argument("nbytes", type=int)
    sub.add_parser("reduce")
    cb = sub.add_parser("combine")
    cb.add_argument("paths", nargs="+", help="probe JSON files of streams that ran together")
    sm = sub.add_parser("summarize")
    sm.add_argument("--allreduce", required=True, help="JSON written by benchmarks/allreduce.py")
    sm.add_argument("--veth-probe", required=True)
    sm.add_argument("--loop-probe", required=True)
    sm.add_argument("--reduce-probe", required=True, help="JSON written by 'reduce'")
    sm.add_argument("--rate-bps", type=float, required=True, help="tc rate in bits/s")
    sm.add_argument("--size", type=int, default=64 << 20)
    sm.add_argument("--nodes", type=int, default=2)
    sm.add_argument("--local-size", type=int, default=2)
    sm.add_argument("--command", default="")
    sm.add_argument("--date", default="")
    sm.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.host, args.port)
    if args.cmd == "probe":
        print(json.dumps(probe(args.host, args.port, args.nbytes)))
        return 0
    if args.cmd == "reduce":
        print(json.dumps({"reduce_Bps": reduce_bandwidth()}))
        return 0
    if args.cmd == "combine":
        print(json.dumps(combine(args.paths)))
        return 0
    return summarize(args)


if __name__ == "__main__":
    sys.exit(main())
