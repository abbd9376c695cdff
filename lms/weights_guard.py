"""Reads of paged parameters whose device storage is released: fetched, never crashed.

# NOTE [Guarded parameters]
#
# Rule 1 (why). Between a training forward and the end of its backward a paged
#   parameter's ``.data`` is its device shell (NOTE [Weight paging] Rule 1), and
#   the shell's storage is 0 bytes except while a module that owns it runs or
#   backward needs it. Code LMS does not hook can read it then: an L2 penalty
#   summed over ``model.parameters()`` after the forward, a weight norm logged, a
#   parent's forward computing ``x @ self.wte.weight.T``, a custom autograd
#   Function's backward. PyTorch kernels read a 0-byte storage without a check:
#   on the CPU that was a segmentation fault, on CUDA it would be an illegal
#   address that poisons the context.
# Rule 2 (how). While its storage is not resident the parameter's class is a
#   subclass of ``nn.Parameter`` made for its pager (``guard_class``) with a
#   ``__torch_function__``: every torch function that reads it first asks the
#   pager to fetch it (``on_read``), then runs as plain tensors. The pager makes
#   it resident and holds it until the backward ends (the read may have saved it
#   for backward, where no hook of LMS sees the use), and gives it back its own
#   class. So a guarded read costs one blocking copy and device memory until the
#   backward ends, and the pager warns once. ``__class__`` is swapped, not a
#   thread-local mode pushed: backward runs on autograd's own threads on CUDA,
#   and a mode pushed inside a user's ``with torch.device(...)`` block would be
#   popped by its exit in the wrong order.
# Rule 3 (what counts as a read). Reading metadata (shape, dtype, flags such as
#   ``is_pinned()``, ``.grad``, ``requires_grad``, the storage object), setting
#   ``.grad`` or ``.data``, making an uninitialized tensor like it
#   (``torch.zeros_like(p)``, ``p.new_empty``), passing it as the template of
#   ``x.view_as(p)`` or as ``inputs=`` to ``torch.autograd.grad`` read no values
#   and fetch nothing: a reducer's hooks and ``optimizer.zero_grad()`` between
#   forward and backward stay cheap.
#   Anything else, a view or ``.detach()`` included (they alias the storage and
#   may be read later), fetches. ``on_read`` learns which function read, so that
#   the pager can copy back what is written through ``.data`` (NOTE [Weight
#   paging] Rule 17).
# Rule 4 (which classes). ``nn.Parameter`` and its subclasses that keep its
#   disabled ``__torch_function__`` and ``__torch_dispatch__`` (a subclass that only
#   tags parameters) are guarded: the guard class derives from the parameter's own
#   class, which it gets back when fetched. A subclass with its own
#   ``__torch_function__`` or ``__torch_dispatch__`` is never guarded, since the
#   guard's would run in its place (a read of its released storage still crashes).
# Rule 5 (aliases handed out). A guarded read that returns a tensor sharing the
#   shell's storage (``p.detach()``, ``p.data``, ``p[1]``, ``p.T``) returns it as a
#   ``ShellAlias``, and views of that are ``ShellAlias`` too. Without LMS such a
#   tensor keeps showing the parameter; with LMS its memory is released when the
#   backward ends, and a later read would read freed memory (a segmentation fault on
#   the CPU). A ``ShellAlias`` checks on each read. While its parameter wears the
#   guard (between a forward and the end of its backward, shell not resident: out,
#   or being filled by a prefetch on the copy stream) the read is a guarded read of
#   the parameter: fetched, waited for, held, and told as a ``.data`` read (the alias
#   may be ``.data``, so a write through it reaches the master, NOTE [Weight paging]
#   Rule 17). While the shell is resident it reads
#   it (a later step's values, as without LMS). While it is released and the
#   parameter is not guarded (between steps, or LMS removed) it raises ``LMSError``
#   saying to keep a copy. Metadata stays readable. ``.numpy()`` of a
#   guarded parameter or of a ``ShellAlias`` is made from a copy: numpy makes the
#   storage it shares non-resizable, and the release would then fail (on the CPU,
#   where ``.cpu()`` returns the shell itself). Not seen: an alias taken while the
#   shell was resident without a guarded read (in the owning module's own forward
#   or hooks, or after a guarded read fetched it) still reads freed memory after
#   the release.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .errors import LMSError

__all__ = ["DATA_GET", "ShellAlias", "guard_class", "guardable", "user_stacklevel"]

_T = torch.Tensor
# ``param.data``: an alias whose writes bump no version counter (passed to ``on_read``).
DATA_GET = _T.data.__get__


def _getset(kind: str, names: tuple[str, ...]) -> set[Any]:
    # Some attributes are newer than the oldest torch we support (``itemsize``).
    return {getattr(getattr(_T, n), kind) for n in names if hasattr(_T, n)}


# Rule 3: functions that read no values of any tensor argument.
_NO_READ = frozenset(
    _getset(
        "__get__",
        (
            "grad",
            "requires_grad",
            "shape",
            "dtype",
            "device",
            "is_leaf",
            "grad_fn",
            "layout",
            "ndim",
            "is_cuda",
            "is_cpu",
            "is_meta",
            "is_sparse",
            "is_quantized",
            "is_nested",
            "itemsize",
            "nbytes",
            "_version",
            "output_nr",
            "retains_grad",
            "is_mkldnn",
            "name",
            "_base",  # a parameter is never a view: None
        ),
    )
    | _getset("__set__", ("grad", "requires_grad", "data"))
    | {
        _T.size,
        _T.dim,
        _T.numel,
        _T.nelement,
        _T.stride,
        _T.element_size,
        _T.is_contiguous,
        _T.is_floating_point,
        _T.is_complex,
        _T.get_device,
        _T.data_ptr,
        _T.storage_offset,
        _T.untyped_storage,  # a storage's own accessors check its (0-byte) size
        _T.is_pinned,
        _T.is_shared,
        _T.is_inference,
        _T.is_signed,
        _T.is_neg,
        _T.is_conj,
        _T.dim_order,
        _T.__dlpack_device__,
        _T.requires_grad_,
        _T.register_hook,
        _T.register_post_accumulate_grad_hook,
        _T.retain_grad,
        _T.__len__,
        _T.new_empty,
        _T.new_zeros,
        _T.new_ones,
        _T.new_full,
        _T.new_tensor,  # a copy of its argument, with only the dtype and device of ``self``
        torch.empty_like,
        torch.zeros_like,
        torch.ones_like,
        torch.full_like,
        torch.rand_like,
        torch.randn_like,
        torch.randint_like,
        # Parameters passed as ``inputs`` name where gradients go; what backward
        # reads, it reads through autograd, whose hooks fetch (NOTE [Weight paging]).
        torch.autograd.grad,
        torch.autograd.backward,
        _T.backward,
    }
)
# Rule 3: functions that read their first argument only; the others give a shape or dtype.
_FIRST_ONLY = frozenset({_T.view_as, _T.expand_as, _T.reshape_as, _T.type_as})
# Rule 5: functions that hand the storage to numpy, which makes it non-resizable.
_TO_NUMPY = frozenset({_T.numpy, _T.__array__})


def _read_args(func: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The arguments whose values ``func`` reads (Rule 3): none, the first, or all."""
    if func in _NO_READ:
        return []
    return tree_leaves(args[:1] if func in _FIRST_ONLY else (args, kwargs))


