"""LMS on a model we did not write: a Hugging Face GPT-2 built from its config, random weights.

    pip install transformers
    python examples/hf_transformers.py --limit 4MiB --min-size 64KiB

Nothing is downloaded: the model is built from a ``GPT2Config`` and trained on synthetic tokens.
The script trains the same model twice from the same initial weights, without LMS and with it,
and checks that the losses agree bit for bit before printing LMS's memory report. Without
``transformers`` installed it says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from collections.abc import Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lms  # noqa: E402


def train(model: torch.nn.Module, batches: list[torch.Tensor], lr: float) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--limit", default="4MiB")
    p.add_argument("--min-size", default="64KiB")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    # Zero steps would "agree" on two empty loss lists; zero-sized batches fail inside
    # transformers' reshapes. Refuse them, and sizes LMS cannot parse, before building.
    for flag in ("steps", "batch", "seq_len"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag, field in (("--limit", "limit"), ("--min-size", "min_size")):
        try:
            lms.LMSConfig(**{field: getattr(args, field)})
        except lms.LMSError as e:
            p.error(f"{flag}: {e}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch sees no CUDA device; pass --device cpu")
    return args


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels for the comparison, and the caller's setting back afterwards.

    ``main`` is also called from tests: left on, the global switch would make every later
    test in the process fill every torch.empty with NaN and refuse nondeterministic kernels.
    """
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # Embedding backward uses atomics on CUDA; cuBLAS needs this to be deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("transformers is not installed; `pip install transformers` to run this example")
        return None

    with deterministic():
        return compare(args, GPT2Config, GPT2LMHeadModel)


def compare(args: argparse.Namespace, config_cls: type, model_cls: type) -> dict:
    """Train a GPT-2 without and with LMS from the same weights; exit if the losses differ."""
    torch.manual_seed(0)
    cfg = config_cls(
        n_layer=4,
        n_embd=128,
        n_head=4,
        vocab_size=1000,
        n_positions=args.seq_len,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    reference = model_cls(cfg).to(args.device)
    paged = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(cfg.vocab_size, (args.batch, args.seq_len), generator=gen).to(args.device)
        for _ in range(args.steps)
    ]

    expected = train(reference, batches, lr=1e-3)
    try:
        handle = lms.enable(paged, limit=args.limit, min_size=args.min_size)
    except lms.LMSError as e:  # a limit the device cannot give
        raise SystemExit(f"error: {e}") from e
    with handle:
        got = train(paged, batches, lr=1e-3)
        stats = handle.stats()
    print(f"losses without LMS: {[round(x, 5) for x in expected]}")
    print(f"losses with LMS:    {[round(x, 5) for x in got]}")
    if got != expected:
        raise SystemExit("error: LMS changed the losses; please report this as a bug")
    print(
        f"identical losses; LMS moved {stats.swapped_out_bytes / 2**20:.1f} MiB to host in "
        f"{stats.swap_outs} copies and back in {stats.swap_ins}, stall {stats.stall_s:.4f} s"
    )
    return {"losses": got, "stats": stats}


if __name__ == "__main__":
    main()
