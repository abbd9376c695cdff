"""LMS on a model we did not write: the Hugging Face GPT-2 example, bitwise against no LMS."""

import pytest

from examples import hf_transformers


def test_hf_gpt2_trains_identically_with_lms():
    pytest.importorskip("transformers")
    result = hf_transformers.main(["--steps", "2", "--batch", "2", "--seq-len", "32"])
    # main() itself exits with an error if the losses differ; check that LMS moved tensors.
    assert len(result["losses"]) == 2
    assert result["stats"].swap_outs > 0 and result["stats"].swap_ins > 0
