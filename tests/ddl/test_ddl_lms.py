"""ddl.wrap meets lms weight paging through ``grad_ready`` (neither package imports the other).

LMS pages parameters and gradients to host memory; with ``defer_grad_offload()`` it keeps
each gradient on the device until the reducer calls ``grads_ready(params)``, which
ddl.wrap does once the reduced values are in ``.grad``. The test trains the same GPT on
2 Gloo ranks with and without LMS (limit far below the model, so every block is paged)
and expects bitwise equal parameters: reduction adds the same two values in both runs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from ddl_harness import run_ranks

import ddl

pytestmark = pytest.mark.filterwarnings("ignore")


def _with_and_without_lms(steps):
    import lms
    from examples.gpt import GPT, GPTConfig, synthetic_batch

    cfg = GPTConfig(vocab_size=128, seq_len=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    plain = GPT(cfg)
    paged = copy.deepcopy(plain)
    h_plain = ddl.wrap(plain, bucket_size="16KiB", algorithm="ring")
    lms_handle = lms.enable(paged, limit="40KiB", min_size="1KiB", weights=True, device="cpu")
    grads_ready = lms_handle.weights.defer_grad_offload()
    h_paged = ddl.wrap(paged, bucket_size="16KiB", algorithm="ring", grad_ready=grads_ready)
    g = torch.Generator().manual_seed(10 + ddl.rank())
    data = [synthetic_batch(cfg, 2, g) for _ in range(steps)]
    for model in (plain, paged):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for x, y in data:
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
    n_paged = len(lms_handle.weights.paged_names)
    lms_handle.remove()
    h_plain.remove()
    h_paged.remove()
    same = all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), paged.state_dict().values())
    )
    return same, n_paged, [p.sum().item() for p in paged.parameters()]


def test_wrap_with_lms_weight_paging_is_bitwise_equal():
    results = run_ranks(_with_and_without_lms, 2, 3)
    for same, n_paged, _ in results:
        assert n_paged > 0, "the limit should force LMS to page parameters"
        assert same, "training with LMS paging differs from training without"
    assert results[0][2] == results[1][2], "replicas diverged"
