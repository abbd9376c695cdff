"""The one error type LMS raises for bad input and for memory it cannot manage."""

from __future__ import annotations

__all__ = ["LMSError"]


class LMSError(RuntimeError):
    """Raised by :mod:`lms` for bad settings and for memory it cannot fit.

    The message always names the setting to change (``limit``, ``min_size``,
    ``host_limit``, ...) and the numbers that matter. It subclasses
    ``RuntimeError`` so that code which already catches PyTorch's runtime errors
    keeps working.

    Example:
        >>> import lms
        >>> try:
        ...     lms.LMSConfig(limit="-1GiB")
        ... except lms.LMSError as e:
        ...     print("bad limit")
        bad limit
    """
