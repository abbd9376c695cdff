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
    assert not torch.are_deterministic_algorithms_enabled()
    hf_transformers.main(["--steps", "1", "--batch", "1", "--seq-len", "16"])
    assert not torch.are_deterministic_algorithms_enabled()


def test_without_transformers_it_says_so_and_returns(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    assert hf_transformers.main(["--steps", "1"]) is None
    assert "transformers is not installed; `pip install transformers`" in capsys.readouterr().out
