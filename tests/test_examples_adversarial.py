"""The example scripts run as a user would, with the values a user gets wrong.

Each bad value must end in one of our messages that names the flag and says what to do, before
any training (argparse's exit status 2, or ``SystemExit("error: ...")``), never in a traceback
from inside torch and never in a run that trains on nothing.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from examples import train_gpt

# A model small enough that a refused run, had it trained, would still be quick.
MODEL = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--vocab-size", "128"]
MODEL += ["--seq-len", "32", "--no-progress", "--log-every", "1000", "--batch", "2"]


def _refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run train_gpt with ``argv``; return its error text, failing if it trained or crashed."""
    with pytest.raises(SystemExit) as exc:
        train_gpt.main([*MODEL, *argv])
    err = capsys.readouterr().err
    # argparse's p.error prints to stderr and exits 2; our own refusals carry the message.
    return err if exc.value.code == 2 else str(exc.value.code)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--steps", "-1"], "--steps must be at least 1, got -1"),
        (["--batch", "0"], "--batch must be at least 1, got 0"),
        (["--batch", "-1"], "--batch must be at least 1, got -1"),
        (["--log-every", "0"], "--log-every must be at least 1"),
        (["--log-every", "-1"], "--log-every must be at least 1"),
        (["--lr", "-1"], "--lr must be a finite number >= 0"),
        (["--lr", "nan"], "--lr must be a finite number >= 0"),
        (["--n-embd", "63"], "--n-embd=63 must be a multiple of --n-head=4"),
        (["--vocab-size", "0"], "--vocab-size must be positive"),
        (["--n-layer", "0"], "--n-layer must be positive"),
        (["--n-head", "0"], "--n-head must be positive, got 0"),
        (["--limit", "abc"], "--limit: limit='abc' cannot be parsed"),
        (["--limit", "1.5"], "--limit: limit=1.5 is not a fraction in (0, 1]"),
        (["--limit", "-5"], "--limit: limit='-5' cannot be parsed"),
        (["--min-size", "-1"], "--min-size: min_size='-1' cannot be parsed"),
        (["--min-size", "1.5"], "--min-size"),
        (["--bucket-size", "abc"], "--bucket-size='abc' is not a size"),
        (["--bucket-size", "0"], "--bucket-size='0' must be positive"),
    ],
)
def test_bad_flag_values_are_refused_before_training(argv, message, capsys):
    assert message in _refused(argv, capsys)


def test_a_limit_too_small_for_a_module_is_refused_with_lms_message(capsys):
    err = _refused(["--limit", "1B", "--min-size", "1B", "--weights", "true"], capsys)
    assert err.startswith("error: limit=1 B is too small for module")


@pytest.mark.parametrize("limit", ["0", "512MB", "0.5"])
def test_documented_limit_forms_train(limit):
    # 0 moves everything movable; "512MB" is decimal megabytes; 0.5 is half the device (RAM
    # on the CPU).
    result = train_gpt.main([*MODEL, "--steps", "1", "--limit", limit])
    assert len(result["losses"]) == 1


@pytest.mark.parametrize(
    "requested, local_rank, cuda_count, expected",
    [
        (None, 0, 0, "cpu"),
        (None, 1, 2, "cuda:1"),
        ("cpu", 1, 2, "cpu"),
        # A bare "cuda" crashed in torch.cuda.set_device, which needs an index; it means this
        # rank's GPU, as no --device does.
        ("cuda", 1, 2, "cuda:1"),
        ("cuda:0", 1, 2, "cuda:0"),
    ],
)
def test_device_choice(requested, local_rank, cuda_count, expected):
    assert train_gpt.pick_device(requested, local_rank, cuda_count) == torch.device(expected)


