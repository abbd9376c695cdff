"""LMS settings: the config dataclass, size parsing and environment overrides.

Sizes are parsed here and nowhere else (``parse_size``), and the environment
variables ``LMS_LIMIT``, ``LMS_MIN_SIZE`` and ``LMS_DISABLE`` are applied here
and nowhere else (``resolve_config``), so every entry point agrees on them.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

from .errors import LMSError

__all__ = [
    "DEFAULT_HOST_FRACTION",
    "DEFAULT_LIMIT_FRACTION",
    "format_bytes",
    "LMSConfig",
    "Size",
    "parse_size",
    "physical_memory",
    "resolve_config",
]

Size = int | float | str

KiB = 1024
MiB = 1024**2
GiB = 1024**3

# Like IBM LMS's later default (95% of the device), but leaving a little more
# headroom for the allocator's fragmentation and for cuBLAS/cuDNN workspaces.
DEFAULT_LIMIT_FRACTION = 0.9
# Pinned memory cannot be swapped by the OS; holding more than half of RAM in
# it starves the rest of the machine (data loaders, the page cache).
DEFAULT_HOST_FRACTION = 0.5

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": KiB,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": MiB,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": GiB,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*$")
_WEIGHTS = ("auto", True, False)
# What a fractional setting is a fraction of, where it is not the device's memory.
_FRACTION_OF = {"host_limit": "the host's RAM"}


def _normalize_size(value: object, name: str, allow_fraction: bool) -> int | float:
    """Bytes as an ``int``, or a fraction in [0, 1] as a ``float``; LMSError otherwise."""
    hint = "give bytes as an int, a string with units such as '20GiB' or '512MB'" + (
        f", or a float in (0, 1] for a fraction of {_FRACTION_OF.get(name, 'the device')}"
        if allow_fraction
        else ""
    )
    # numbers.Integral/Real rather than int/float: sizes computed with NumPy
    # (np.int64, np.float32) are sizes too. A bool is an Integral but never a size.
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise LMSError(f"{name}={value!r} is not a size; {hint}")
    if isinstance(value, numbers.Integral):
        value = int(value)  # stored normalized: a plain int, whatever the input type
        if value < 0:
            raise LMSError(f"{name}={value} is negative; {hint}")
        return value
    if isinstance(value, numbers.Real):
        value = float(value) + 0.0  # + 0.0 turns -0.0 into 0.0
        if not allow_fraction:
            if math.isfinite(value) and value >= 0 and value == int(value):
                return int(value)
            raise LMSError(f"{name}={value!r} is not a whole number of bytes; {hint}")
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise LMSError(f"{name}={value!r} is not a fraction in (0, 1]; {hint}")
        return value
    m = _SIZE_RE.match(value)
    if m is None:
        raise LMSError(f"{name}={value!r} cannot be parsed; {hint}")
    number, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(number):  # "1e400" overflows to inf
        raise LMSError(f"{name}={value!r} is too large to be a size; {hint}")
    if unit == "%":
        if not allow_fraction or number > 100:
            raise LMSError(f"{name}={value!r} is not a percentage in (0, 100]; {hint}")
        return number / 100
    if unit not in _UNITS:
        raise LMSError(f"{name}={value!r} has an unknown unit {m.group(2)!r}; {hint}")
    literal = m.group(1)
    if unit == "" and ("." in literal or not number.is_integer()):
        # A bare "0.8" or "1e-3" (typically from LMS_LIMIT or LMS_MIN_SIZE) means what
        # the float means: a fraction where one is allowed, else whole bytes or an error.
        # Truncating it instead made "0.5" for min_size 0 bytes (swap everything).
        return _normalize_size(number, name, allow_fraction)
    if literal.isdigit():  # exact, also beyond a float's 53 bits
        return int(literal) * _UNITS[unit]
    nbytes = number * _UNITS[unit]
    if nbytes != int(nbytes) and (unit == "b" or nbytes < 1):
        # "1.5B" is no size, and "0.5B" would truncate to 0, which means "swap every
        # tensor" for limit; fractions of a byte from a larger unit ("1.1KiB") round down.
        raise LMSError(f"{name}={value!r} is not a whole number of bytes; {hint}")
    return int(nbytes)


def parse_size(
    value: Size, total: int | None = None, *, name: str = "size", allow_fraction: bool = True
) -> int:
    """Parse a memory size into bytes.

    Args:
        value: an int (bytes), a string with units (``"20GiB"``, ``"512MB"``,
            ``"1.5 GB"``, ``"90%"``; KB/MB/GB are powers of 1000 and KiB/MiB/GiB
            powers of 1024), or a float in [0, 1] meaning that fraction of ``total``.
            A string without a unit means what the number means: ``"4096"`` and
            ``"1e3"`` are bytes, ``"0.8"`` and ``"1e-3"`` fractions. A size must come to
            whole bytes: ``"1.5B"`` and ``"0.5B"`` are refused, not truncated.
        total: the bytes a fraction refers to (the device's or the host's memory).
        name: the setting's name, used in error messages.
        allow_fraction: whether a fraction is meaningful for this setting.

    Returns:
        The size in bytes.

    Raises:
        LMSError: on a negative, unparsable or out-of-range value, or a fraction
            without a ``total``.

    Example:
        >>> parse_size("1.5 GiB")
        1610612736
        >>> parse_size(0.5, total=1000)
        500
    """
    v = _normalize_size(value, name, allow_fraction)
    if isinstance(v, float):
        if total is None:
            raise LMSError(f"{name}={value!r} is a fraction but no total is known; give bytes")
        return int(v * total)
    return v


# Where a container's memory limit is (cgroup v2, then v1). Inside a container the
# OS reports the host's RAM, but the process is killed at the cgroup's limit.
_CGROUP_MEMORY_LIMITS = (
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
)


def _cgroup_memory_limit() -> int:
    """The memory limit of this process's cgroup in bytes (0 if none or unreadable)."""
    for path in _CGROUP_MEMORY_LIMITS:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit; v1 says so with a huge number
            return int(text)
    return 0


