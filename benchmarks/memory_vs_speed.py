"""Step time against peak device memory: LMS at several limits, and the baselines it must beat.

One run measures, on the same model and the same card:
  - no offload (also gives the forward, backward and optimizer times for the floor),
  - per-block activation checkpointing,
  - ``torch.autograd.graph.save_on_cpu(pin_memory=True)``,
  - LMS (activations only, ``weights=False``) over a sweep of ``limit`` and ``min_size``,
  - pinned device-to-host and host-to-device bandwidth,
and prints beside each LMS row the floor of issue 3:

    floor = max(forward, bytes out / D2H bandwidth) + max(backward, bytes in / H2D bandwidth)
            + optimizer

``recast GB`` is the bytes of autocast's saved weight casts that LMS dropped and
cast again in backward instead of copying (NOTE [Activation swapping] Rule 10 in
lms/activations.py); they are not in ``out GB``/``in GB`` and cost no link time.

The limits are placed between the memory the step cannot avoid (weights, gradients,
optimizer state, measured after a no-offload step) and the no-offload peak, plus
``limit=0`` (swap every eligible tensor).

Usage:
    python benchmarks/memory_vs_speed.py                 # the issue's reference config (GPU)
    python benchmarks/memory_vs_speed.py --quick         # < 90 s on an H100; tiny on the CPU
    python benchmarks/memory_vs_speed.py --quick --device cpu

Writes JSON (``--out``), and CSV and PNG next to it (same stem).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import math
import os
import pathlib
import signal
import statistics
import sys
import time
import traceback

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lms  # noqa: E402
from examples.gpt import GPT, GPTConfig, synthetic_batch  # noqa: E402

# The time budget counts from here (after the imports, about 5 s): gpu_check.sh's limit also
# covers CUDA's start, the model's construction on the host and the bandwidth copies, not
# only the rows.
T_START = time.perf_counter()

GiB = 1024**3
MiB = 1024**2

# gpu_check.sh's time limit sends SIGINT. Python's own handler raises KeyboardInterrupt wherever
# the main thread is, and inside a __del__ (LMS runs many) that is printed and dropped: the run
# went on until timeout's SIGKILL and wrote nothing. The script installs _on_sigint, which only
# records the signal; the run stops at the next step or row (check_stop). A second SIGINT
# raises at once, for a person at a terminal.
_STOP = []


def _on_sigint(signum, frame):
    if _STOP:
        raise KeyboardInterrupt
    _STOP.append(signum)


def check_stop():
    if _STOP:
        raise KeyboardInterrupt


# The reference of issue 3 / ANCHORS.md: 16 layers, width 2048, 16 heads, batch 8, seq 1024.
FULL = dict(n_layer=16, n_embd=2048, n_head=16, vocab=32000, batch=8, seq=1024, steps=10, warmup=3)
QUICK_GPU = dict(
    n_layer=8, n_embd=1024, n_head=16, vocab=32000, batch=8, seq=1024, steps=5, warmup=2
)
QUICK_CPU = dict(n_layer=2, n_embd=128, n_head=4, vocab=512, batch=4, seq=64, steps=3, warmup=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, few steps and limits")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="benchmarks/results/memory_vs_speed.json")
    p.add_argument(
        "--fractions",
        default=None,
        help="limits as fractions between the unavoidable floor and the no-offload "
        "peak, comma-separated (limit=0 is always added)",
    )
    p.add_argument("--min-sizes", default=None, help="extra min_size values at the middle limit")
    for name in ("n_layer", "n_embd", "n_head", "vocab", "batch", "seq", "steps", "warmup"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; rows not started by then are skipped (default: 60 with "
        "--quick); gpu_check.sh passes one that fits its own time limit",
    )
    return p.parse_args(argv)


# -- timing helpers ------------------------------------------------------------------------


class Clock:
    """Phase times: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b):
        if self.cuda:
            return a.elapsed_time(b) / 1e3
        return b - a


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def allocated(device):
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def bandwidth(device, nbytes, reps=5):
    """Pinned copy bandwidth (bytes/s) each way; on the CPU, plain memcpy."""
    pin = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {}
    for name, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
        times = []
        for _ in range(reps + 1):
            sync(device)
            t = time.perf_counter()
            dst.copy_(src, non_blocking=pin)
            sync(device)
            times.append(time.perf_counter() - t)
        out[name] = nbytes / statistics.median(times[1:])
    del host, dev
    return out