@pytest.mark.parametrize(
    "requested, local_rank, cuda_count, message",
    [
        ("cuda", 0, 0, "sees no CUDA device; omit --device to train on the CPU"),
        ("cuda:2", 0, 2, "cuda:2 does not exist: this machine has 2 CUDA device(s)"),
        # torchrun with more processes per node than GPUs.
        (None, 3, 2, "cuda:3 does not exist: this machine has 2 CUDA device(s)"),
        ("foo", 0, 0, "--device 'foo' is not a device; use cpu, cuda or cuda:N"),
        ("meta", 0, 0, "this example runs on cpu or cuda"),
    ],
)
def test_device_that_cannot_be_used_is_refused(requested, local_rank, cuda_count, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train_gpt.pick_device(requested, local_rank, cuda_count)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "foo"])
def test_device_flag_without_cuda_is_refused_before_training(device, capsys):
    err = _refused(["--device", device], capsys)
    assert "omit --device to train on the CPU" in err or "is not a device" in err


@pytest.mark.parametrize("flag", ["--save", "--plot", "--json"])
def test_output_in_a_missing_directory_is_refused_before_training(flag, tmp_path, capsys):
    # These files are written after the last step: finding out then loses the run.
    path = tmp_path / "missing" / "out"
    err = _refused(["--steps", "1", flag, str(path)], capsys)
    assert f"{flag} {path}: directory {path.parent} does not exist; create it first" in err


@pytest.mark.parametrize("flag", ["--save", "--plot", "--json"])
def test_output_that_cannot_be_written_is_refused_before_training(flag, tmp_path, capsys):
    err = _refused(["--steps", "1", flag, str(tmp_path)], capsys)
    assert f"{flag} {tmp_path}: is a directory" in err
    if os.path.isdir("/proc"):  # Linux: refuses new files even to root, whom bits do not stop
        err = _refused(["--steps", "1", flag, "/proc/lms-example-out"], capsys)
        assert f"{flag} /proc/lms-example-out: cannot be written" in err


def test_output_checks_leave_no_file_behind(tmp_path):
    # The probe must not leave an empty file where --save points: --resume would meet it.
    assert train_gpt.cannot_write(str(tmp_path / "c.pt")) is None
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import importlib.util
    import sys

    # As if matplotlib were not installed: find_spec says so, and an import would fail.
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a)
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    err = _refused(["--steps", "1", "--plot", str(tmp_path / "p.png")], capsys)
    assert "--plot needs matplotlib: pip install matplotlib" in err


@pytest.fixture(scope="module")
def adamw_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "adamw.pt"
    train_gpt.main([*MODEL, "--steps", "1", "--no-lms", "--save", str(path)])
    return path


def test_resume_from_a_missing_file_or_a_directory_is_refused(tmp_path, capsys):
    err = _refused(["--steps", "1", "--resume", str(tmp_path / "none.pt")], capsys)
    assert (
        err
        == f"error: --resume {tmp_path / 'none.pt'} does not exist; give a file written by --save"
    )
    err = _refused(["--steps", "1", "--resume", str(tmp_path)], capsys)
    assert err.startswith(f"error: --resume {tmp_path} is a directory")


def test_resume_from_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    err = _refused(["--steps", "1", "--resume", str(text)], capsys)
    assert err.startswith(f"error: --resume {text} is not a checkpoint torch can read")
    # Files torch can read but that this script did not write.
    for name, obj in (("dict.pt", {"a": 1}), ("tensor.pt", torch.zeros(3))):
        torch.save(obj, tmp_path / name)
        err = _refused(["--steps", "1", "--resume", str(tmp_path / name)], capsys)
        assert "is not a checkpoint of this script (no model, optimizer" in err


def test_resume_does_not_run_code_from_the_file(tmp_path, capsys):
    # A pickle that would call a function when loaded: weights_only refuses it.
    path = tmp_path / "evil.pt"
    torch.save({"model": _Marker()}, path)
    err = _refused(["--steps", "1", "--resume", str(path)], capsys)
    assert "is not a checkpoint torch can read" in err
    assert not _Marker.loaded


class _Marker:
    loaded = False

    def __reduce__(self):
        return (_Marker._load, ())

    @staticmethod
    def _load():
        _Marker.loaded = True
        return 0


def test_resume_with_another_optimizer_is_refused(adamw_checkpoint, tmp_path, capsys):
    err = _refused(
        ["--steps", "1", "--optimizer", "sgd", "--resume", str(adamw_checkpoint)], capsys
    )
    assert "holds adamw state and this run uses --optimizer sgd; pass --optimizer adamw" in err
    sgd = tmp_path / "sgd.pt"
    train_gpt.main([*MODEL, "--steps", "1", "--no-lms", "--optimizer", "sgd", "--save", str(sgd)])
    err = _refused(["--steps", "1", "--resume", str(sgd)], capsys)
    assert "holds sgd state and this run uses --optimizer adamw; pass --optimizer sgd" in err