def physical_memory() -> int:
    """Bytes of RAM this process may use (0 if the OS does not say).

    The machine's physical RAM, or the container's memory limit (cgroup) where that
    is lower: the defaults that are fractions of RAM (``host_limit``, a CPU
    ``limit``) must stop LMS before the container's limit kills the process.
    """
    try:
        total = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        total = 0
    limit = _cgroup_memory_limit()
    if limit and (not total or limit < total):
        return limit
    return total


def format_bytes(n: float | None) -> str:
    """Human-readable bytes with binary units, e.g. ``'1.50 GiB'``."""
    if n is None:
        return "n/a"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class LMSConfig:
    """Settings of one ``lms.enable`` call, validated and normalized on construction.

    Sizes are stored normalized: an ``int`` is bytes, a ``float`` is a fraction
    of the device's (``limit``) or the host's (``host_limit``) total memory,
    resolved against the real device by :meth:`limit_bytes` and
    :meth:`host_limit_bytes`.

    Attributes:
        limit: device memory budget. Saved activations (and, with weight paging,
            parameter state) stay on the device while it holds; beyond it LMS
            swaps out what is needed furthest in the future. ``0`` swaps every
            eligible tensor (keep nothing that can move; not a budget). A positive
            limit smaller than one paged module's parameters plus gradients raises
            ``LMSError`` at enable. ``None`` means ``DEFAULT_LIMIT_FRACTION`` (0.9) of the
            device. Overridden by ``LMS_LIMIT``.
        min_size: tensors whose storage is smaller than this are never swapped
            (the copy's latency would cost more than the memory is worth).
            Default 1 MiB. Overridden by ``LMS_MIN_SIZE``.
        weights: page parameters, gradients and optimizer state too: ``"auto"``
            (only when they do not fit under the limit), ``True`` or ``False``.
        host_limit: cap on the pinned host memory LMS may hold; exceeding it raises
            ``LMSError`` rather than letting the machine run out of memory. ``None``
            means ``DEFAULT_HOST_FRACTION`` (0.5) of physical RAM, or of the container's
            memory limit where that is lower.
        lookahead: swapped tensors prefetched ahead of their use in backward even
            when the limit leaves no room (so that copies still overlap compute at
            ``limit=0``); beyond this the lookahead is bounded by the limit.
        enabled: ``False`` turns LMS into a no-op (``LMS_DISABLE=1``).

    Example:
        >>> cfg = LMSConfig(limit="20GiB", min_size="1MiB")
        >>> cfg.limit, cfg.min_size
        (21474836480, 1048576)
    """

    limit: Size | None = None
    min_size: Size = MiB
    weights: bool | str = "auto"
    host_limit: Size | None = None
    lookahead: int = 1
    enabled: bool = True
    # The fields whose value came from an environment variable (set by resolve_config),
    # so that a value refused only later, against the device, names the variable to
    # change rather than an argument the user may not have passed. Not a field: it is
    # where a value came from, not a setting.
    # (field, variable) pairs: a tuple, so that the config still pickles and deep-copies.
    _env_vars: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __post_init__(self) -> None:
        limit = DEFAULT_LIMIT_FRACTION if self.limit is None else self.limit
        object.__setattr__(self, "limit", _normalize_size(limit, "limit", True))
        min_size = _normalize_size(self.min_size, "min_size", False)
        object.__setattr__(self, "min_size", min_size)
        host = DEFAULT_HOST_FRACTION if self.host_limit is None else self.host_limit
        object.__setattr__(self, "host_limit", _normalize_size(host, "host_limit", True))
        if not (self.weights is True or self.weights is False or self.weights == "auto"):
            raise LMSError(f"weights={self.weights!r} must be 'auto', True or False")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, numbers.Integral):
            raise LMSError(f"lookahead={self.lookahead!r} must be an int >= 0")
        object.__setattr__(self, "lookahead", int(self.lookahead))
        if self.lookahead < 0:
            raise LMSError(f"lookahead={self.lookahead} must be >= 0")
        if not isinstance(self.enabled, bool):
            raise LMSError(f"enabled={self.enabled!r} must be True or False")

    def name_of(self, field: str) -> str:
        """What the user set ``field`` with: its environment variable, or the argument.

        Example:
            >>> LMSConfig(limit="1GiB").name_of("limit")
            'limit'
        """
        return dict(self._env_vars).get(field, field)

    def limit_bytes(self, device_total: int) -> int:
        """The limit in bytes on a device with ``device_total`` bytes.

        Raises:
            LMSError: if the limit is larger than the device, or a fraction of a device
                that does not report its size (``device_total`` 0).
        """
        var = dict(self._env_vars).get("limit")
        if not device_total and isinstance(self.limit, float):
            # 0 means the device did not say; a fraction of it would be limit 0, which
            # silently means "swap every tensor".
            raise LMSError(
                f"limit={self.limit!r} is a fraction of the device's memory, but this device "
                f"does not report its size; give {var or 'limit'} in bytes, e.g. '20GiB'"
            )
        limit = parse_size(self.limit, device_total, name=var or "limit")
        if device_total and limit > device_total:
            source = f" (from the environment variable {var})" if var else ""
            raise LMSError(
                f"limit {format_bytes(limit)}{source} is larger than the device's "
                f"{format_bytes(device_total)}; lower {var or 'limit'} (a float such as 0.9 "
                "means a fraction of the device)"
            )
        return limit

    def host_limit_bytes(self, host_total: int | None = None) -> int:
        """The pinned-host cap in bytes (``host_total`` defaults to ``physical_memory()``).

        Raises:
            LMSError: if the cap is larger than the RAM, or a fraction and the RAM is
                unknown (``host_total`` 0).
        """
        total = physical_memory() if host_total is None else host_total
        if not total and isinstance(self.host_limit, float):
            # As in limit_bytes: a fraction of an unknown total would be a cap of 0 bytes,
            # failing at the first swap with a message about a 0 B host_limit.
            raise LMSError(
                f"host_limit={self.host_limit!r} is a fraction of the host's RAM, but this "
                "machine does not report its RAM; give host_limit in bytes, e.g. '64GiB'"
            )
        cap = parse_size(self.host_limit, total, name="host_limit")
        if total and cap > total:
            # A cap the machine cannot reach caps nothing: the machine would run out of
            # memory first, which is what host_limit is there to prevent.
            raise LMSError(
                f"host_limit {format_bytes(cap)} is larger than this machine's "
                f"{format_bytes(total)} of RAM, so it would not stop LMS before the machine "
                "runs out; lower host_limit (a float such as 0.5 means a fraction of RAM)"
            )
        return cap


