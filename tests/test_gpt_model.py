"""The shared example model: shapes, parameter count and reproducibility."""

import pytest
import torch

from examples.gpt import GPT, GPTConfig, synthetic_batch


def test_param_count_matches_config():
    for tie in (True, False):
        cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, tie_weights=tie)
        model = GPT(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_loss_is_reproducible():
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=64, seq_len=16)
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = GPT(cfg)
        x, y = synthetic_batch(cfg, 3, torch.Generator().manual_seed(1))
        losses.append(model(x, y))
    assert losses[0].shape == ()
    assert torch.equal(losses[0], losses[1])
    # Untrained logits are near uniform, so the loss is near log(vocab).
    assert abs(losses[0].item() - torch.log(torch.tensor(64.0)).item()) < 0.5


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_head must be positive, got 0"):
        GPTConfig(n_head=0)  # was ZeroDivisionError from the divisibility check


def test_sequence_longer_than_the_context_is_refused():
    cfg = GPTConfig(n_layer=1, n_embd=32, n_head=4, vocab_size=64, seq_len=16)
    model = GPT(cfg)
    assert model(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 64)  # the full context
    with pytest.raises(
        ValueError, match="sequence of 17 tokens is longer than the model's context of 16"
    ):
        model(torch.zeros(2, 17, dtype=torch.long))
