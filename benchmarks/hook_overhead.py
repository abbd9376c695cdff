"""The host time LMS adds per saved tensor: plain PyTorch against LMS on a tiny GPT.

On a real step the saved-tensor hooks run once per saved tensor in forward (pack),
once in backward (unpack), and once more when autograd frees it (release). On a
model this small the compute is short, so the step time difference is almost all
Python in those hooks. Three LMS configurations (``weights=False``):

  - ``none-eligible``: ``min_size`` above every tensor: the hooks only reject;
  - ``kept``: every saved tensor is eligible, none is swapped (the limit is far away);
  - ``swapped``: ``limit=0``: every eligible tensor goes out and comes back (on the
    CPU the copies are synchronous: this includes the copies themselves).

The plain model and one copy of it per configuration, LMS enabled on each, are
stepped in turn (a step is forward, backward and ``zero_grad``): each round times one
step of every variant, so load from other processes hits them alike. The overhead of
a round is the LMS step minus the plain step of that round, divided by the saved
tensors of one step (counted with a counting ``saved_tensors_hooks``). The table
gives medians over ``--rounds`` rounds and the quartiles, so that noise shows. Two
clocks: wall time, and this thread's CPU time (on the CPU with one torch thread,
forward and backward run on this thread, and time taken by other processes is not
counted).

Usage:
    python benchmarks/hook_overhead.py                 # 16 layers, width 32, batch 1, seq 16
    python benchmarks/hook_overhead.py --rounds 400 --configs kept
    python benchmarks/hook_overhead.py --device cuda --threads 0

Writes JSON (``--out``) and CSV next to it (same stem).

Reference (the default command; 2-core AMD EPYC, torch 2.13.0+cpu, 2026-11-29; 397 saved
tensors a step; median us per saved tensor, wall clock, two runs each, before -> after
commit 1cb690f, "cheaper saved-tensor hooks"): none-eligible 11.2, 11.4 -> 11.0, 10.7;
kept 54.4, 54.4 -> 48.1, 47.3; swapped 137.8, 137.0 -> 125.1, 128.8.
Again 2026-11-29 15:46-15:48 UTC, before 2f536f0 -> after 35bda61 and the commit that adds
this paragraph ("cheaper saved-tensor hooks, same behaviour"), runs interleaved, under load
from other jobs (a run's medians moved by up to 15% from the run before): none-eligible
13.9, 15.4 -> 14.4, 14.6; kept 46.6, 50.0 -> 43.2, 41.9; swapped 117.4, 134.4 -> 111.9,
110.6. Steadier, paired in one process (old LMS, new LMS and the plain model stepped in
turn, 150 rounds, thread CPU time, new minus old per round, median (q1..q3), 15:38 UTC):
none-eligible -1.0 (-3.4..1.5), kept -7.3 (-11.3..-3.2), swapped -15.0 (-22.1..-8.4).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lms  # noqa: E402
from examples.gpt import GPT, GPTConfig, synthetic_batch  # noqa: E402

# name -> lms.enable arguments (weights=False throughout: activations only)
CONFIGS = {
    "none-eligible": dict(limit="1GiB", min_size="1MiB"),
    "kept": dict(limit="1GiB", min_size=0),
    "swapped": dict(limit=0, min_size=0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", default="benchmarks/results/hook_overhead.json")
    p.add_argument("--n-layer", type=int, default=16)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--rounds", type=int, default=150, help="timed rounds (one step per variant)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds before them")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    return p.parse_args(argv)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, batch):
    loss = model(*batch)
    loss.backward()
    model.zero_grad(set_to_none=True)


def step_time(model, batch, device):
    """(wall, cpu) seconds of one step.

    cpu is this thread's CPU time: with one torch thread on the CPU, forward and
    backward run on it, and time lost to other processes is not counted.
    """
    sync(device)
    t, c = time.perf_counter(), time.thread_time()
    step(model, batch)
    sync(device)
    return time.perf_counter() - t, time.thread_time() - c


def count_saved(model, batch):
    """Saved tensors of one training step (pack calls), and the distinct storages among them."""
    ptrs = []

    def pack(t):
        ptrs.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(*batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return len(ptrs), len(set(ptrs))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    command = " ".join([os.path.basename(sys.executable), *sys.argv])
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    cfg = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "vocab", "batch", "seq")}
    print(f"command: {command}")
    print(f"device:  {card}   cpu {cpu_name()} ({os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads)")  # fmt: skip
    print(f"torch {torch.__version__}   python {platform.python_version()}   date {date}")
    print(f"model:   {cfg}   rounds {args.rounds}, warmup {args.warmup}")

    torch.manual_seed(0)
    gcfg = GPTConfig(
        vocab_size=args.vocab, seq_len=args.seq, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd,
    )  # fmt: skip
    model = GPT(gcfg).to(device).train()
    batch = synthetic_batch(gcfg, args.batch, torch.Generator().manual_seed(0), device=device)
    saved, storages = count_saved(model, batch)
    print(f"saved tensors per step: {saved} ({storages} distinct storages)\n")

    # One copy of the model per variant, LMS enabled on each, stepped in turn: every
    # round times one step of each, so a burst of load from other processes hits all
    # variants alike, and the overhead is a paired difference within the round.
    variants = ["plain", *names]
    models = {name: copy.deepcopy(model) for name in variants}
    handles = {name: lms.enable(models[name], weights=False, **CONFIGS[name]) for name in names}
    times = {name: [] for name in variants}  # per round: (wall, cpu) seconds
    for i in range(args.warmup + args.rounds):
        if i == args.warmup:
            for h in handles.values():
                h.reset_stats()
        k = i % len(variants)  # rotate the order, so no variant always follows another
        for name in variants[k:] + variants[:k]:
            t = step_time(models[name], batch, device)
            if i >= args.warmup:
                times[name].append(t)
    swaps = {name: h.stats().swap_outs / args.rounds for name, h in handles.items()}
    for h in handles.values():
        h.remove()

    def quartiles(xs):
        q = statistics.quantiles(xs, n=4)
        return q[0], statistics.median(xs), q[2]

    rows = []
    for name in variants:
        row = dict(variant=name, **CONFIGS.get(name, {}))
        for clock, label in enumerate(("wall", "cpu")):
            steps = [t[clock] * 1e6 for t in times[name]]
            row[f"{label}_step_us_q1"], row[f"{label}_step_us"], row[f"{label}_step_us_q3"] = (
                quartiles(steps)
            )
            if name != "plain":
                base = [t[clock] * 1e6 for t in times["plain"]]
                per = [(a - b) / saved for a, b in zip(steps, base)]  # paired by round
                q1, med, q3 = quartiles(per)
                row[f"{label}_us_per_saved"] = med
                row[f"{label}_us_per_saved_q1"], row[f"{label}_us_per_saved_q3"] = q1, q3
        if name != "plain":
            row["swap_outs_per_step"] = swaps[name]
        rows.append(row)

    head = (f"{'variant':<14} {'clock':<5} {'step us':>8} {'(q1..q3)':>13} "
            f"{'us/saved':>8} {'(q1..q3)':>12} {'swaps/step':>10}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        for label in ("wall", "cpu"):
            spread = f"{r[f'{label}_step_us_q1']:.0f}..{r[f'{label}_step_us_q3']:.0f}"
            line = f"{r['variant']:<14} {label:<5} {r[f'{label}_step_us']:8.0f} {spread:>13}"
            if r["variant"] != "plain":
                lo, hi = r[f"{label}_us_per_saved_q1"], r[f"{label}_us_per_saved_q3"]
                line += (f" {r[f'{label}_us_per_saved']:8.1f} {f'{lo:.1f}..{hi:.1f}':>12} "
                         f"{r['swap_outs_per_step']:10.0f}")  # fmt: skip
            print(line)
    print("(us/saved: per round, LMS step minus plain step, over the saved tensors of one "
          "step; median and quartiles over rounds. wall: elapsed; cpu: this thread's CPU "
          "time, which excludes time taken by other processes)")  # fmt: skip

    meta = dict(command=command, device=card, cpu=cpu_name(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), date=date, model=cfg, rounds=args.rounds,
                warmup=args.warmup, saved_per_step=saved,
                storages_per_step=storages)  # fmt: skip
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # step_us: per variant, per round: [wall, cpu]
    raw = {name: [[round(x * 1e6, 1) for x in t] for t in ts] for name, ts in times.items()}
    # The short table benchmarks/summarize.py prints at the end of gpu_check.sh.
    summary = [
        dict(variant=r["variant"], us_per_saved=round(r["wall_us_per_saved"], 1),
             swaps_per_step=r["swap_outs_per_step"])
        for r in rows if r["variant"] != "plain"
    ]  # fmt: skip
    out.write_text(json.dumps(dict(meta, rows=rows, summary=summary, step_us=raw), indent=1))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {out}, {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
