"""Framework independence: torch tensors, NumPy arrays and CuPy arrays as one flat tensor.

NumPy arrays become torch tensors through ``torch.from_numpy`` and anything else that
speaks DLPack (CuPy, JAX, ...) through ``torch.from_dlpack``; both share memory, so the
reduction writes straight into the caller's array. A copy is made only when the memory
cannot be viewed as one contiguous run in row-major order (transposed, Fortran-order,
strided or negatively strided arrays) or holds another byte order than the machine's; the
result is then copied back, so in-place semantics hold either way. Every rank thus reduces
its elements in the same logical order, whatever each one's layout. CuPy is never imported.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import DDLError

__all__ = ["SUPPORTED_DTYPES", "as_flat_tensor"]

# Dtypes every algorithm reduces (sum); "mean" additionally needs a floating dtype.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
)


def _to_torch(x: Any, what: str) -> tuple[torch.Tensor, Callable[[], None] | None]:
    if isinstance(x, torch.Tensor):
        if x.is_nested or x.layout != torch.strided:
            # No strides to view as one run (stride() raises or misleads), and a sparse
            # tensor's indices may differ between ranks, so no elementwise sum exists.
            kind = "nested" if x.is_nested else str(x.layout).replace("torch.", "")
            raise DDLError(
                f"{what}: {kind} tensors are not supported; reduce a dense tensor "
                "(x.to_dense(), or the nested tensor's components one by one)"
            )
        return x.detach(), None  # same storage; in-place writes bypass autograd on purpose
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:
            raise DDLError(
                f"{what}: the NumPy array is read-only; pass a writable array (x.copy())"
            )
        if any(s < 0 for s in x.strides) or not x.dtype.isnative:
            # torch can view neither negative strides nor another byte order than the
            # machine's ('>f4' on x86): reduce a native copy and write it back after
            # (np.copyto swaps the bytes back).
            copy = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
            return _from_numpy(copy, what), lambda: np.copyto(x, copy)
        return _from_numpy(x, what), None
    if hasattr(x, "__dlpack__"):
        try:
            return torch.from_dlpack(_Exporter(x, what)), None
        except DDLError:
            raise
        except Exception as e:
            raise DDLError(f"{what}: could not view {type(x).__name__} through DLPack ({e})") from e
    raise DDLError(
        f"{what} got a {type(x).__name__}; pass a torch.Tensor, a NumPy array or a CuPy "
        "array (anything with __dlpack__)"
    )


class _DLPackHead(ctypes.Structure):
    """The start of DLPack 1.x's ``DLManagedTensorVersioned``, up to its ``flags``."""

    _fields_ = [
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
    ]


_DLPACK_READ_ONLY = 1  # DLPACK_FLAG_BITMASK_READ_ONLY
_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype, _capsule_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


class _Exporter:
    """Stands in for ``x`` in ``torch.from_dlpack`` and refuses a read-only export.

    torch ignores DLPack 1.x's read-only flag and returns a writable tensor over the
    producer's memory (a read-only NumPy array, an immutable ``bytes`` buffer), which the
    reduction would then overwrite. torch still negotiates the call (version, stream,
    device); this only looks at the capsule it gets back, before torch consumes it.
    """

    def __init__(self, x: Any, what: str):
        self._x = x
        self._what = what

    def __dlpack_device__(self) -> Any:
        return self._x.__dlpack_device__()

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        capsule = self._x.__dlpack__(*args, **kwargs)
        name = _capsule_name(capsule)
        if name == b"dltensor_versioned":
            head = _DLPackHead.from_address(_capsule_pointer(capsule, name))
            if head.flags & _DLPACK_READ_ONLY:
                # The unconsumed capsule's destructor releases the export.
                raise DDLError(
                    f"{self._what}: the {type(self._x).__name__} is read-only (its DLPack "
                    "export says so); pass a writable array (a copy)"
                )
        return capsule


def _overlaps(t: torch.Tensor) -> bool:
    """True when two elements of ``t`` are one memory location (a stride 0 over size > 1)."""
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)) and t.numel() > 1


def _from_numpy(a: np.ndarray, what: str) -> torch.Tensor:
    try:
        return torch.from_numpy(a)
    except TypeError as e:
        raise DDLError(f"{what}: NumPy dtype {a.dtype} has no torch equivalent ({e})") from e


def as_flat_tensor(x: Any, what: str) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """A contiguous 1-D tensor over ``x``'s data, and how to write results back (or None).

    Args:
        x: a torch tensor, NumPy array or DLPack-capable array (CuPy).
        what: the caller's name for error messages, e.g. ``"ddl.allreduce"``.

    Returns:
        ``(flat, finish)``: ``flat`` shares memory with ``x`` when possible; otherwise it is
        a copy and ``finish()`` must run after the reduction to copy the result into ``x``.

    Raises:
        DDLError: unsupported type or dtype, or a read-only array.

    Example:
        >>> import numpy as np
        >>> from ddl.interop import as_flat_tensor
        >>> a = np.arange(6.0).reshape(2, 3)
        >>> flat, finish = as_flat_tensor(a, "demo")
        >>> _ = flat.mul_(2)  # writes straight into a: no copy, nothing to finish
        >>> finish is None, a[1].tolist()
        (True, [6.0, 8.0, 10.0])
    """
    t, finish = _to_torch(x, what)
    if _overlaps(t):
        # Checked here, before any message moves: writing the result back into such a
        # tensor fails on the worker, after the collective, where any error reads as a
        # failed transport and stops ddl for good (ddl/group.py NOTE rule 4).
        raise DDLError(
            f"{what}: the {type(x).__name__} has elements that share memory (e.g. made by "
            "expand() or broadcast_to), so no in-place result exists; pass a copy "
            "(x.clone() / x.copy())"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise DDLError(f"{what}: dtype {t.dtype} is not supported; use one of {names}")
    if finish is not None:
        return t.view(-1), finish
    if t.is_contiguous() and not t.is_neg():
        return t.view(-1), None
    # A negated view (z.conj().imag holds -imag lazily, with the neg bit) must be copied
    # too, even when contiguous: the backend and the rings read its raw memory, which
    # holds +imag, and a native all_reduce works on a resolved copy it never writes back.
    flat = t.resolve_neg().contiguous().view(-1)
    return flat, lambda: t.copy_(flat.view_as(t))
