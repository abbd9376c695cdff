"""Bad input to ``lms.enable``: our error, a message that says what to do, nothing changed.

Every case checks, after the error, that nothing LMS installs is left on the model
(module hooks, the forward wrapper, the parameters' hooks, the registry of enabled
models) and that enabling again with good settings works.
"""

import warnings

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


def hooks_on(model: nn.Module) -> list:
    """Every module's hooks and forward override, to compare before and after an error."""
    return [
        (name, attr, list(getattr(module, attr, {}).values()))
        for name, module in model.named_modules()
        for attr in HOOK_DICTS
    ] + [module.__dict__.get("forward") for module in model.modules()]


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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"limit": -1}, "limit=-1 is negative"),
        ({"limit": "-1GiB"}, "limit='-1GiB' cannot be parsed"),
        ({"limit": ""}, "limit='' cannot be parsed"),
        ({"limit": "0x10"}, "limit='0x10' cannot be parsed"),
        ({"limit": "12 parsecs"}, "unknown unit"),
        ({"limit": "1e400"}, "too large"),
        ({"limit": "1000TiB"}, "larger than the device"),
        ({"limit": 10**30}, "larger than the device"),
        ({"limit": 1.5}, r"not a fraction in \(0, 1\]"),
        ({"limit": float("nan")}, "not a fraction"),
        ({"limit": float("inf")}, "not a fraction"),
        ({"limit": True}, "limit=True is not a size"),
        ({"limit": [1]}, "is not a size"),
        ({"limit": "0.5b"}, "whole number of bytes"),
        ({"min_size": 0.5}, "min_size=0.5 is not a whole number of bytes"),
        ({"min_size": "50%"}, "min_size='50%' is not a percentage"),
        ({"min_size": -0.5}, "min_size"),
        ({"host_limit": "-3GB"}, "host_limit"),
        ({"host_limit": 2.0}, "host_limit=2.0 is not a fraction"),
        ({"lookahead": -1}, "lookahead=-1 must be >= 0"),
        ({"lookahead": 1.0}, "lookahead=1.0 must be an int"),
        ({"lookahead": True}, "lookahead=True must be an int"),
        ({"weights": "yes"}, "weights='yes' must be 'auto', True or False"),
        ({"weights": 1}, "weights=1 must be"),
        ({"config": {"limit": 1}}, "config must be an lms.LMSConfig"),
        ({"weights": True, "limit": 10, "min_size": 0}, "too small for module"),
    ],
)
def test_bad_settings_raise_our_error_and_change_nothing(kwargs, match):
    model = make_model()
    with pytest.raises(lms.LMSError, match=match):
        lms.enable(model, **kwargs)
    assert_untouched(model)
    assert_enables_again(model)


@pytest.mark.parametrize(
    "var, value, match",
    [
        ("LMS_LIMIT", "lots", "LMS_LIMIT: limit='lots' cannot be parsed"),
        ("LMS_LIMIT", "-1", "LMS_LIMIT"),
        ("LMS_LIMIT", "1.5", "LMS_LIMIT: limit=1.5 is not a fraction"),
        ("LMS_MIN_SIZE", "0.5", "LMS_MIN_SIZE: min_size=0.5 is not a whole number"),
        ("LMS_MIN_SIZE", "10%", "LMS_MIN_SIZE"),
        ("LMS_DISABLE", "maybe", "LMS_DISABLE='maybe' is not understood"),
        ("LMS_DISABLE", "2", "LMS_DISABLE"),
    ],
)
def test_bad_environment_values_name_the_variable_and_change_nothing(
    monkeypatch, var, value, match
):
    model = make_model()
    monkeypatch.setenv(var, value)
    with pytest.raises(lms.LMSError, match=match):
        lms.enable(model, limit="1MiB", min_size=0)  # good arguments: the variable is at fault
    assert_untouched(model)
    monkeypatch.delenv(var)
    assert_enables_again(model)


@pytest.mark.parametrize("value", ["", " ", "  "])
def test_empty_size_variables_are_unset(monkeypatch, value):
    monkeypatch.setenv("LMS_LIMIT", value)
    monkeypatch.setenv("LMS_MIN_SIZE", value)
    model = make_model()
    with lms.enable(model, limit="3MiB", min_size=5) as handle:
        assert handle.config.limit == 3 * 1024**2 and handle.config.min_size == 5


def test_environment_wins_over_arguments_and_over_a_base_config(monkeypatch):
    monkeypatch.setenv("LMS_LIMIT", "2MiB")
    monkeypatch.setenv("LMS_MIN_SIZE", "4KiB")
    base = lms.LMSConfig(limit="8MiB", min_size="1MiB", weights=False, lookahead=3)
    model = make_model()
    with lms.enable(model, limit="16MiB", config=base, lookahead=2) as handle:
        cfg = handle.config
        assert (cfg.limit, cfg.min_size, cfg.weights, cfg.lookahead) == (2 << 20, 4096, False, 2)
        assert handle.runtime.limit == 2 << 20 and handle.runtime.min_size == 4096
    assert_untouched(model)