# -- strategies ----------------------------------------------------------------------------


class Checkpointed(nn.Module):
    """One block under non-reentrant activation checkpointing."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


@contextlib.contextmanager
def per_block_checkpointing(model):
    blocks = model.blocks
    model.blocks = nn.ModuleList(Checkpointed(b) for b in blocks)
    try:
        yield
    finally:
        model.blocks = blocks


def run_steps(model, opt, batch, device, autocast, steps, warmup, forward_ctx=None):
    """Train ``warmup + steps`` steps; returns per-phase and per-step times of the timed ones."""
    x, y = batch
    clock = Clock(device)
    fwd, bwd, optim, wall = [], [], [], []
    for i in range(warmup + steps):
        check_stop()
        if i == warmup:
            reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        a = clock.mark()
        with forward_ctx() if forward_ctx else contextlib.nullcontext(), autocast():
            loss = model(x, y)
        b = clock.mark()
        loss.backward()
        c = clock.mark()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as in a real loop
        d = clock.mark()
        sync(device)
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            fwd.append(clock.seconds(a, b))
            bwd.append(clock.seconds(b, c))
            optim.append(clock.seconds(c, d))
    if not wall:
        return None  # warm-up only
    return {
        "step_s": statistics.median(wall),
        "fwd_s": statistics.median(fwd),
        "bwd_s": statistics.median(bwd),
        "opt_s": statistics.median(optim),
        "peak_device_bytes": peak(device),
        "loss": float(loss.detach()),
    }


def floor_s(base, out_bytes, in_bytes, bw):
    return (
        max(base["fwd_s"], out_bytes / bw["d2h"])
        + max(base["bwd_s"], in_bytes / bw["h2d"])
        + base["opt_s"]
    )


def fmt_bytes(n):
    return "-" if n is None else f"{n / GiB:.2f}"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = dict(FULL)
    if args.quick:
        cfg = dict(QUICK_GPU if device.type == "cuda" else QUICK_CPU)
    elif device.type != "cuda":
        cfg = dict(QUICK_CPU, steps=5, warmup=2)  # the reference config does not fit a CPU run
    for k in cfg:
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    fractions = (
        [float(f) for f in args.fractions.split(",")]
        if args.fractions
        else ([0.25, 0.5, 0.75] if args.quick else [0.125, 0.25, 0.5, 0.75])
    )
    min_sizes = (
        [lms.parse_size(s, name="min_size") for s in args.min_sizes.split(",")]
        if args.min_sizes
        else ([16 * MiB] if args.quick else [64 * 1024, 16 * MiB])
    )
    if device.type != "cuda" and not args.min_sizes:
        min_sizes = [16 * 1024]
    use_bf16 = not args.fp32 and device.type == "cuda"

    command = " ".join([os.path.basename(sys.executable), *sys.argv])
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"command: {command}")
    print(f"device:  {card}   torch {torch.__version__}   date {date}")
    print(f"model:   {cfg}   bf16 autocast: {use_bf16}")

    torch.manual_seed(0)
    gcfg = GPTConfig(
        vocab_size=cfg["vocab"], seq_len=cfg["seq"], n_layer=cfg["n_layer"],
        n_head=cfg["n_head"], n_embd=cfg["n_embd"],
    )  # fmt: skip
    # Built on the device: the host initializes weights one core at a time (about 15 ns a
    # parameter: some 15 s of the time budget for the 0.94B reference model).
    with torch.device(device):
        model = GPT(gcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = synthetic_batch(gcfg, cfg["batch"], torch.Generator().manual_seed(0), device=device)

    def autocast():
        if use_bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    steps, warmup = cfg["steps"], cfg["warmup"]
    bw_bytes = (256 * MiB if args.quick else GiB) if device.type == "cuda" else 64 * MiB
    bw = bandwidth(device, bw_bytes)
    print(f"pinned copies ({bw_bytes / MiB:.0f} MiB): D2H {bw['d2h'] / 1e9:.1f} GB/s, "
          f"H2D {bw['h2d'] / 1e9:.1f} GB/s")  # fmt: skip

    rows = []
    budget_s = args.time_budget if args.time_budget is not None else (60 if args.quick else None)

    def guarded(row, measure):
        """Append ``row`` with ``measure()``'s results; a failure or the time budget is
        recorded in the row instead of ending the run (the other rows still count)."""
        check_stop()
        if budget_s is not None and time.perf_counter() - T_START > budget_s:
            rows.append(dict(row, skipped=f"time budget {budget_s:.0f} s spent"))
            return
        try:
            # What the row starts with: weights, gradients and optimizer state, or more if an
            # earlier row left tensors behind (that would inflate this row's peak). Inside the
            # try: after a sticky CUDA error the synchronize raises, and that is this row's.
            sync(device)
            row = dict(row, allocated_before_bytes=allocated(device))
            rows.append(dict(row, **measure()))
        except Exception as e:  # OOM, LMSError, or a bug in a path only CUDA runs
            # The whole traceback goes to the log: on a one-off GPU run it is the only clue.
            traceback.print_exc()
            rows.append(dict(row, error=f"{type(e).__name__}: {str(e)[:300]}"))
        else:
            after_row()
            return
        after_row()
        # Outside the except block, so the traceback's frames (and the activations they
        # hold) are gone before the next row, whose peak they would otherwise inflate.
        gc.collect()
        if device.type == "cuda":
            with contextlib.suppress(RuntimeError):  # a sticky CUDA error raises here too
                torch.cuda.empty_cache()

    meta = dict(command=command, device=card, date=date, torch=torch.__version__, model=cfg,
                bf16=use_bf16, bandwidth_Bps=bw)  # fmt: skip

    def after_row():
        """Print the row and write what is measured so far (no plot: that is at the end), so
        that a run killed at its time limit keeps its finished rows."""
        r = rows[-1]
        what = (
            r.get("error")
            or r.get("skipped")
            or (f"step {r['step_s']:.3f} s, peak {fmt_bytes(r['peak_device_bytes'])} GiB")
        )
        where = (
            f" limit {r['limit'] / MiB:.1f} MiB min_size {r['min_size']}" if "limit" in r else ""
        )
        print(
            f"[{time.perf_counter() - T_START:5.0f} s] {r['strategy']}{where}: {what}", flush=True
        )
        write(args, rows, dict(meta, note="partial: rows so far"), plot=False)  # fmt: skip

    try:
        measure_all(model, opt, batch, device, autocast, steps, warmup, rows, guarded,
                    after_row, fractions, min_sizes, bw, meta)  # fmt: skip
    except KeyboardInterrupt:
        # gpu_check.sh's time limit sends SIGINT: keep the rows measured so far.
        write(args, rows, dict(meta, note="interrupted (time limit)"))
        print(f"interrupted: wrote the {len(rows)} finished rows", flush=True)
        raise SystemExit(130) from None
    except Exception as e:
        # Outside any row (the no-offload baseline, or the sweep's setup): the rows measured
        # so far are still worth the GPU time they took.
        write(args, rows, dict(meta, note=f"failed: {type(e).__name__}: {str(e)[:300]}"))
        print(f"failed: wrote the {len(rows)} finished rows", flush=True)
        raise
    report(rows, device, bw, rows[0], meta["unavoidable_bytes"])
    write(args, rows, meta)


def measure_all(model, opt, batch, device, autocast, steps, warmup, rows, guarded, after_row,
                fractions, min_sizes, bw, meta):  # fmt: skip
    """The baselines, then the LMS sweep; appends to ``rows`` as it goes."""
    # -- no offload: the baseline and the phase times for the floor --
    base = run_steps(model, opt, batch, device, autocast, steps, warmup)
    sync(device)
    unavoidable = allocated(device)  # weights, gradients, optimizer state
    meta["unavoidable_bytes"] = unavoidable
    rows.append(dict(strategy="no offload", **base))
    after_row()

    def checkpointed():
        with per_block_checkpointing(model):
            return run_steps(model, opt, batch, device, autocast, steps, warmup)

    guarded(dict(strategy="checkpoint"), checkpointed)

    def on_cpu():
        return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")

    guarded(dict(strategy="save_on_cpu"), lambda: run_steps(
        model, opt, batch, device, autocast, steps, warmup, forward_ctx=on_cpu))  # fmt: skip

    # -- LMS sweep --
    if device.type == "cuda":
        span = base["peak_device_bytes"] - unavoidable
        limits = [0] + [int(unavoidable + f * span) for f in fractions]
    else:
        # No allocator on the CPU: the limit applies to LMS's own accounting of saved
        # activations, so sweep it over the bytes one step saves.
        span = saved_bytes(model, batch, autocast)
        limits = [0] + [int(f * span) for f in fractions]
    # The default min_size (1 MiB) on the GPU; the CPU's tiny model has no tensor that big.
    base_min = lms.LMSConfig().min_size if device.type == "cuda" else 0
    sweep = [(lim, base_min, "limit") for lim in limits]
    sweep += [(limits[len(limits) // 2], m, "min_size") for m in min_sizes]

    def with_lms(limit, min_size):
        with lms.enable(model, limit=limit, min_size=min_size, weights=False) as handle:
            # The first steps fill the host pool; reset so the timed steps show steady state.
            run_steps(model, opt, batch, device, autocast, 0, warmup)
            handle.reset_stats()
            r = run_steps(model, opt, batch, device, autocast, steps, 0)
            s = handle.stats()
        out_b, in_b = s.swapped_out_bytes / steps, s.swapped_in_bytes / steps
        fl = floor_s(base, out_b, in_b, bw)
        return dict(
            r, out_bytes_per_step=out_b, in_bytes_per_step=in_b,
            recast_bytes_per_step=s.recast_bytes / steps,
            stall_s_per_step=s.stall_s / steps, pinned_allocs_steady=s.pinned_allocs,
            host_bytes=s.host_bytes, peak_resident_bytes=s.peak_resident_bytes,
            largest_swappable=s.largest_saved_bytes, floor_s=fl, vs_floor=r["step_s"] / fl,
        )  # fmt: skip

    for limit, min_size, kind in sweep:
        row = dict(strategy="lms", sweep=kind, limit=limit, min_size=min_size)
        guarded(row, lambda limit=limit, min_size=min_size: with_lms(limit, min_size))


def saved_bytes(model, batch, autocast):
    """Bytes of distinct storages one training forward saves (CPU sweep range)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = model(*batch)
    del loss
    return sum(seen.values())


