"""``wrap``'s configuration: one documented dataclass, sizes parsed in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import DDLError
from .topology import CHOICES

__all__ = ["WrapConfig", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
}


def parse_size(value: int | float | str, what: str = "size") -> int:
    """Bytes from an int or a string like ``"25MiB"``, ``"1.5GiB"``, ``"512KB"``.

    Args:
        value: bytes (int) or a number with a unit (B, KB, MB, GB, KiB, MiB, GiB).
        what: the setting's name, for the error message.

    Returns:
        A positive number of bytes.

    Raises:
        DDLError: anything else, saying what would have been accepted.

    Example:
        >>> parse_size("25MiB"), parse_size(4096)
        (26214400, 4096)
    """
    if isinstance(value, bool):
        raise DDLError(f"{what}={value!r} is not a size; use bytes or a string like '25MiB'")
    if isinstance(value, (int, float)):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise DDLError(
                f"{what}={value!r} is not a size; use bytes or a number with one of the units "
                "B, KB, MB, GB, KiB, MiB, GiB (e.g. '25MiB')"
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise DDLError(f"{what}={value!r} is not a size; use bytes or a string like '25MiB'")
    if n <= 0:
        raise DDLError(f"{what}={value!r} must be positive")
    return n


@dataclass(frozen=True)
class WrapConfig:
    """How ``ddl.wrap`` groups and reduces gradients.

    Attributes:
        bucket_size: bytes per gradient bucket (int or "25MiB"); bigger buckets mean fewer,
            more efficient collectives but a later start of the first one. 25 MiB is
            DDP's default.
        first_bucket_size: cap of the first bucket (the last layers' gradients, ready
            first), so communication starts early in backward; DDP uses 1 MiB.
        algorithm: "native", "ring", "multiring", "hierarchical" or "auto" (resolved per
            bucket size by ``ddl.costmodel.choose_algorithm``).
        broadcast: copy rank 0's parameters and buffers to every rank at wrap time, as
            DDP does on construction, so all replicas start equal.
        broadcast_buffers: as DDP's option of that name: before a forward that follows a
            training forward (grad enabled, outside ``no_sync()``), copy rank 0's buffers
            (e.g. BatchNorm running statistics) to every rank. A collective in forward:
            every rank must run the same forwards. No buffers, no cost.

    Example:
        >>> WrapConfig(bucket_size="4MiB").bucket_bytes
        4194304
    """

    bucket_size: int | str = "25MiB"
    first_bucket_size: int | str = "1MiB"
    algorithm: str = "auto"
    broadcast: bool = True
    broadcast_buffers: bool = True

    def __post_init__(self) -> None:
        parse_size(self.bucket_size, "bucket_size")
        parse_size(self.first_bucket_size, "first_bucket_size")
        if self.algorithm not in CHOICES:
            raise DDLError(
                f"algorithm={self.algorithm!r} is unknown; use one of {', '.join(CHOICES)}"
            )

    @property
    def bucket_bytes(self) -> int:
        """``bucket_size`` in bytes."""
        return parse_size(self.bucket_size, "bucket_size")

    @property
    def first_bucket_bytes(self) -> int:
        """``first_bucket_size`` in bytes, never above ``bucket_size``."""
        return min(parse_size(self.first_bucket_size, "first_bucket_size"), self.bucket_bytes)