def _env_flag(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise LMSError(f"LMS_DISABLE={value!r} is not understood; use LMS_DISABLE=1 or unset it")


def resolve_config(
    limit: Size | None = None,
    min_size: Size | None = None,
    *,
    weights: bool | str | None = None,
    host_limit: Size | None = None,
    lookahead: int | None = None,
    config: LMSConfig | None = None,
    env: Mapping[str, str] | None = None,
) -> LMSConfig:
    """Build the effective config: ``config`` (or defaults), then arguments, then env.

    Environment variables win over arguments so that a script can be tuned
    without edits: ``LMS_LIMIT`` and ``LMS_MIN_SIZE`` take the same forms as the
    arguments, ``LMS_DISABLE=1`` turns LMS off.

    Args:
        limit, min_size, weights, host_limit, lookahead: override ``config``'s fields
            when not ``None``.
        config: a base config (defaults if ``None``).
        env: the environment to read (``os.environ`` if ``None``).

    Returns:
        The validated config.

    Raises:
        LMSError: on any invalid setting, naming the environment variable when the
            bad value came from there.

    Example:
        >>> resolve_config(limit="2GiB", env={"LMS_LIMIT": "1GiB"}).limit
        1073741824
    """
    env = os.environ if env is None else env
    cfg = config if config is not None else LMSConfig()
    if not isinstance(cfg, LMSConfig):
        raise LMSError(f"config must be an lms.LMSConfig, got {type(cfg).__name__}")
    fields = {
        k: v
        for k, v in (
            ("limit", limit),
            ("min_size", min_size),
            ("weights", weights),
            ("host_limit", host_limit),
            ("lookahead", lookahead),
        )
        if v is not None
    }
    cfg = replace(cfg, **fields)
    from_env = {}
    for var, field in (("LMS_LIMIT", "limit"), ("LMS_MIN_SIZE", "min_size")):
        raw = env.get(var)
        if raw is not None and raw.strip():
            try:
                cfg = replace(cfg, **{field: raw.strip()})
            except LMSError as e:
                raise LMSError(f"environment variable {var}: {e}") from None
            from_env[field] = var
    if "LMS_DISABLE" in env and _env_flag(env["LMS_DISABLE"]):
        cfg = replace(cfg, enabled=False)
    if from_env:  # after the last replace(), which would drop it
        object.__setattr__(cfg, "_env_vars", tuple(from_env.items()))
    return cfg
