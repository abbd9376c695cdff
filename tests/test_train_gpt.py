"""examples/train_gpt.py end to end: lms + ddl across ranks, checkpoints, bad input.

The multi-rank test launches the script with torchrun exactly as a user would, on the CPU with
Gloo, so it exercises the real launch path (environment, ddl.init, ddl.wrap, lms.enable).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from examples import train_gpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_gpt.py")
# Small enough to be quick on two loaded cores; the limit is far below what it needs.
MODEL = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--vocab-size", "128"]
MODEL += ["--seq-len", "32", "--lr", "1e-2", "--no-progress", "--log-every", "1000"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_params(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_two_ranks_with_lms_match_one_process_without(tmp_path):
    # SGD, because AdamW normalises each update: where a gradient is pure rounding noise (the
    # key bias, which softmax ignores), the two reduction orders give opposite +-lr steps.
    steps = ["--steps", "4", "--optimizer", "sgd"]
    lms_flags = ["--limit", "160KiB", "--min-size", "4KiB", "--weights", "true"]
    dist_ckpt, solo_ckpt = tmp_path / "dist.pt", tmp_path / "solo.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        SCRIPT,
        *MODEL,
        *steps,
        *lms_flags,
        "--batch",
        "2",
        "--algorithm",
        "ring",
        "--save",
        str(dist_ckpt),
        "--json",
        str(tmp_path / "dist.json"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Only rank 0 prints, and its report is its own counters, not totals: it says so.
    assert run.stdout.count("memory report (cpu, rank 0 of 2)") == 1, run.stdout

    solo = train_gpt.main([*MODEL, *steps, "--no-lms", "--batch", "4", "--save", str(solo_ckpt)])
    import json

    dist_json = json.loads((tmp_path / "dist.json").read_text())
    # The logged loss is the global batch's (the mean over ranks), not rank 0's half of it.
    torch.testing.assert_close(dist_json["losses"], solo["losses"], rtol=1e-5, atol=0)
    report = dist_json["report"]
    # LMS really worked under the limit: weights and activations went out and came back.
    assert report["swapped_out_bytes"] > 0 and report["swapped_in_bytes"] > 0
    assert report["limit_bytes"] == 160 * 1024

    dist, ref = _final_params(dist_ckpt), _final_params(solo_ckpt)
    assert dist.keys() == ref.keys()
    # Not bitwise: two ranks each average their half of the batch and ddl averages the two
    # halves, where one process averages all rows at once, so float sums run in another order
    # (about 1e-7 relative per step); four SGD steps keep parameters within 1e-6.
    for name in ref:
        torch.testing.assert_close(dist[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert len(solo["losses"]) == 4
    # Resuming the two ranks' checkpoint in one process would change the global batch.
    with pytest.raises(SystemExit, match="saved by 2 ranks and this run has 1"):
        train_gpt.main([*MODEL, *steps, *lms_flags, "--batch", "2", "--resume", str(dist_ckpt)])


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    lms_flags = ["--limit", "160KiB", "--min-size", "4KiB", "--batch", "2"]
    whole = train_gpt.main([*MODEL, *lms_flags, "--steps", "4"])
    first = train_gpt.main([*MODEL, *lms_flags, "--steps", "2", "--save", str(tmp_path / "c.pt")])
    rest = train_gpt.main([*MODEL, *lms_flags, "--steps", "2", "--resume", str(tmp_path / "c.pt")])
    assert first["losses"] + rest["losses"] == whole["losses"]
    # The synthetic task is learnable, so training makes progress.
    assert whole["losses"][-1] < whole["losses"][0]


def test_resume_with_another_model_shape_is_refused(tmp_path):
    ckpt = tmp_path / "c.pt"
    train_gpt.main([*MODEL, "--steps", "1", "--no-lms", "--batch", "1", "--save", str(ckpt)])
    other = [a if a != "64" else "32" for a in MODEL]  # --n-embd 32
    with pytest.raises(SystemExit, match="different model shape.*n_embd"):
        train_gpt.main([*other, "--steps", "1", "--no-lms", "--resume", str(ckpt)])


def test_plot_writes_a_png(tmp_path):
    png = tmp_path / "timeline.png"
    train_gpt.main(
        [
            *MODEL,
            "--steps",
            "3",
            "--batch",
            "2",
            "--limit",
            "160KiB",
            "--min-size",
            "4KiB",
            "--plot",
            str(png),
        ]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_with_another_world_size_is_refused(tmp_path):
    ckpt = tmp_path / "c.pt"
    train_gpt.main([*MODEL, "--steps", "1", "--no-lms", "--batch", "1", "--save", str(ckpt)])
    cfg = train_gpt.GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=128, seq_len=32)
    with pytest.raises(SystemExit, match="saved by 1 ranks and this run has 2"):
        train_gpt.load_checkpoint(str(ckpt), cfg, world_size=2, optimizer="adamw")
