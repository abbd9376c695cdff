"""The one error type of ``ddl``: every bad input or failed collective raises :class:`DDLError`."""

from __future__ import annotations

__all__ = ["DDLError"]


class DDLError(RuntimeError):
    """Raised for misuse of ``ddl`` or a failed collective; the message says what to do.

    It subclasses ``RuntimeError`` so that code which already catches the errors of
    ``torch.distributed`` also catches ours.

    Example:
        >>> import ddl, torch
        >>> try:  # doctest: +ELLIPSIS
        ...     ddl.allreduce(torch.ones(2))  # before ddl.init()
        ... except ddl.DDLError as e:
        ...     print(isinstance(e, RuntimeError), e)
        True ddl is not initialised: call ddl.init() first (launch with torchrun, ...
    """