def _run(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func`` on plain tensors; a numpy array of a shell is made from a copy (Rule 5)."""
    with torch._C.DisableTorchFunctionSubclass():
        if func in _TO_NUMPY:
            args = (args[0].clone(), *args[1:])
        return func(*args, **kwargs)


def _storage_id(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None  # no storage of its own (sparse, nested): aliases no shell


# Rule 5: the parameter whose shell each storage is (by the storage's id), for the
# aliases handed out; weak, so an alias does not keep a removed model's parameter.
_OWNERS: weakref.WeakValueDictionary[int, nn.Parameter] = weakref.WeakValueDictionary()


def _mark_aliases(out: Any, shells: list[torch.Tensor]) -> Any:
    """Make each plain tensor of ``out`` that shares a storage of ``shells`` a ``ShellAlias``.

    NOTE [Guarded parameters] Rule 5. ``shells`` are the fetched parameters, or
    ``ShellAlias`` arguments. Parameters are never plain tensors, so an in-place op
    that returns its parameter leaves it alone.
    """
    ids = {_storage_id(t) for t in shells} - {None}
    if not ids:
        return out
    for t in tree_leaves(out):
        if type(t) is torch.Tensor and _storage_id(t) in ids:
            t.__class__ = ShellAlias
    for t in shells:
        if isinstance(t, nn.Parameter):
            _OWNERS[_storage_id(t)] = t
    return out


def _fetch_owner(alias: ShellAlias, func: Any) -> None:
    """A guarded read of the parameter behind ``alias``, if it wears the guard (Rule 5).

    Told as a ``.data`` read whatever ``func`` is: the alias may be (a view of) ``.data``,
    whose in-place writes move no version counter of the parameter, so the pager must
    copy the shell back to be sure (NOTE [Weight paging] Rule 17).
    """
    owner = _OWNERS.get(alias.untyped_storage()._cdata)
    fetch = getattr(type(owner), "_lms_fetch", None)
    on_read = fetch() if fetch is not None else None
    if on_read is not None:
        on_read(owner, DATA_GET)


class ShellAlias(torch.Tensor):
    """A tensor sharing a paged parameter's device shell, made by a guarded read.

    NOTE [Guarded parameters] Rule 5: reading it once the shell is released again
    raises ``LMSError`` instead of reading freed memory.
    """

    __slots__ = ()

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        aliases = [t for t in _read_args(func, args, kwargs) if isinstance(t, ShellAlias)]
        for t in aliases:
            _fetch_owner(t, func)
        if any(t.untyped_storage().nbytes() == 0 for t in aliases):
            raise LMSError(
                "this tensor shares device memory with a parameter that LMS pages "
                "(a view, .detach() or .data taken between a forward and the end of "
                "its backward), and LMS has released that memory since; keep a copy "
                "instead (param.detach().clone()), or take it between steps"
            )
        return _mark_aliases(_run(func, args, kwargs), aliases)

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        # A copy of the values, as for a plain tensor (torch's default for a subclass
        # wants clone() to return the subclass); reading them is checked first.
        if id(self) not in memo:
            copied = self.detach().clone(memory_format=torch.preserve_format)
            copied.requires_grad_(self.requires_grad)
            memo[id(self)] = copied
        return memo[id(self)]


def guardable(cls: type) -> bool:
    """Whether parameters of class ``cls`` may wear a guard class (Rule 4)."""
    return (
        issubclass(cls, nn.Parameter)
        and cls.__torch_function__ is nn.Parameter.__torch_function__
        and cls.__torch_dispatch__ is nn.Parameter.__torch_dispatch__
    )


def user_stacklevel() -> int:
    """``stacklevel`` for a warning raised by the caller: the first frame outside torch and LMS.

    A guarded read reaches the pager through torch's dispatch, a varying number of
    frames below the user's line.
    """
    internal = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def guard_class(
    on_read: Callable[[nn.Parameter, Any], None], own: type[nn.Parameter] = nn.Parameter
) -> type[nn.Parameter]:
    """A subclass of ``own`` whose instances are fetched before any read.

    NOTE [Guarded parameters] Rule 2. Assign it to a parameter's ``__class__`` while
    its storage is released; ``on_read(param, func)`` must make the storage resident
    and give the parameter its own class back (the class's ``own``).

    Args:
        on_read: called with each instance the torch function ``func`` is about to
            read (``func`` is ``DATA_GET`` for ``param.data``). Held
            weakly when it is a bound method, so the class does not keep its pager alive.
        own: the parameters' own class, ``nn.Parameter`` or a subclass that is
            :func:`guardable` (Rule 4).

    Returns:
        The class, with the same layout as ``own``.

    Example:
        >>> p = nn.Parameter(torch.ones(2))
        >>> def fetch(q, func):
        ...     print("fetch")
        ...     q.__class__ = nn.Parameter
        >>> p.__class__ = guard_class(fetch)
        >>> p.shape
        torch.Size([2])
        >>> p.sum().item()
        fetch
        2.0
    """
    ref = weakref.WeakMethod(on_read) if hasattr(on_read, "__self__") else lambda: on_read

    class PagedParameter(own):  # type: ignore[valid-type, misc]
        __slots__ = ()
        _lms_fetch = ref  # for the aliases it hands out (Rule 5)
        _lms_own = own

        @classmethod
        def __torch_function__(
            cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
        ) -> Any:
            kwargs = kwargs or {}
            guarded = [t for t in _read_args(func, args, kwargs) if type(t) is cls]
            fetch = ref()
            for t in guarded:
                if fetch is not None:
                    fetch(t, func)
            return _mark_aliases(_run(func, args, kwargs), guarded)  # Rule 5

        def __deepcopy__(self, memo: dict) -> nn.Parameter:
            # As nn.Parameter.__deepcopy__ (``.data`` is a read, so fetched), but the
            # copy is of the parameter's own class and does not belong to the pager.
            if id(self) not in memo:
                data = self.data.clone(memory_format=torch.preserve_format)
                memo[id(self)] = own(data, self.requires_grad)
            return memo[id(self)]

    return PagedParameter
