"""Settings: size parsing, config validation, environment overrides (all pure, no model)."""

import pytest

from lms import LMSConfig, LMSError, parse_size
from lms.config import DEFAULT_LIMIT_FRACTION, MiB, format_bytes, resolve_config


@pytest.mark.parametrize(
    "value, want",
    [
        (0, 0),
        (123, 123),
        ("20GiB", 20 * 1024**3),
        ("512MB", 512 * 1000**2),
        ("1.5 GB", 1_500_000_000),
        ("1.5 GiB", 1610612736),
        ("1MiB", MiB),
        ("4096", 4096),
        ("2 k", 2000),
        (0.5, 500),
        ("0.25", 250),
        ("90%", 900),
        (1.0, 1000),
    ],
)
def test_parse_size_accepts_the_documented_forms(value, want):
    assert parse_size(value, total=1000) == want


@pytest.mark.parametrize(
    "value", [-1, "-1GiB", "abc", "12 parsecs", "", 1.5, -0.1, float("nan"), True, None, [1]]
)
def test_parse_size_rejects_nonsense_with_our_error(value):
    with pytest.raises(LMSError, match="limit"):
        parse_size(value, total=1000, name="limit")


def test_a_fraction_needs_a_total_and_min_size_takes_no_fraction():
    with pytest.raises(LMSError, match="fraction"):
        parse_size(0.5)
    with pytest.raises(LMSError, match="min_size"):
        LMSConfig(min_size=0.5)
    assert LMSConfig(min_size=2048.0).min_size == 2048


def test_config_normalizes_and_defaults():
    cfg = LMSConfig(limit="2GiB", min_size="4MiB")
    assert cfg.limit == 2 * 1024**3 and cfg.min_size == 4 * MiB
    d = LMSConfig()
    assert d.limit == DEFAULT_LIMIT_FRACTION and d.min_size == MiB and d.weights == "auto"
    assert d.limit_bytes(1000) == int(1000 * DEFAULT_LIMIT_FRACTION)
    assert d.host_limit_bytes(host_total=100) == 50
    assert LMSConfig(host_limit="1GiB").host_limit_bytes(host_total=2 * 1024**3) == 1024**3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weights": "sometimes"}, "weights"),
        ({"weights": 1}, "weights"),
        ({"lookahead": -1}, "lookahead"),
        ({"lookahead": True}, "lookahead"),
        ({"enabled": "yes"}, "enabled"),
        ({"host_limit": "-3GB"}, "host_limit"),
    ],
)
def test_config_rejects_bad_fields(kwargs, field):
    with pytest.raises(LMSError, match=field):
        LMSConfig(**kwargs)


def test_limit_larger_than_the_device_is_refused():
    with pytest.raises(LMSError, match="larger than the device"):
        LMSConfig(limit="2GiB").limit_bytes(device_total=1024**3)
    assert LMSConfig(limit=1.0).limit_bytes(device_total=1024**3) == 1024**3


def test_environment_overrides_arguments():
    env = {"LMS_LIMIT": "1GiB", "LMS_MIN_SIZE": "64KiB"}
    cfg = resolve_config(limit="8GiB", min_size="1MiB", env=env)
    assert cfg.limit == 1024**3 and cfg.min_size == 64 * 1024 and cfg.enabled
    assert resolve_config(env={"LMS_LIMIT": "0.5"}).limit == 0.5
    assert not resolve_config(env={"LMS_DISABLE": "1"}).enabled
    assert resolve_config(env={"LMS_DISABLE": "0"}).enabled
    assert resolve_config(env={}).limit == DEFAULT_LIMIT_FRACTION


@pytest.mark.parametrize(
    "env, var",
    [
        ({"LMS_LIMIT": "lots"}, "LMS_LIMIT"),
        ({"LMS_MIN_SIZE": "-1"}, "LMS_MIN_SIZE"),
        ({"LMS_DISABLE": "maybe"}, "LMS_DISABLE"),
    ],
)
def test_bad_environment_values_name_the_variable(env, var):
    with pytest.raises(LMSError, match=var):
        resolve_config(env=env)


def test_base_config_is_overridden_by_arguments():
    base = LMSConfig(limit="1GiB", min_size=0, weights=False)
    cfg = resolve_config(min_size="2MiB", config=base, env={})
    assert cfg.limit == 1024**3 and cfg.min_size == 2 * MiB and cfg.weights is False
    with pytest.raises(LMSError, match="LMSConfig"):
        resolve_config(config={"limit": 1}, env={})


def test_format_bytes():
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 1024**3) == "3.00 GiB"
    assert format_bytes(None) == "n/a"


def test_numpy_numbers_are_sizes_and_are_stored_as_plain_python_numbers():
    # Sizes computed with NumPy (np.int64 from a product of shapes, np.float32 from an
    # array) were refused as "not a size", np.float64 was kept as np.float64, and -0.0
    # was kept as -0.0 (printed as such in the config).
    np = pytest.importorskip("numpy")
    cfg = LMSConfig(limit=np.int64(2 * MiB), min_size=np.int32(4096), host_limit=np.float32(0.5))
    assert cfg.limit == 2 * MiB and type(cfg.limit) is int
    assert cfg.min_size == 4096 and type(cfg.min_size) is int
    assert cfg.host_limit == 0.5 and type(cfg.host_limit) is float
    assert type(LMSConfig(limit=np.float64(0.5)).limit) is float
    assert LMSConfig(lookahead=np.int64(3)).lookahead == 3
    assert type(LMSConfig(lookahead=np.int64(3)).lookahead) is int
    assert str(LMSConfig(limit=-0.0).limit) == "0.0"
    assert parse_size(np.uint64(1000)) == 1000
    for bad in (np.int64(-1), np.bool_(True), np.float64(np.nan)):
        with pytest.raises(LMSError, match="limit"):
            LMSConfig(limit=bad)
    with pytest.raises(LMSError, match="lookahead"):
        LMSConfig(lookahead=np.int64(-1))