@pytest.mark.parametrize(
    "value, disabled",
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
def test_lms_disable_values(monkeypatch, value, disabled):
    monkeypatch.setenv("LMS_DISABLE", value)
    model = make_model()
    handle = lms.enable(model, limit=0, min_size=0, weights=False)
    assert handle.enabled is not disabled
    if disabled:
        # Inert: nothing installed, no runtime, and a second enable is not refused.
        assert handle.runtime is None and handle.stats() == lms.Stats()
        assert_untouched(model)
        lms.enable(model).remove()
    handle.remove()
    assert_untouched(model)


def test_a_model_without_parameters_is_refused_and_left_alone():
    model = nn.Sequential(nn.ReLU(), nn.Dropout(0.1))
    with pytest.raises(lms.LMSError, match="has no parameters"):
        lms.enable(model, limit=0)
    assert_untouched(model)


def test_a_lazy_module_not_yet_run_is_refused_with_advice_and_left_alone():
    # Was: torch's ValueError from inside LMS's planning (numel of an uninitialized
    # parameter). After one forward the same model is accepted.
    model = nn.Sequential(nn.LazyLinear(16), nn.Tanh(), nn.Linear(16, 4))
    before = hooks_on(model)  # the lazy module's own pre-hook
    with pytest.raises(lms.LMSError, match="run one forward"):
        lms.enable(model, limit=0, min_size=0)
    assert hooks_on(model) == before and model not in _ENABLED
    model(torch.randn(2, 8))
    lms.enable(model, limit=0, min_size=0).remove()


def test_enabling_twice_is_refused_and_the_first_handle_keeps_working():
    model = make_model()
    x = torch.randn(4, 32)
    first = lms.enable(model, limit=0, min_size=0, weights=False)
    for kwargs in ({}, {"limit": "1GiB"}, {"limit": "nonsense"}, {"weights": True}):
        with pytest.raises(lms.LMSError):
            lms.enable(model, **kwargs)
    model(x).sum().backward()
    assert first.enabled and first.stats().swap_outs > 0
    first.remove()
    assert_untouched(model)
    assert_enables_again(model)


def test_training_continues_after_the_host_cap_is_hit():
    # The cap's LMSError comes from the pack hook in forward: afterwards nothing may
    # stay in use or resident, a smaller batch must train with exact gradients, and a
    # larger host_limit (after remove) the full one.
    model, reference = make_model(), make_model()
    x = torch.randn(64, 32)
    handle = lms.enable(model, limit=0, min_size=0, weights=False, host_limit="12KiB")
    with pytest.raises(lms.LMSError, match="host memory cap reached.*raise host_limit"):
        model(x).sum().backward()
    pool, budget = handle.runtime.pool, handle.runtime.budget
    assert pool.in_use_bytes == 0 and budget.resident_bytes == budget.leaving_bytes == 0
    assert pool.held_bytes == handle.stats().host_bytes <= pool.cap
    model.zero_grad()
    reference.zero_grad()
    model(x[:8]).sum().backward()
    reference(x[:8]).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    handle.remove()
    assert_untouched(model)
    model.zero_grad()
    reference.zero_grad()
    with lms.enable(model, limit=0, min_size=0, weights=False, host_limit="1MiB") as handle:
        model(x).sum().backward()
    reference(x).sum().backward()
    assert handle.stats().swap_outs > 0
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize(
    "device",
    [
        "meta",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")
        ),
    ],
)
def test_a_device_this_process_cannot_use_is_our_error(device):
    # device="meta" raised AttributeError (no torch.meta) and device="cuda" without a
    # GPU torch.cuda's AssertionError, from inside LMS's setup.
    model = make_model()
    with pytest.raises(lms.LMSError, match=f"cannot compute on device '{device}'.*pass device="):
        lms.enable(model, limit="1MiB", device=device)
    assert_untouched(model)
    assert_enables_again(model)


def test_a_device_name_torch_cannot_parse_is_our_error():
    model = make_model()
    with pytest.raises(lms.LMSError, match="device='nonsense' is not a device"):
        lms.enable(model, limit="1MiB", device="nonsense")
    assert_untouched(model)
    assert_enables_again(model)


@pytest.mark.parametrize("outer_first", [True, False], ids=["outer_first", "inner_first"])
def test_nested_enable_is_refused_and_the_first_handle_keeps_working(outer_first):
    # Nested, two pagers would page the same parameters: the first forward failed
    # with a misleading "parameter '1.0.weight' was replaced or moved".
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Sequential(nn.Linear(32, 32), nn.ReLU()))
    first, second = (model, model[1]) if outer_first else (model[1], model)
    x = torch.randn(4, 32)
    model(x).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    handle = lms.enable(first, limit=0, min_size=0, weights=True)
    installed = hooks_on(model)
    with pytest.raises(lms.LMSError, match="weight paging cannot nest"):
        lms.enable(second, limit=0, min_size=0, weights=True)
    assert hooks_on(model) == installed and second not in _ENABLED
    model(x).sum().backward()
    assert all(torch.equal(a, b.grad) for a, b in zip(want, model.parameters(), strict=True))
    handle.remove()
    assert_untouched(model)
    assert_enables_again(model)


def test_a_limit_too_small_for_a_module_names_the_variable_it_came_from(monkeypatch):
    monkeypatch.setenv("LMS_LIMIT", "1KiB")
    model = make_model()
    with pytest.raises(lms.LMSError, match="LMS_LIMIT=1.00 KiB is too small for module '0'.*raise "
                       "LMS_LIMIT to at least"):  # fmt: skip
        lms.enable(model, weights=True, min_size=0)
    assert_untouched(model)
    monkeypatch.delenv("LMS_LIMIT")
    assert_enables_again(model)


def test_the_host_cap_hit_with_weight_paging_raises_once_and_training_goes_on():
    # The root's always_call post-hook used to prefetch for the backward of a forward
    # that had just raised, hit the cap again, and torch warned that it silenced it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    reference = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    reference.load_state_dict(model.state_dict())
    x = torch.randn(256, 64)
    handle = lms.enable(model, limit=0, min_size=0, weights=True, host_limit="160KiB")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(lms.LMSError, match="host memory cap reached"):
            model(x).sum().backward()
    model(x[:8]).sum().backward()
    reference(x[:8]).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    handle.remove()
    assert_untouched(model)
