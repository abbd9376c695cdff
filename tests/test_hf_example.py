"""LMS on a model we did not write: the Hugging Face GPT-2 example, bitwise against no LMS."""

import sys

import pytest
import torch

from examples import hf_transformers


def test_hf_gpt2_trains_identically_with_lms():
    pytest.importorskip("transformers")
    result = hf_transformers.main(["--steps", "2", "--batch", "2", "--seq-len", "32"])
    # main() itself exits with an error if the losses differ; check that LMS moved tensors.
    assert len(result["losses"]) == 2
    assert result["stats"].swap_outs > 0 and result["stats"].swap_ins > 0


def test_the_example_leaves_the_deterministic_switch_as_it_found_it():
    pytest.importorskip("transformers")
    # Tests call main() in-process: left on, the global switch changes every later test
    # (torch.empty filled with NaN, nondeterministic kernels refused).
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)  # whatever earlier tests left
    try:
        hf_transformers.main(["--steps", "1", "--batch", "1", "--seq-len", "16"])
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_without_transformers_it_says_so_and_returns(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    assert hf_transformers.main(["--steps", "1"]) is None
    assert "transformers is not installed; `pip install transformers`" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        # Zero steps compared two empty loss lists and reported "identical losses".
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--batch", "0"], "--batch must be at least 1, got 0"),
        (["--seq-len", "0"], "--seq-len must be at least 1, got 0"),
        (["--limit", "abc"], "--limit: limit='abc' cannot be parsed"),
        (["--min-size", "-1"], "--min-size: min_size='-1' cannot be parsed"),
        (["--device", "foo"], "--device 'foo' is not a device"),
    ],
)
def test_bad_flag_values_are_refused_before_training(argv, message, capsys):
    # Validation comes before the transformers import, so this holds without it too.
    with pytest.raises(SystemExit) as exc:
        hf_transformers.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_cuda_without_cuda_is_refused(capsys):
    with pytest.raises(SystemExit):
        hf_transformers.main(["--device", "cuda"])
    assert "this torch sees no CUDA device; pass --device cpu" in capsys.readouterr().err


def test_a_limit_larger_than_the_device_is_refused(capsys):
    pytest.importorskip("transformers")
    with pytest.raises(SystemExit, match="^error: limit .* is larger than the device"):
        hf_transformers.main(
            ["--steps", "1", "--batch", "1", "--seq-len", "16", "--limit", "1000TiB"]
        )
