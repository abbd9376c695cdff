"""Model size under a device-memory cap: the largest GPT without LMS, then 2x and 4x with LMS.

Issue 4's benchmark. The process's device memory is capped with
``torch.cuda.set_per_process_memory_fraction`` (so the search is quick and every run
faces the same card). Then:
  1. find the largest GPT-style model (width and depth grow together: ``n_embd =
     width_per_layer x n_layer``, head size 128) that trains with AdamW under the cap
     without LMS, at ``batch x seq`` tokens per micro-batch and ``accum`` micro-batches
     per optimizer step;
  2. train models with about 2x and 4x as many parameters with ``lms.enable(...,
     weights="auto")`` under the same cap and the same tokens per optimizer step. They are
     built on the host (they do not fit on the device) and use ``--lms-accum``
     micro-batches per step (default: half the baseline's, so each micro-batch is twice
     as large: the paged weights cross the link once per micro-batch, and LMS swaps
     the activations that do not fit). Model search, limit (``--limit-frac`` of the
     cap) and micro-batching are the knobs to tune on the GPU; the run prints the
     optimizer's share of the step and the prefetched / on-demand fills.
It reports TFLOPS (6 x parameters x tokens / step time), peak device memory and host
memory for each. Target (issue 4, H100, cap 24 GiB): 4x the parameters at >= 50% of
the TFLOPS of the largest model that fits without LMS.

Every run uses bf16 autocast and ``torch.optim.AdamW(fused=True)`` (on the host for paged
parameters: NOTE [Host optimizer step] in lms/weights_optim.py).

Usage:
    python benchmarks/model_size.py                  # cap 24 GiB (the issue's target, GPU)
    python benchmarks/model_size.py --quick          # < 80 s on an H100; tiny on the CPU
    python benchmarks/model_size.py --quick --device cpu

On the CPU there is no cap to set and no out-of-memory to search with, so the
baseline is ``--n-layer`` (default 4) and LMS runs with ``limit`` set to the
baseline's parameter-state bytes: this checks the code paths, not the speed.

Writes JSON to ``--out`` (with a ``summary`` list for benchmarks/summarize.py) and CSV
next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import os
import pathlib
import sys
import time
import traceback

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lms  # noqa: E402
from examples.gpt import GPT, GPTConfig, synthetic_batch  # noqa: E402

GiB = 1024**3

# min_size: parameters below it stay resident (biases, norms); 1 MiB on the GPU.
FULL = dict(
    cap_gib=24.0,
    batch=4,
    seq=1024,
    accum=8,
    vocab=32000,
    wpl=128,
    steps=3,
    warmup=1,
    min_size="1MiB",
    n_layer=None,
)
# Sized for about 45 s on an H100 by estimate, inside gpu_check.sh's 80 s: the search tries
# 2, 4, 8 and 9 layers (deeper ones' parameter state alone exceeds the cap), and the 4x model
# (0.45B or 0.56B parameters) is built and stepped on the host, about 15 ns a parameter to build.
QUICK_GPU = dict(
    cap_gib=3.0,
    batch=4,
    seq=512,
    accum=2,
    vocab=8192,
    wpl=128,
    steps=2,
    warmup=1,
    min_size="1MiB",
    n_layer=None,
)
QUICK_CPU = dict(
    cap_gib=0.0,
    batch=2,
    seq=32,
    accum=2,
    vocab=256,
    wpl=16,
    steps=2,
    warmup=1,
    min_size="4KiB",
    n_layer=4,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small cap and model, few steps")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="benchmarks/results/model_size.json")
    p.add_argument("--cap-gib", type=float, default=None, help="device memory cap (GiB)")
    p.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (baseline)")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--accum", type=int, default=None, help="micro-batches per step (baseline)")
    p.add_argument(
        "--lms-accum",
        type=int,
        default=None,
        help="micro-batches per step with LMS (default: half the baseline's: fewer, larger "
        "micro-batches cross the link with the weights fewer times)",
    )
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--wpl", type=int, default=None, help="model width per layer")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--n-layer", type=int, default=None, help="skip the search: baseline depth")
    p.add_argument("--factors", default="2,4", help="parameter multiples to run with LMS")
    p.add_argument("--limit-frac", type=float, default=0.85, help="LMS limit as cap fraction")
    p.add_argument("--min-size", default=None)
    p.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "true"],
        help="auto: keep as much parameter state resident as half the limit holds "
        "(NOTE [Weight paging plan] Rule 1); true: page every parameter >= min_size",
    )
    p.add_argument(
        "--host-limit",
        type=float,
        default=0.8,
        help="LMS host_limit as a fraction of RAM (masters, gradients, swapped activations)",
    )
    return p.parse_args(argv)


# -- models ---------------------------------------------------------------------------------


def config(n_layer, a):
    d = a["wpl"] * n_layer
    return GPTConfig(
        vocab_size=a["vocab"],
        seq_len=a["seq"],
        n_layer=n_layer,
        n_head=max(1, d // 128) if d % 128 == 0 else max(1, d // 64),
        n_embd=d,
    )


def depth_for(params, a):
    """The depth whose model has the parameter count closest to ``params``."""
    best, err = 1, float("inf")
    for n in range(1, 200):
        e = abs(config(n, a).num_params() - params)
        if e < err:
            best, err = n, e
        elif config(n, a).num_params() > params:
            break
    return best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        # After a sticky CUDA error this raises too; the error that caused it is the one
        # to report, and the row it belongs to must still be written.
        with contextlib.suppress(RuntimeError):
            torch.cuda.empty_cache()


def host_rss():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(model, device, a, micro_batch, accum, steps, warmup, on_timed=None):
    """Step times (s) of ``steps`` timed optimizer steps after ``warmup`` ones.

    The device's peak is reset, and ``on_timed()`` called, when the timed steps begin, so
    that peaks and counters describe the steady state, not the first step's fills."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    data = [synthetic_batch(cfg, micro_batch, g, device) for _ in range(accum)]
    times, opt_times = [], []
    for i in range(warmup + steps):
        sync(device)
        if i == warmup:
            reset_peak(device)
            if on_timed is not None:
                on_timed()
        t0 = time.perf_counter()
        for x, y in data:
            with autocast(device):
                loss = model(x, y)
            (loss / accum).backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            opt_times.append(time.perf_counter() - t1)
        if not torch.isfinite(loss):
            raise RuntimeError("loss is not finite")
    del opt
    return times, opt_times


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def allocated(device):
    """Device bytes allocated now: ~0 between runs, or a previous run left tensors behind
    that shrink this run's room under the cap and inflate its peak."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def is_oom(e):
    # cuBLAS and cuDNN report a failed workspace allocation in their own words.
    text = str(e).lower()
    return isinstance(e, torch.cuda.OutOfMemoryError) or any(
        s in text for s in ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc")
    )


def try_baseline(n_layer, device, a, steps, warmup):
    """Train without LMS; the row, or None on out-of-memory."""
    model = None
    before = allocated(device)
    try:
        torch.manual_seed(0)
        # Built on the device: the host initializes weights one core at a time (about 15 ns
        # a parameter), seconds per try for the search's larger models.
        with torch.device(device):
            model = GPT(config(n_layer, a))
        reset_peak(device)
        times = train(model, device, a, a["batch"], a["accum"], steps, warmup)
    except RuntimeError as e:
        if not is_oom(e):
            raise
        return None
    finally:
        del model
        free(device)
    r = row("no LMS", n_layer, a, times, peak(device), host_rss(), None)
    r["allocated_before_gib"] = None if before is None else before / GiB
    return r


def row(kind, n_layer, a, times, peak_bytes, rss, stats):
    times, opt_times = times
    cfg = config(n_layer, a)
    params = cfg.num_params()
    tokens = a["batch"] * a["seq"] * a["accum"]
    step = sum(times) / len(times)
    return dict(
        kind=kind,
        n_layer=n_layer,
        n_embd=cfg.n_embd,
        params=params,
        tokens_per_step=tokens,
        step_s=step,
        optimizer_s=sum(opt_times) / len(opt_times),
        tflops=6 * params * tokens / step / 1e12,
        peak_device_gib=None if peak_bytes is None else peak_bytes / GiB,
        host_rss_gib=rss / GiB,
        lms_host_pool_gib=None if stats is None else stats.host_bytes / GiB,
        # Per timed step: the counters are reset when the timed steps begin (train()).
        swapped_in_gib=None if stats is None else stats.swapped_in_bytes / GiB / len(times),
        swapped_out_gib=None if stats is None else stats.swapped_out_bytes / GiB / len(times),
        stall_s=None if stats is None else stats.stall_s / len(times),
    )


def search(device, a, steps, warmup):
    """The deepest baseline that trains under the cap: doubling, then bisection.

    A depth whose fp32 parameter state alone (parameter, gradient, two AdamW moments:
    16 bytes per parameter) exceeds the cap cannot fit, so it counts as out of memory
    without being built: building it on the host is the slowest part of a try.
    """
    lo, hi, best = 0, None, None
    cap = a["cap_gib"] * GiB

    def attempt(n):
        if device.type == "cuda" and 16 * config(n, a).num_params() > cap:
            print(f"  search n_layer={n}: out of memory (parameter state > cap)", flush=True)
            return None
        r = try_baseline(n, device, a, 1, 1)
        print(f"  search n_layer={n}: {'fits' if r else 'out of memory'}", flush=True)
        return r

    n = 2
    while hi is None:
        r = attempt(n)
        if r:
            lo, best = n, r
            n *= 2
        else:
            hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        r = attempt(mid)
        if r:
            lo, best = mid, r
        else:
            hi = mid
    if best is None:
        raise SystemExit("not even a 1-layer model fits under the cap; raise --cap-gib")
    return lo


def run_lms(n_layer, device, a, limit, min_size, accum, steps, warmup, host_limit, weights):
    before = allocated(device)
    torch.manual_seed(0)
    model = GPT(config(n_layer, a))  # on the host: it does not fit on the device
    micro = a["batch"] * a["accum"] // accum
    handle = lms.enable(
        model,
        limit=limit,
        min_size=min_size,
        weights=weights,
        device=device,
        host_limit=host_limit,
    )
    fills_before = {}  # the weights' fill counters run from enable: subtract the warm-up's

    def on_timed():
        handle.reset_stats()
        if handle.weights is not None:
            fills_before.update(prefetched=handle.weights.prefetched,
                                on_demand=handle.weights.on_demand)  # fmt: skip

    try:
        times = train(model, device, a, micro, accum, steps, warmup, on_timed)
        stats = handle.stats()
        r = row("LMS", n_layer, a, times, peak(device), host_rss(), stats)
        w = handle.weights
        r["paged_params"] = len(w.paged_names) if w else 0
        r["paged_gib"] = w.plan.paged_bytes / GiB if w else 0.0
        # Per timed step, like the swap counters.
        n = len(times[0])
        r["prefetched"] = (w.prefetched - fills_before.get("prefetched", 0)) / n if w else 0
        r["on_demand"] = (w.on_demand - fills_before.get("on_demand", 0)) / n if w else 0
        r["pinned_allocs_steady"] = stats.pinned_allocs
        r["allocated_before_gib"] = None if before is None else before / GiB
        r["lms_accum"] = accum
        r["limit_gib"] = limit / GiB
    finally:
        # Parameters of a model larger than the device cannot come back to it.
        if handle.weights is not None:
            handle.weights.remove(to_device=False)
        handle.remove()
        del model
        free(device)
    return r


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    a = dict(QUICK_GPU if device.type == "cuda" else QUICK_CPU) if args.quick else dict(FULL)
    if device.type == "cpu":
        a = dict(QUICK_CPU)  # no cap to search under on the CPU
    for k in ("cap_gib", "batch", "seq", "accum", "vocab", "wpl", "steps", "warmup", "min_size"):
        v = getattr(args, k)
        if v is not None:
            a[k] = v
    if args.n_layer is not None:
        a["n_layer"] = args.n_layer
    lms_accum = args.lms_accum or max(1, a["accum"] // 2)
    weights = True if args.weights == "true" else "auto"
    steps, warmup = a["steps"], a["warmup"]
    command = " ".join([os.path.basename(sys.executable), *sys.argv])
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"command: {command}\ndevice: {card}\ndate: {date}\ntorch: {torch.__version__}")
    print(f"settings: {a}, lms_accum={lms_accum}", flush=True)
    if a["batch"] * a["accum"] % lms_accum:
        raise SystemExit("--lms-accum must divide batch x accum")

    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        cap = int(a["cap_gib"] * GiB)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    rows = []
    meta = dict(command=command, device=card, date=date, torch=torch.__version__, settings=a)
    out = pathlib.Path(args.out)
    try:
        base_layers = a["n_layer"]
        searched = base_layers is None
        if searched:
            base_layers = search(device, a, steps, warmup)
        base = try_baseline(base_layers, device, a, steps, warmup)
        # A depth that fit the search's short try can still fail the longer run at the edge of
        # the cap; one layer less keeps the run (and the GPU time it took) from ending here.
        while base is None and searched and base_layers > 1:
            print(f"n_layer={base_layers} ran out of memory in the timed run; trying one less")
            base_layers -= 1
            base = try_baseline(base_layers, device, a, steps, warmup)
        if base is None:
            raise SystemExit(f"n_layer={base_layers} does not fit under the cap")
        rows.append(base)
        write(out, meta, rows)
        print(f"largest without LMS: {base}", flush=True)
        if device.type == "cuda":
            limit = int(args.limit_frac * a["cap_gib"] * GiB)
        else:
            limit = 4 * base["params"] * 4  # the baseline's parameter state: a stand-in cap
        for f in (float(x) for x in args.factors.split(",")):
            n = depth_for(f * base["params"], a)
            try:
                r = run_lms(
                    n, device, a, limit, a["min_size"], lms_accum, steps, warmup,
                    args.host_limit, weights,
                )  # fmt: skip
            except Exception as e:
                # One failed size (an OOM, a host limit, a bug in a path only CUDA runs) must
                # not lose the other rows; the traceback in the log is the clue to fix it.
                traceback.print_exc()
                r = dict(kind="LMS", n_layer=n, params=config(n, a).num_params(),
                         error=f"{type(e).__name__}: {str(e)[:300]}")  # fmt: skip
            else:
                r["tflops_vs_base"] = r["tflops"] / base["tflops"]
            # After the except block: the traceback's frames hold device tensors until then.
            free(device)
            r["factor"] = r["params"] / base["params"]
            rows.append(r)
            write(out, meta, rows)
            print(f"LMS {f:g}x: {r}", flush=True)
    except KeyboardInterrupt:
        # gpu_check.sh's time limit sends SIGINT: keep what was measured so far.
        write(out, meta, rows, note="interrupted (time limit)")
        print(f"interrupted: wrote the {len(rows)} finished rows to {out}", flush=True)
        raise SystemExit(130) from None

    summary = write(out, meta, rows)
    print("\nrun     params(M)  x     step(s)  opt(s)  TFLOPS  vs base  peak(GiB)  host(GiB)")
    for s in summary:
        if "error" in s:
            print(f"{s['run']:<7} {s['params_M']:>9} {s['x']:>5}  {s['error']}")
            continue
        print(
            f"{s['run']:<7} {s['params_M']:>9} {s['x']:>5} {s['step_s']:>8} {s['opt_s']:>7} "
            f"{s['tflops']:>7} {s['vs_base']:>8} {s['peak_gib']!s:>10} {s['host_gib']:>9}"
        )
    four = [r for r in rows[1:] if r["factor"] >= 3.5]
    if four and device.type == "cuda":
        ok = "tflops_vs_base" in four[-1] and four[-1]["tflops_vs_base"] >= 0.5
        print(f"target (4x params at >= 50% of base TFLOPS): {'met' if ok else 'missed'}")
    print(f"wrote {out} and {out.with_suffix('.csv')}")


def write(out, meta, rows, note=None):
    """Write the JSON (with a ``summary`` for benchmarks/summarize.py) and the CSV; returns
    the summary. Called after every row, so a run stopped by a time limit keeps its rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    base = rows[0] if rows else None
    summary = []
    for r in rows:
        s = dict(run=r["kind"], params_M=round(r["params"] / 1e6, 1),
                 x=round(r["params"] / base["params"], 2))  # fmt: skip
        if "error" in r:
            s["error"] = r["error"][:120]
        else:
            s.update(
                step_s=round(r["step_s"], 3),
                opt_s=round(r["optimizer_s"], 3),
                tflops=round(r["tflops"], 2),
                vs_base=round(r["tflops"] / base["tflops"], 3),
                peak_gib=None if r["peak_device_gib"] is None else round(r["peak_device_gib"], 2),
                host_gib=round(r["host_rss_gib"], 2),
            )
        summary.append(s)
    extra = {} if note is None else dict(note=note)
    out.write_text(json.dumps(dict(meta, **extra, rows=rows, summary=summary), indent=1))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return summary


if __name__ == "__main__":
    main()
