"""Allreduce bandwidth of every ddl algorithm against the backend's own ("native").

Launch with torchrun (one process per rank):

    torchrun --nproc-per-node=4 benchmarks/allreduce.py --sizes 4KiB..256MiB
    DDL_LOCAL_SIZE=2 torchrun --nproc-per-node=4 benchmarks/allreduce.py   # 2 "nodes" x 2

Run without torchrun it relaunches itself under ``torch.distributed.run --standalone``
with ``--ranks`` ranks (default 2), so ``python benchmarks/allreduce.py --quick`` and
``python benchmarks/allreduce.py --ranks 4 --quick`` work.

Reported per size and algorithm (nccl-tests definitions): time = the slowest rank's mean
time of one blocking ``ddl.allreduce(x, op="sum")``, median over --repeats rounds in which
the algorithms take turns; algbw = bytes / time; busbw = algbw x 2(n-1)/n; "vs native" =
native time / this time (>1 is faster). Timing skips ddl's per-call shape check
(``check=False``) for every algorithm alike. Each algorithm's result is
also checked once against native on random data (max abs error printed). Rank 0 prints
the command, device, date and table, and writes JSON (or CSV when --out ends in .csv).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time

_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 1000, "MB": 10**6}
ALGORITHMS = ("native", "ring", "multiring", "hierarchical", "auto")


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B?)\s*", text, re.IGNORECASE)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 4KiB, 64MiB, 1GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_sizes(text: str, factor: int) -> list[int]:
    """'4KiB..256MiB' (geometric, x factor) or '4KiB,1MiB,64MiB'."""
    if ".." in text:
        lo, hi = (parse_bytes(t) for t in text.split(".."))
        sizes, s = [], lo
        while s <= hi:
            sizes.append(s)
            s *= factor
        return sizes
    return [parse_bytes(t) for t in text.split(",") if t.strip()]


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--algorithms",
        nargs="+",
        default=list(ALGORITHMS),
        help="algorithms to time (space or comma separated); native is always timed as "
        "the baseline. Default: %(default)s",
    )
    p.add_argument(
        "--sizes",
        default="4KiB..256MiB",
        help="bytes per rank: 'LO..HI' (x --factor steps) or a comma list. Default: %(default)s",
    )
    p.add_argument("--factor", type=int, default=4, help="step of a LO..HI range (default 4)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per point (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds in which the algorithms take turns; the median is reported (default 3)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument(
        "--backend",
        default=None,
        help="gloo or nccl (default: nccl when every rank has its own GPU, else gloo)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu or cuda (default: cuda with nccl, cpu with gloo)",
    )
    p.add_argument("--local-size", type=int, default=None, help="ranks per node (DDL_LOCAL_SIZE)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="per size: cut --iters so all algorithms and repeats together take about this "
        "long (useful for large sizes on slow links)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="sizes 4KiB..4MiB, 5 iterations, 2 warm-up, 2 repeats: a smoke run in well under 90 s",
    )
    # Not "--nproc": when we relaunch under torchrun, its parser also scans this script's
    # arguments and rejects "--nproc" as an ambiguous prefix of its own "--nproc-per-node".
    p.add_argument(
        "--ranks",
        type=int,
        default=2,
        help="ranks to start when not launched by torchrun (default 2; ignored under torchrun)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output path; .json (default) or .csv. "
        "Default: benchmarks/results/allreduce-<UTC time>.json",
    )
    return p


def relaunch(args: argparse.Namespace) -> int:
    """Not under torchrun: start ``--ranks`` ranks of this script with torch.distributed.run."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.ranks}",
        os.path.abspath(__file__),
        *sys.argv[1:],
    ]
    print("relaunching under torchrun:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def main() -> int:
    args = build_parser().parse_args()
    if "RANK" not in os.environ:
        return relaunch(args)
    if args.quick:
        args.sizes, args.iters, args.warmup, args.repeats = "4KiB..4MiB", 5, 2, 2
    algorithms = []
    for a in args.algorithms:
        algorithms += [x for x in a.split(",") if x]
    unknown = set(algorithms) - set(ALGORITHMS)
    if unknown:
        raise SystemExit(f"unknown algorithms {sorted(unknown)}; choose from {ALGORITHMS}")
    if "native" in algorithms:
        algorithms.remove("native")
    algorithms = ["native"] + algorithms
    sizes = parse_sizes(args.sizes, args.factor)

    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ddl

    world = int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = args.backend
    if backend is None:
        backend = "nccl" if torch.cuda.device_count() >= local_world else "gloo"
    device = torch.device(args.device or ("cuda" if backend == "nccl" else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=600))
    ddl.init(local_size=args.local_size, timeout=600)
    rank, topo = ddl.rank(), ddl.topology()
    dtype = getattr(torch, args.dtype)
    esize = torch.empty(0, dtype=dtype).element_size()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if rank == 0:
        print("command:", " ".join([sys.executable, *sys.argv]))
        print(
            f"launch env: WORLD_SIZE={world} LOCAL_WORLD_SIZE={local_world} "
            f"DDL_LOCAL_SIZE={os.environ.get('DDL_LOCAL_SIZE', '')} host={socket.gethostname()}"
        )
        print("device:", device_name(device))
        print("date:", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        print(
            f"torch {torch.__version__}, backend {backend}, world {world} = "
            f"{topo.nodes} node(s) x {topo.local_size}, dtype {args.dtype}, "
            f"iters {args.iters}, warmup {args.warmup}"
        )
        head = f"{'size':>8} {'algorithm':>18} {'time_us':>11} {'algbw_GB/s':>11}"
        print(head + f" {'busbw_GB/s':>11} {'vs_native':>9} {'max_err':>9}")

    def timed(alg: str, x, iters: int) -> float:
        """Slowest rank's mean seconds per blocking allreduce over ``iters`` calls."""
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            ddl.allreduce(x, algorithm=alg, check=False)
        sync()
        elapsed = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item()

    rows = []
    for nbytes in sizes:
        numel = max(1, nbytes // esize)
        nb = numel * esize
        algs = [a for a in algorithms if a != "hierarchical" or topo.uniform]
        names, errors = {}, {}
        x = torch.zeros(numel, dtype=dtype, device=device)
        for alg in algs:
            names[alg] = alg
            if alg == "auto":
                names[alg] = "auto->" + ddl.algorithms.resolve_algorithm("auto", nb, topo)
            # Correctness once, against native on random data.
            g = torch.Generator().manual_seed(rank * 7919 + numel)
            ref = torch.randn(numel, generator=g).to(dtype).to(device)
            got = ref.clone()
            ddl.allreduce(ref, algorithm="native", check=False)
            ddl.allreduce(got, algorithm=alg, check=False)
            errors[alg] = float((got.float() - ref.float()).abs().max())
            for _ in range(args.warmup):
                ddl.allreduce(x, algorithm=alg, check=False)
        iters = args.iters
        if args.max_seconds is not None:
            probe = max(timed(a, x, 1) for a in algs)
            budget = args.max_seconds / (len(algs) * args.repeats)
            iters = max(1, min(iters, int(budget / max(probe, 1e-9))))
        # Algorithms take turns, repeats times; the median damps a noisy machine.
        samples: dict[str, list[float]] = {a: [] for a in algs}
        for _ in range(args.repeats):
            for alg in algs:
                samples[alg].append(timed(alg, x, iters))
        base_time = statistics.median(samples["native"])
        for alg in algs:
            t = statistics.median(samples[alg])
            algbw = nb / t / 1e9
            busbw = algbw * 2 * (world - 1) / world
            row = dict(
                bytes=nb,
                size=human(nb),
                algorithm=names[alg],
                time_us=t * 1e6,
                algbw_GBps=algbw,
                busbw_GBps=busbw,
                vs_native=base_time / t,
                max_err=errors[alg],
                iters=iters,
                repeats=args.repeats,
                time_us_all=[v * 1e6 for v in samples[alg]],
            )
            rows.append(row)
            if rank == 0:
                print(
                    f"{row['size']:>8} {names[alg]:>18} {t * 1e6:>11.1f} {algbw:>11.3f} "
                    f"{busbw:>11.3f} {row['vs_native']:>9.2f} {errors[alg]:>9.2g}",
                    flush=True,
                )

    if rank == 0:
        out = args.out
        if out is None:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            out = os.path.join(os.path.dirname(__file__), "results", f"allreduce-{stamp}.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        meta = dict(
            command=" ".join([sys.executable, *sys.argv]),
            device=device_name(device),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            torch=torch.__version__,
            backend=backend,
            world_size=world,
            local_size=topo.local_size,
            nodes=topo.nodes,
            dtype=args.dtype,
            iters=args.iters,
            warmup=args.warmup,
            repeats=args.repeats,
            busbw_definition="algbw * 2(n-1)/n (nccl-tests)",
        )
        if out.endswith(".csv"):
            with open(out, "w", newline="") as f:
                extra = [k for k in meta if k not in rows[0]]  # per-row values win
                w = csv.DictWriter(f, fieldnames=list(rows[0]) + extra)
                w.writeheader()
                for r in rows:
                    w.writerow({**{k: meta[k] for k in extra}, **r})
        else:
            with open(out, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print("wrote", out)
        for nb in sizes:
            best = max(
                (r for r in rows if r["bytes"] == max(1, nb // esize) * esize),
                key=lambda r: r["busbw_GBps"],
            )
            print(
                f"summary {best['size']:>8}: best {best['algorithm']} busbw "
                f"{best['busbw_GBps']:.3f} GB/s ({best['vs_native']:.2f}x native)"
            )
    ddl.shutdown()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