@pytest.mark.parametrize(
    "value, want",
    [
        ("1e-3", 0.001),  # a bare non-integer is what the float means: a fraction
        ("1e3", 1000),  # an integer literal is bytes
        ("1.0", 1.0),
        ("1e3MiB", 1000 * MiB),
        ("1.1KiB", 1126),  # a fraction of a byte from a larger unit rounds down
        ("123456789012345678901", 123456789012345678901),  # exact beyond 2**53
    ],
)
def test_bare_and_unit_strings_mean_what_they_say(value, want):
    got = LMSConfig(limit=value).limit
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value", ["0.5b", "1.5 B", "0.0001KB", "1e-3"])
def test_fractional_bytes_are_refused_not_truncated(value):
    # These parsed to int(number * unit): "0.5b" and "1e-3" became limit 0 (swap every
    # tensor), "0.5" for min_size became 0 bytes, silently.
    with pytest.raises(LMSError, match="min_size.*whole number of bytes"):
        LMSConfig(min_size=value)
    if value != "1e-3":
        with pytest.raises(LMSError, match="limit.*whole number of bytes"):
            LMSConfig(limit=value)


def test_a_bare_decimal_for_min_size_is_bytes_or_an_error_naming_the_variable():
    assert resolve_config(env={"LMS_MIN_SIZE": "2048.0"}).min_size == 2048
    with pytest.raises(LMSError, match="LMS_MIN_SIZE.*whole number of bytes"):
        resolve_config(env={"LMS_MIN_SIZE": "0.5"})


def test_a_fraction_of_an_unknown_total_is_refused_not_taken_as_zero():
    # device_total_memory and physical_memory return 0 when the device or OS does not
    # say; a fraction of 0 became limit 0 (swap every tensor) or a host cap of 0 bytes.
    with pytest.raises(LMSError, match="does not report its size.*limit in bytes"):
        LMSConfig().limit_bytes(device_total=0)
    with pytest.raises(LMSError, match="does not report its RAM.*host_limit in bytes"):
        LMSConfig().host_limit_bytes(host_total=0)
    assert LMSConfig(limit="1GiB").limit_bytes(device_total=0) == 1024**3
    assert LMSConfig(host_limit="1GiB").host_limit_bytes(host_total=0) == 1024**3
    with pytest.raises(LMSError, match="LMS_LIMIT in bytes"):
        resolve_config(env={"LMS_LIMIT": "0.5"}).limit_bytes(device_total=0)


def test_a_bad_host_limit_fraction_says_it_is_a_fraction_of_host_ram():
    with pytest.raises(LMSError, match="fraction of the host's RAM"):
        LMSConfig(host_limit=1.5)
    with pytest.raises(LMSError, match="fraction of the device"):
        LMSConfig(limit=1.5)


def test_a_host_limit_above_the_ram_is_refused():
    # It was accepted, and a cap the machine cannot reach does not stop LMS before the
    # machine runs out of memory, which is the one thing host_limit promises.
    with pytest.raises(LMSError, match="host_limit 1.00 GiB is larger than .*RAM"):
        LMSConfig(host_limit="1GiB").host_limit_bytes(host_total=10)
    assert LMSConfig(host_limit=1.0).host_limit_bytes(host_total=10) == 10


def test_a_containers_memory_limit_bounds_the_ram_that_fractions_refer_to(tmp_path, monkeypatch):
    # physical_memory read only sysconf, which reports the host's RAM inside a
    # container: the default host_limit (half of it) could exceed the container's
    # limit, so the process was killed before LMS's cap raised its error.
    import lms.config as config

    machine = config.physical_memory()
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(config, "_CGROUP_MEMORY_LIMITS", (str(v2), str(v1)))
    assert config.physical_memory() == machine  # neither file: the machine's RAM
    v2.write_text("max\n")
    v1.write_text("9223372036854771712\n")  # v1's "no limit"
    assert config.physical_memory() == machine
    v2.write_text(f"{1024**3}\n")
    assert config.physical_memory() == 1024**3
    assert LMSConfig().host_limit_bytes() == 1024**3 // 2
    with pytest.raises(LMSError, match="host_limit 2.00 GiB is larger"):
        LMSConfig(host_limit="2GiB").host_limit_bytes()
    v2.unlink()
    v1.write_text(f"{3 * 1024**3}\n")
    assert config.physical_memory() == min(machine, 3 * 1024**3)


def test_a_config_from_the_environment_pickles_and_copies():
    # Where a value came from was kept in a mappingproxy, which cannot be pickled:
    # copy.deepcopy and pickle of handle.config failed whenever LMS_LIMIT was set.
    import copy
    import pickle

    cfg = resolve_config(limit="1GiB", env={"LMS_LIMIT": "2GiB", "LMS_MIN_SIZE": "4KiB"})
    for clone in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg), copy.copy(cfg)):
        assert clone == cfg and clone.limit == 2 * 1024**3
        with pytest.raises(LMSError, match="LMS_LIMIT"):
            clone.limit_bytes(device_total=1024**3)
