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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import DDLError

__all__ = ["SUPPORTED_DTYPES", "FlatArray", "as_flat_tensor", "flat_array"]

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


def _to_torch(x: Any, what: str) -> torch.Tensor | None:
    """A torch view of ``x``'s memory, or None for a NumPy array torch cannot view."""
    if isinstance(x, torch.Tensor):
        if x.is_nested or x.layout != torch.strided:
            # No strides to view as one run (stride() raises or misleads), and a sparse
            # tensor's indices may differ between ranks, so no elementwise sum exists.
            kind = "nested" if x.is_nested else str(x.layout).replace("torch.", "")
            raise DDLError(
                f"{what}: {kind} tensors are not supported; reduce a dense tensor "
                "(x.to_dense(), or the nested tensor's components one by one)"
            )
        return x.detach()  # same storage; in-place writes bypass autograd on purpose
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:
            raise DDLError(
                f"{what}: the NumPy array is read-only; pass a writable array (x.copy())"
            )
        size = x.dtype.itemsize
        if any(s < 0 or s % size for s in x.strides) or not x.dtype.isnative:
            # torch can view neither negative strides, nor strides that are not whole
            # elements (a field of a packed record array: ('a', f4), ('b', i1) has
            # stride 5), nor another byte order than the machine's ('>f4' on x86): the
            # caller reduces a native copy (flat_array).
            return None
        return _from_numpy(x, what)
    if hasattr(x, "__dlpack__"):
        try:
            return torch.from_dlpack(_Exporter(x, what))
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
    except ValueError as e:  # a layout torch cannot view that _to_torch did not foresee
        raise DDLError(f"{what}: torch cannot view this NumPy array; pass np.copy(x) ({e})") from e


@dataclass(frozen=True)
class FlatArray:
    """An array as one flat, contiguous tensor, made when the collective runs.

    Attributes:
        shape: the caller's array's shape (for the cross-rank check).
        dtype: the flat tensor's torch dtype.
        device: where it lives.
        numel: its number of elements.
        inference: whether the caller's tensor was made under ``torch.inference_mode``
            (it may then be written only inside that mode).
        load: returns the flat tensor: a view of the caller's memory, or a copy of its
            values at that moment.
        store: for a copy, writes a loaded flat tensor's values back into the caller's
            array; None when ``load`` returns a view.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    numel: int
    inference: bool
    load: Callable[[], torch.Tensor]
    store: Callable[[torch.Tensor], None] | None


def flat_array(x: Any, what: str) -> FlatArray:
    """Check ``x`` now and say how to view it as one flat tensor later.

    The copy that a strided, negated or byte-swapped array needs is made by ``load``,
    when the collective's turn comes, not here: a collective queued behind another one
    on the same memory then reduces the values that one left, as it does for a
    contiguous tensor, which is read in place when its turn comes.

    Args:
        x: a torch tensor, NumPy array or DLPack-capable array (CuPy).
        what: the caller's name for error messages, e.g. ``"ddl.allreduce"``.

    Returns:
        A :class:`FlatArray`.

    Raises:
        DDLError: unsupported type, layout or dtype, a read-only array, or elements that
            share memory.

    Example:
        >>> import numpy as np
        >>> from ddl.interop import flat_array
        >>> a = np.arange(4.0)[::-1]  # torch cannot view negative strides: a copy
        >>> plan = flat_array(a, "demo")
        >>> flat = plan.load()
        >>> _ = flat.mul_(2)
        >>> plan.store(flat)
        >>> a.tolist()
        [6.0, 4.0, 2.0, 0.0]
    """
    t = _to_torch(x, what)
    if t is None:  # a NumPy array torch cannot view: reduce a native, contiguous copy
        native = x.dtype.newbyteorder("=")
        dtype = _from_numpy(np.empty(0, dtype=native), what).dtype
        overlaps = any(st == 0 and n > 1 for st, n in zip(x.strides, x.shape)) and x.size > 1

        def load_copy() -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x, dtype=native)).view(-1)

        def store_copy(flat: torch.Tensor) -> None:
            np.copyto(x, flat.numpy().reshape(x.shape))  # swaps the bytes back if needed

        load, store = load_copy, store_copy
        shape, device, numel, inference = tuple(x.shape), torch.device("cpu"), int(x.size), False
    else:
        shape, dtype, device = tuple(t.shape), t.dtype, t.device
        numel, inference = t.numel(), t.is_inference()
        overlaps = _overlaps(t)
        if t.is_contiguous() and not t.is_neg():
            load, store = (lambda: t.view(-1)), None
        else:
            # A negated view (z.conj().imag holds -imag lazily, with the neg bit) is copied
            # too, even when contiguous: the backend and the rings read its raw memory,
            # which holds +imag, and a native all_reduce works on a resolved copy it never
            # writes back. resolve_neg() and contiguous() never return t itself here.
            def load_copy() -> torch.Tensor:
                return t.resolve_neg().contiguous().view(-1)

            def store_copy(flat: torch.Tensor) -> None:
                t.copy_(flat.view_as(t))

            load, store = load_copy, store_copy
    if overlaps:
        # Checked here, before any message moves: writing the result back into such a
        # tensor fails on the worker, after the collective, where any error reads as a
        # failed transport and stops ddl for good (ddl/group.py NOTE rule 4).
        raise DDLError(
            f"{what}: the {type(x).__name__} has elements that share memory (e.g. made by "
            "expand() or broadcast_to), so no in-place result exists; pass a copy "
            "(x.clone() / x.copy())"
        )
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        hint = ""
        if dtype.is_complex:  # a sum or mean acts on real and imaginary parts alike
            hint = " (for complex data, reduce torch.view_as_real(x) or, in NumPy, "
            hint += "x.view(x.real.dtype): same memory, same result)"
        elif dtype == torch.bool:
            hint = " (for flags, reduce x.to(torch.int32): the sum counts the ranks with True)"
        raise DDLError(f"{what}: dtype {dtype} is not supported; use one of {names}{hint}")
    return FlatArray(shape, dtype, device, numel, inference, load, store)


def as_flat_tensor(x: Any, what: str) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """A contiguous 1-D tensor over ``x``'s data, and how to write results back (or None).

    The eager form of :func:`flat_array`: any copy is made now.

    Args:
        x: a torch tensor, NumPy array or DLPack-capable array (CuPy).
        what: the caller's name for error messages, e.g. ``"ddl.allreduce"``.

    Returns:
        ``(flat, finish)``: ``flat`` shares memory with ``x`` when possible; otherwise it is
        a copy and ``finish()`` must run after the reduction to copy the result into ``x``.

    Raises:
        DDLError: as :func:`flat_array`.

    Example:
        >>> import numpy as np
        >>> from ddl.interop import as_flat_tensor
        >>> a = np.arange(6.0).reshape(2, 3)
        >>> flat, finish = as_flat_tensor(a, "demo")
        >>> _ = flat.mul_(2)  # writes straight into a: no copy, nothing to finish
        >>> finish is None, a[1].tolist()
        (True, [6.0, 8.0, 10.0])
    """
    plan = flat_array(x, what)
    flat = plan.load()
    store = plan.store
    return flat, None if store is None else (lambda: store(flat))
