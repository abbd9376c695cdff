"""Bad input to ``lms.enable``: our error, a message that says what to do, nothing changed.

Every case checks, after the error, that nothing LMS installs is left on the model
(module hooks, the forward wrapper, the parameters' hooks, the registry of enabled
models) and that enabling again with good settings works.
"""

import pytest
import torch
from torch import nn

import lms
from lms.enable import _ENABLED

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def assert_untouched(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(module, attr, {}), f"{attr} left on {name or 'the model'}"
        assert "forward" not in module.__dict__, f"forward wrapper left on {name or 'the model'}"
    for p in model.parameters():
        assert not getattr(p, "_backward_hooks", None)
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    assert model not in _ENABLED


def assert_enables_again(model: nn.Module) -> None:
    x = torch.randn(4, 32)
    with lms.enable(model, limit=0, min_size=0, weights=False) as handle:
        model(x).sum().backward()
    assert handle.stats().swap_outs > 0
    assert_untouched(model)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for var in ("LMS_LIMIT", "LMS_MIN_SIZE", "LMS_DISABLE"):
        monkeypatch.delenv(var, raising=False)


def test_a_limit_from_the_environment_refused_against_the_device_names_the_variable(
    monkeypatch,
):
    # The override parses, so only the device check refuses it; the message said
    # "lower limit" although the script passed a fine limit and LMS_LIMIT was the cause.
    monkeypatch.setenv("LMS_LIMIT", "1000TiB")
    model = make_model()
    with pytest.raises(lms.LMSError, match=r"LMS_LIMIT.*larger than the device.*lower LMS_LIMIT"):
        lms.enable(model, limit=0.5)
    assert_untouched(model)
    monkeypatch.delenv("LMS_LIMIT")
    assert_enables_again(model)


def test_a_host_limit_above_the_machines_ram_is_refused_at_enable():
    model = make_model()
    with pytest.raises(lms.LMSError, match="host_limit .* larger than this machine's"):
        lms.enable(model, host_limit="1000TiB")
    assert_untouched(model)
    assert_enables_again(model)