def verdicts(row, rows):
    """The issue's targets for one LMS row, as short strings (honest: MISS when missed)."""
    if "step_s" not in row:
        return row.get("error") or row.get("skipped") or ""
    if row["strategy"] != "lms":
        return ""
    out = [f"{'ok' if row['vs_floor'] <= 1.2 else 'MISS'} floor x{row['vs_floor']:.2f}"]
    if row["peak_device_bytes"] is not None and row["limit"] > 0:
        ok = row["peak_device_bytes"] <= row["limit"] + row["largest_swappable"]
        out.append(f"{'ok' if ok else 'MISS'} peak<=limit+largest")
    soc = next((r for r in rows if r["strategy"] == "save_on_cpu"), {})
    if row["limit"] == 0 and "step_s" in soc:
        ratio = row["step_s"] / soc["step_s"]
        out.append(f"{'ok' if ratio <= 0.7 else 'MISS'} x{ratio:.2f} save_on_cpu time")
        if row["peak_device_bytes"] is not None:
            ok = row["peak_device_bytes"] <= soc["peak_device_bytes"]
            out.append(f"{'ok' if ok else 'MISS'} peak<=save_on_cpu")
    out.append("ok steady pool" if row["pinned_allocs_steady"] == 0 else "MISS pool allocs")
    return ", ".join(out)


