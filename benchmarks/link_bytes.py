"""Bytes one training step sends over the host link at ``limit=0``, per transformer block.

At ``limit=0`` LMS moves every saved tensor of at least ``min_size`` out in forward
and back in backward, except autocast's bf16 weight casts, which it drops and casts
again (NOTE [Activation swapping] Rule 10 in lms/activations.py). This counts, for a
GPT under bf16 autocast, what each transformer block sends each way and what its
re-cast saves, from LMS's own counters: the difference between a model with
``--layers`` blocks and one with one block less, so the embedding and the head drop
out. Bytes, not time: the counts are the same on any device, so the CPU gives them.

A block's weight casts grow with width^2 and its activations with width x batch x
sequence, so a narrow model with the same width / (batch x sequence) has the same
split as a wide one. The defaults are issue 3's reference model (width 2048, batch 8,
sequence 1024) scaled down that way: width 256, batch 1, sequence 1024, head size 128.

Usage:
    python benchmarks/link_bytes.py
    python benchmarks/link_bytes.py --n-embd 2048 --n-head 16 --batch 8   # real shape, slow on CPU

Writes JSON (``--out``), with a ``summary`` row for benchmarks/summarize.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lms  # noqa: E402
from examples.gpt import GPT, GPTConfig, synthetic_batch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2, help="blocks (compared with one fewer)")
    p.add_argument("--min-size", default="0", help="lms min_size (0: every saved tensor)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/link_bytes.json")
    return p.parse_args(argv)


def one_step(args, n_layer: int) -> lms.Stats:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=args.vocab,
        seq_len=args.seq,
        n_layer=n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    model = GPT(cfg).to(device)
    x, y = synthetic_batch(cfg, args.batch, torch.Generator().manual_seed(1), device=device)
    with lms.enable(model, limit=0, min_size=args.min_size, weights=False) as handle:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
    return handle.stats()


def main(argv=None):
    args = parse_args(argv)
    if args.layers < 2:
        raise SystemExit("--layers must be at least 2 (the block is the difference with one fewer)")
    print("command: python " + " ".join(sys.argv))
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    print(f"device:  {args.device} ({card or platform.machine()}), torch {torch.__version__}")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"date:    {stamp}")
    fewer, more = one_step(args, args.layers - 1), one_step(args, args.layers)
    block = {
        "out_bytes": more.swapped_out_bytes - fewer.swapped_out_bytes,
        "in_bytes": more.swapped_in_bytes - fewer.swapped_in_bytes,
        "recast_bytes": more.recast_bytes - fewer.recast_bytes,
    }
    without = block["out_bytes"] + block["recast_bytes"]  # what a copy of the casts would add
    share = block["recast_bytes"] / without if without else 0.0
    print(
        f"per block, each way: {block['out_bytes'] / 2**20:.2f} MiB copied, "
        f"{block['recast_bytes'] / 2**20:.2f} MiB of weight casts re-cast instead "
        f"({share:.1%} of what copying them too would send)"
    )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(command=sys.argv, device=args.device, card=card, torch=torch.__version__)
    summary = dict(
        copied_MiB=block["out_bytes"] / 2**20,
        recast_MiB=block["recast_bytes"] / 2**20,
        recast_share=share,
    )
    result = dict(meta, date=stamp, args=vars(args), block=block, summary=summary)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