def test_checkpoints_without_the_optimizer_name_are_still_told_apart(adamw_checkpoint, tmp_path):
    # Checkpoints written before the name was saved: the hyperparameters tell.
    ckpt = torch.load(adamw_checkpoint, weights_only=True)
    ckpt.pop("optimizer_name", None)
    assert train_gpt.checkpoint_optimizer(ckpt) == "adamw"
    ckpt["optimizer"]["param_groups"][0].pop("betas")
    ckpt["optimizer"]["param_groups"][0]["momentum"] = 0.9
    assert train_gpt.checkpoint_optimizer(ckpt) == "sgd"


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_uses_the_lr_flag_not_the_saved_one(optimizer, tmp_path):
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    flags = [*MODEL, "--no-lms", "--optimizer", optimizer, "--steps", "1"]
    train_gpt.main([*flags, "--save", str(first)])
    # With --lr 0 the resumed step must leave every parameter as it was (no weight decay).
    train_gpt.main([*flags, "--lr", "0", "--resume", str(first), "--save", str(second)])
    before = torch.load(first, weights_only=True)["model"]
    after = torch.load(second, weights_only=True)["model"]
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def test_lms_disable_is_reported_as_lms_off(monkeypatch, capsys):
    # An inert handle's zeros printed "limit 0 B", which means "move everything".
    monkeypatch.setenv("LMS_DISABLE", "1")
    result = train_gpt.main([*MODEL, "--steps", "1"])
    out = capsys.readouterr().out
    assert "memory report (cpu, LMS off)" in out
    assert "limit " not in out
    assert result["report"] == {"peak_device_bytes": None}


def test_a_failed_save_keeps_the_checkpoint_it_resumed_from(
    adamw_checkpoint, tmp_path, monkeypatch
):
    import errno
    import shutil

    ckpt = tmp_path / "c.pt"
    shutil.copy(adamw_checkpoint, ckpt)
    before = ckpt.read_bytes()
    real_save = torch.save

    def disk_fills_up(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # what a full disk leaves: the start of the file
            fh.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_fills_up)
    # Continuing a run in place: resume from and save to the same file.
    with pytest.raises(
        SystemExit, match="No space left on device; any earlier file there is unchanged"
    ):
        train_gpt.main(
            [*MODEL, "--no-lms", "--steps", "1", "--resume", str(ckpt), "--save", str(ckpt)]
        )
    assert ckpt.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_plot_without_lms_on_the_cpu_is_refused(tmp_path, capsys):
    # Nothing measures device bytes there: the plot was a flat line at 0 MiB.
    err = _refused(["--steps", "1", "--no-lms", "--plot", str(tmp_path / "p.png")], capsys)
    assert "--plot on the CPU samples LMS's accounting; drop --no-lms" in err
    assert not (tmp_path / "p.png").exists()


def test_plot_says_what_it_measures_and_shows_the_limit():
    import lms
    from examples.gpt import GPT, GPTConfig, synthetic_batch
    from examples.memory_timeline import MemoryTimeline

    cfg = GPTConfig(n_layer=1, n_embd=64, n_head=4, vocab_size=128, seq_len=32)
    model = GPT(cfg)
    with pytest.raises(ValueError, match="nothing to sample on cpu without LMS"):
        MemoryTimeline(model, torch.device("cpu"), None)
    with lms.enable(model, limit="160KiB", min_size="4KiB", weights=False) as handle:
        timeline = MemoryTimeline(model, torch.device("cpu"), handle)
        with timeline.recording():
            model(*synthetic_batch(cfg, 2, torch.Generator().manual_seed(0))).backward()
        fig = timeline.figure()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "device bytes (LMS accounting)" in labels and "LMS limit" in labels
    limit_line = next(line for line in ax.get_lines() if line.get_label() == "LMS limit")
    assert limit_line.get_ydata()[0] == 160 / 1024  # MiB
    timeline.remove()
