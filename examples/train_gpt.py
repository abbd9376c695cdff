"""Train a GPT-style model with LMS under a memory limit, on one device or many ranks.

One process, GPU if present, else CPU:

    python examples/train_gpt.py --limit 2GiB --min-size 1MiB

Several processes or nodes (ddl reduces the gradients whenever the world size is above 1):

    torchrun --nproc-per-node 4 examples/train_gpt.py --limit 0.5 --algorithm auto

Each rank trains on its own synthetic batches; the run ends with a memory report (limit, peak
device memory, host memory, bytes swapped each way, stall time). ``--plot`` also writes a PNG
of device and host bytes over one training step, sampled at module boundaries.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ddl  # noqa: E402
import lms  # noqa: E402
from ddl.config import parse_size as ddl_parse_size  # noqa: E402
from examples.gpt import GPT, GPTConfig, synthetic_batch  # noqa: E402
from examples.memory_timeline import MemoryTimeline  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    model = p.add_argument_group("model and data")
    model.add_argument("--n-layer", type=int, default=4)
    model.add_argument("--n-embd", type=int, default=128)
    model.add_argument("--n-head", type=int, default=4)
    model.add_argument("--vocab-size", type=int, default=512)
    model.add_argument("--seq-len", type=int, default=128)
    model.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    model.add_argument(
        "--steps", type=int, default=30, help="steps to run (after --resume: more steps)"
    )
    model.add_argument("--lr", type=float, default=3e-3)
    model.add_argument(
        "--optimizer",
        default="adamw",
        choices=["adamw", "sgd"],
        help="AdamW, or SGD with momentum 0.9",
    )
    model.add_argument("--seed", type=int, default=0)
    mem = p.add_argument_group("lms")
    mem.add_argument(
        "--limit",
        default="8MiB",
        help='device memory budget: bytes, "2GiB", or a fraction of the device (0.8)',
    )
    mem.add_argument("--min-size", default="64KiB", help="tensors smaller than this never move")
    mem.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "true", "false"],
        help="page weights, gradients and optimizer state through host memory",
    )
    mem.add_argument("--no-lms", action="store_true", help="train without LMS, for comparison")
    dist = p.add_argument_group("ddl (used when the world size is above 1)")
    dist.add_argument(
        "--algorithm",
        default="auto",
        choices=["auto", "native", "ring", "multiring", "hierarchical"],
    )
    dist.add_argument("--bucket-size", default="25MiB")
    run = p.add_argument_group("run")
    run.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--save", default=None, help="write a checkpoint here at the end")
    run.add_argument("--resume", default=None, help="continue from this checkpoint")
    run.add_argument("--plot", default=None, help="write a PNG of memory over one step here")
    run.add_argument("--json", default=None, help="write the losses and the report here")
    run.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flag values that would train on nothing or fail later inside torch, lms or ddl.

    Every check runs before the model is built, so a typo costs no training time, and the
    message names the flag (argparse's ``error``: usage, the message, exit status 2).
    """
    # --batch 0 would train on empty batches and log a NaN loss; --steps 0 has no loss to
    # report; --log-every 0 divides by zero at the first step.
    for flag, value in (("--steps", args.steps), ("--batch", args.batch)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.log_every < 1:
        p.error(
            f"--log-every must be at least 1, got {args.log_every} (one above --steps logs nothing)"
        )
    if not (math.isfinite(args.lr) and args.lr >= 0):
        p.error(f"--lr must be a finite number >= 0, got {args.lr}")
    try:
        model_config(args)
    except ValueError as e:  # GPTConfig names its fields (n_embd); the user typed flags
        msg = str(e)
        for field in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd"):
            msg = msg.replace(field, "--" + field.replace("_", "-"))
        p.error(msg)
    if not args.no_lms:
        # The parser lms.enable uses, so what passes here parses there (whether a limit fits
        # the device is known only at lms.enable; see main).
        for flag, field in (("--limit", "limit"), ("--min-size", "min_size")):
            try:
                lms.LMSConfig(**{field: getattr(args, field)})
            except lms.LMSError as e:
                p.error(f"{flag}: {e}")
    try:  # only used with several ranks, but a typo should not wait for the multi-node launch
        ddl_parse_size(args.bucket_size, "--bucket-size")
    except ddl.DDLError as e:
        p.error(str(e))
    try:
        device = pick_device(args.device, local_rank_from_env(), torch.cuda.device_count())
    except ValueError as e:
        p.error(str(e))
    # Only rank 0 writes files (see main); on other nodes these paths may not even exist.
    if int(os.environ.get("RANK", "0")) == 0:
        for flag in ("--save", "--plot", "--json"):
            path = getattr(args, flag[2:])
            if path is not None:
                problem = cannot_write(path)
                if problem:
                    p.error(f"{flag} {path}: {problem}")
        if args.plot is not None and args.no_lms and device.type != "cuda":
            p.error("--plot on the CPU samples LMS's accounting; drop --no-lms (or use a GPU)")
        if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
            p.error("--plot needs matplotlib: pip install matplotlib (or the [bench] extra)")


def cannot_write(path: str) -> str | None:
    """Why ``path`` cannot be written, or None; leaves the file system as it found it.

    The files are written after training, so a missing directory would otherwise cost the
    whole run. Opening for append is the one test that also holds for root, read-only
    mounts and /proc, where permission bits say nothing.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"directory {parent} does not exist; create it first"
    if os.path.isdir(path):
        return "is a directory; give a file name"
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        return f"cannot be written ({e.strerror}); choose another path"
    if not existed:
        os.remove(path)
    return None


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(requested: str | None, local_rank: int, cuda_count: int) -> torch.device:
    """The compute device: ``--device`` if given, else this rank's GPU, else the CPU.

    A bare ``cuda`` means this rank's GPU (``LOCAL_RANK``), as no ``--device`` does on a GPU
    machine: ``torch.cuda.set_device`` needs an index, and under torchrun every rank would
    otherwise share GPU 0.

    Raises:
        ValueError: a string that is not a device, a device type this script does not run
            on, or a GPU that this machine does not have, with the flag to change.
    """
    if requested is None:
        if not cuda_count:
            return torch.device("cpu")
        device = torch.device("cuda", local_rank)
    else:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ValueError(
                f"--device {requested!r} is not a device; use cpu, cuda or cuda:N"
            ) from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {requested!r}: this example runs on cpu or cuda")
        if device.type == "cpu":
            return device
        if not cuda_count:
            raise ValueError(
                f"--device {requested}: this torch ({torch.__version__}) sees no CUDA device; "
                "omit --device to train on the CPU"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.index >= cuda_count:
        raise ValueError(
            f"{device} does not exist: this machine has {cuda_count} CUDA device(s); "
            "run at most that many processes per node, or pass --device cuda:N"
        )
    return device


def model_config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )


def weights_flag(value: str) -> str | bool:
    return {"auto": "auto", "true": True, "false": False}[value]


def rank_batch(
    cfg: GPTConfig, args: argparse.Namespace, step: int, rank: int, world: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the step's global batch.

    The global batch depends only on the seed and the step, so a resumed run sees the same data
    as an uninterrupted one, and one process training ``world * batch`` sequences sees exactly
    what the ranks see together.
    """
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    x, y = synthetic_batch(cfg, args.batch * world, gen)
    rows = slice(rank * args.batch, (rank + 1) * args.batch)
    return x[rows].to(device), y[rows].to(device)


CHECKPOINT_KEYS = ("model", "optimizer", "step", "model_config", "world_size")


def checkpoint_optimizer(ckpt: dict) -> str | None:
    """The --optimizer a checkpoint was trained with.

    Checkpoints name it; older ones are told apart by their hyperparameters (AdamW's betas,
    SGD's momentum), which torch stores with the state.
    """
    if "optimizer_name" in ckpt:
        return ckpt["optimizer_name"]
    groups = ckpt["optimizer"].get("param_groups") or [{}]
    return "adamw" if "betas" in groups[0] else "sgd" if "momentum" in groups[0] else None


def load_checkpoint(path: str, cfg: GPTConfig, world_size: int, optimizer: str) -> dict:
    """Read a checkpoint and refuse one that does not match this run.

    Raises:
        SystemExit: the file is missing or is not a checkpoint of this script, or its model
            shape, world size or optimizer differ from this run's flags; the message says
            which flag to change.
    """
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise SystemExit(f"error: --resume {path} {what}; give a file written by --save")
    try:
        # weights_only: a checkpoint holds only tensors and plain values, and unpickling
        # anything else would run code from the file.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not its format
        raise SystemExit(
            f"error: --resume {path} is not a checkpoint torch can read "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "give a file written by this script's --save"
        ) from e
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(
            f"error: --resume {path} is not a checkpoint of this script (no {', '.join(missing)}); "
            "give a file written by its --save"
        )
    now = asdict(cfg)
    saved = ckpt["model_config"]
    if saved != now:
        diff = {k: (saved.get(k), now.get(k)) for k in {*saved, *now} if saved.get(k) != now.get(k)}
        raise SystemExit(
            f"error: checkpoint {path} holds a different model shape "
            f"(saved vs now: {diff}); pass the same model flags as the saved run"
        )
    if ckpt["world_size"] != world_size:
        raise SystemExit(
            f"error: checkpoint {path} was saved by {ckpt['world_size']} ranks and this "
            f"run has {world_size}; resume with the same number of processes, because "
            "the global batch (ranks x --batch) would change"
        )
    saved_opt = checkpoint_optimizer(ckpt)
    if saved_opt != optimizer:
        # torch would fail deep in the first step (a missing 'momentum' or 'step' key).
        raise SystemExit(
            f"error: checkpoint {path} holds {saved_opt} state and this run uses --optimizer "
            f"{optimizer}; pass --optimizer {saved_opt}"
        )
    return ckpt


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` whole or not at all.

    ``--resume c.pt --save c.pt`` is the natural way to continue a run, so writing in place
    would leave a truncated file, and no checkpoint, if the write is interrupted (Ctrl-C, a
    full disk). Write a temporary file in the same directory, then rename it over ``path``.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise SystemExit(
            f"error: --save {path}: {e.strerror or e}; any earlier file there is unchanged"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def progress(steps: int, enabled: bool):
    if enabled:
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            return tqdm(total=steps, unit="step", dynamic_ncols=True)
    return None


def memory_report(handle: lms.LMSHandle | None, device: torch.device) -> dict:
    """The numbers the run ends with: LMS's counters, or the allocator's peak without LMS."""
    if handle is not None:
        return handle.stats().as_dict()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_device_bytes": peak}


def format_report(
    handle: lms.LMSHandle | None, device: torch.device, report: dict, rank: int = 0, world: int = 1
) -> str:
    # Under torchrun each rank has its own device and its own LMS counters; only rank 0
    # prints, so say whose numbers these are rather than let them pass for totals.
    where = f"{device}, rank {rank} of {world}" if world > 1 else f"{device}"
    if handle is None:
        peak = report["peak_device_bytes"]
        if peak is None:  # the CPU has no allocator peak to show
            return f"memory report ({where}, LMS off): peak device n/a (no allocator on the CPU)"
        peak_line = f"peak device      {peak / 2**30:.3f} GiB (allocator)"
        return f"memory report ({where}, LMS off)\n{peak_line}"
    return f"memory report ({where})\n" + handle.stats().summary()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        ddl.init()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = local_rank_from_env()
    device = pick_device(args.device, local_rank, torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    main_rank = rank == 0

    cfg = model_config(args)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(cfg).to(device)
    ckpt = load_checkpoint(args.resume, cfg, world, args.optimizer) if args.resume else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])

    handle = None
    if not args.no_lms:
        try:
            handle = lms.enable(
                model, limit=args.limit, min_size=args.min_size, weights=weights_flag(args.weights)
            )
        except lms.LMSError as e:  # a limit the device cannot give, or too small to run
            raise SystemExit(f"error: {e}") from e
        if not handle.enabled:
            # LMS_DISABLE=1 gives an inert handle whose zeroed counters would print as
            # 'limit 0 B', the setting that moves everything; report the run as LMS off.
            handle = None
    grad_sync = None
    if distributed:
        # Reduce paged gradients on the device before LMS moves them to host memory.
        paging = handle is not None and handle.weights is not None
        grad_ready = handle.weights.defer_grad_offload() if paging else None
        # No broadcast: every rank builds the same weights from --seed (or loads the same
        # checkpoint), and parameters LMS pages live in host memory, which NCCL cannot reach.
        grad_sync = ddl.wrap(
            model,
            bucket_size=args.bucket_size,
            algorithm=args.algorithm,
            grad_ready=grad_ready,
            broadcast=False,
        )
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    start_step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        # load_state_dict restores the saved learning rate too, which would silently ignore
        # an --lr changed for the resumed run; the flag wins (with the same --lr, no change).
        for group in optimizer.param_groups:
            group["lr"] = args.lr
        start_step = ckpt["step"]

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    try:
        timeline = MemoryTimeline(model, device, handle) if args.plot else None
    except ValueError as e:  # LMS_DISABLE=1 on the CPU: nothing to sample
        raise SystemExit(f"error: --plot: {e}") from e
    bar = progress(args.steps, main_rank and not args.no_progress)
    losses, step_times = [], []
    tokens_per_step = args.batch * cfg.seq_len * world
    for step in range(start_step, start_step + args.steps):
        x, y = rank_batch(cfg, args, step, rank, world, device)
        record = timeline is not None and step == start_step + min(2, args.steps - 1)
        t0 = time.perf_counter()
        with timeline.recording() if record else contextlib.nullcontext():
            with autocast:
                loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - t0)
        step_loss = loss.detach().float().clone()
        if distributed:
            # Each rank's loss covers only its --batch rows; their mean (equal row counts) is
            # the loss of the global batch, which one process training it all would report.
            ddl.allreduce(step_loss, op="mean", algorithm="native")
        losses.append(step_loss.item())
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
        if main_rank and (step + 1) % args.log_every == 0:
            dt = sum(step_times[-args.log_every :]) / len(step_times[-args.log_every :])
            mem = (
                f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak"
                if device.type == "cuda"
                else f"{handle.stats().peak_resident_bytes / 2**20:.1f} MiB resident peak"
                if handle is not None
                else "cpu"
            )
            msg = (
                f"step {step + 1}: loss {losses[-1]:.4f}  {dt * 1e3:.1f} ms/step  "
                f"{tokens_per_step / dt:,.0f} tokens/s  {mem}"
            )
            (bar.write if bar is not None else print)(msg)
    if bar is not None:
        bar.close()

    if args.save and main_rank:
        save_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": start_step + args.steps,
                "model_config": asdict(cfg),
                "world_size": world,
                "optimizer_name": args.optimizer,
            },
            args.save,
        )
    report = memory_report(handle, device)
    result = {
        "losses": losses,
        "step_s": step_times,
        "report": report,
        "summary": {
            "steps": args.steps,
            "first_loss": losses[0],
            "final_loss": losses[-1],
            "median_step_s": sorted(step_times)[len(step_times) // 2],
            **{
                k: report[k]
                for k in ("limit_bytes", "peak_device_bytes", "swapped_out_bytes", "stall_s")
                if k in report
            },
        },
    }
    if report.get("peak_device_bytes") and report.get("limit_bytes"):
        result["summary"]["peak_over_limit"] = report["peak_device_bytes"] / report["limit_bytes"]
    if main_rank:
        print(format_report(handle, device, report, rank, world))
        if timeline is not None:
            timeline.plot(args.plot)
            print(f"wrote {args.plot}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    if grad_sync is not None:
        grad_sync.remove()
    if handle is not None:
        handle.remove()
    return result


if __name__ == "__main__":
    try:
        main()
    finally:
        # Tear down the process groups ddl made (a no-op in a single process): NCCL
        # warns at exit about groups left alive.
        ddl.shutdown()