def report(rows, device, bw, base, unavoidable):
    print(f"\nno-offload phases: forward {base['fwd_s'] * 1e3:.1f} ms, backward "
          f"{base['bwd_s'] * 1e3:.1f} ms, optimizer {base['opt_s'] * 1e3:.1f} ms; weights+grads+"
          f"optimizer state {fmt_bytes(unavoidable)} GiB")  # fmt: skip
    head = (f"{'strategy':<12} {'limit MiB':>9} {'min_size':>9} {'step s':>8} {'peak GiB':>8} "
            f"{'out GB':>7} {'in GB':>7} {'recast GB':>9} {'stall ms':>8} {'floor s':>8}"
            "  targets")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        lms_row = r["strategy"] == "lms"
        limit_cell = f"{r['limit'] / MiB:.1f}" if lms_row else "-"
        if "step_s" not in r:  # failed or skipped: say so, in place
            print(
                f"{r['strategy']:<12} {limit_cell:>9} {'':>9} {'-':>8} {'-':>8}  "
                + verdicts(r, rows)
            )
            continue
        print(
            f"{r['strategy']:<12} "
            f"{limit_cell:>9} "
            f"{(str(r['min_size'] // 1024) + 'K' if lms_row else '-'):>9} "
            f"{r['step_s']:8.3f} {fmt_bytes(r['peak_device_bytes']):>8} "
            f"{(r['out_bytes_per_step'] / 1e9 if lms_row else 0):7.2f} "
            f"{(r['in_bytes_per_step'] / 1e9 if lms_row else 0):7.2f} "
            f"{(r['recast_bytes_per_step'] / 1e9 if lms_row else 0):9.2f} "
            f"{(r['stall_s_per_step'] * 1e3 if lms_row else 0):8.1f} "
            f"{(r['floor_s'] if lms_row else math.nan):8.3f}  {verdicts(r, rows)}"
        )
    for r in rows:
        extra = (r.get("allocated_before_bytes") or 0) - (unavoidable or 0)
        if unavoidable is not None and extra > 64 * MiB:
            print(f"WARNING: {r['strategy']} {r.get('limit', '')} started with "
                  f"{extra / GiB:.2f} GiB more allocated than weights+grads+optimizer state "
                  "(left by an earlier row): its peak is inflated by that much")  # fmt: skip
    if device.type != "cuda":
        print("(CPU run: no allocator peak; LMS limits apply to its own accounting; the "
              "timings only check that the script runs)")  # fmt: skip


def write(args, rows, meta, plot=True):
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = [
        {
            "strategy": r["strategy"],
            "limit_GiB": round(r["limit"] / GiB, 3) if "limit" in r else None,
            "min_size_KiB": r["min_size"] // 1024 if "min_size" in r else None,
            "step_s": round(r["step_s"], 4) if "step_s" in r else None,
            "peak_GiB": None if r.get("peak_device_bytes") is None
            else round(r["peak_device_bytes"] / GiB, 2),
            "floor_s": round(r["floor_s"], 4) if "floor_s" in r else None,
            "targets": verdicts(r, rows),
        }
        for r in rows
    ]  # fmt: skip
    out.write_text(json.dumps(dict(meta, rows=rows, summary=summary), indent=1))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    if not plot:
        return
    png = out.with_suffix(".png") if rows else None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot written (pip install matplotlib)")
        png = None
    if png is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, marker in (("lms", "o-"), ("no offload", "s"), ("checkpoint", "^"),
                             ("save_on_cpu", "D")):  # fmt: skip
            pts = [r for r in rows if r["strategy"] == name and "step_s" in r
                   and r.get("sweep", "limit") == "limit"]  # fmt: skip
            xs = [(r["peak_device_bytes"] if r["peak_device_bytes"] is not None
                   else r.get("peak_resident_bytes", 0)) / GiB for r in pts]  # fmt: skip
            ys = [r["step_s"] for r in pts]
            order = sorted(range(len(xs)), key=xs.__getitem__)
            ax.plot([xs[i] for i in order], [ys[i] for i in order], marker, label=name)
        xlabel = "peak device memory (GiB)" if rows[0]["peak_device_bytes"] is not None else (
            "LMS peak resident (GiB, CPU run)")  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.set_ylabel("step time (s)")
        ax.set_title(f"{meta['device']}  {meta['date'][:10]}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
    print(f"\nwrote {out}, {out.with_suffix('.csv')}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _on_sigint)
    main()
