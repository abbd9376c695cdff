"""Autocast's casts of parameters, recognised at save time and made again in backward.

The mechanism behind NOTE [Activation swapping] Rule 10 (in lms/activations.py): a
saved low-precision cast of one of the model's parameters need not be copied to the
host and back, since the parameter still holds its values; evicting it drops it, and
backward casts the parameter again. This module says which saved storages are such
casts (``cast_source``) and makes them again (``CastSource.cast``), refusing when the
parameter changed in between. The swapper (lms/activations.py) decides when to drop a
cast and when to make it again. The rules cited below are those of that NOTE.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import LMSError

__all__ = ["CastSource", "Castable", "cast_source"]


class CastSource:
    """The parameter a saved storage was cast from, to make it again (Rule 10)."""

    __slots__ = ("param", "dtype", "version", "storage")

    def __init__(self, param: nn.Parameter, dtype: torch.dtype) -> None:
        self.param = param
        self.dtype = dtype
        self.version = param._version  # the cast holds these values
        # ``param.data = ...`` bumps no version; the StorageImpl's address tells
        # (a storage resized in place by its owner keeps it, as in Rule 9).
        self.storage = param.untyped_storage()._cdata

    def cast(self, nbytes: int) -> Any:
        """The cast made again: a storage bitwise equal to the one autocast saved."""
        p = self.param
        if p._version != self.version:
            raise LMSError(
                f"a parameter ({p.dtype} {list(p.shape)}) was modified in place between "
                f"forward and backward (version {p._version}, expected {self.version}). "
                f"LMS freed its {self.dtype} cast that autocast saved for backward and "
                "makes it again from the parameter, which would now give other values. "
                "Modify parameters (e.g. optimizer.step()) only after the backward"
            )
        if p.untyped_storage()._cdata != self.storage:
            raise LMSError(
                f"a parameter ({p.dtype} {list(p.shape)}) had its data replaced (param.data "
                "= ..., model.half()) between forward and backward. LMS freed its "
                f"{self.dtype} cast that autocast saved for backward and makes it again from "
                "the parameter, which would now give other values. Replace parameters' data "
                "only after the backward"
            )
        with torch.no_grad():
            storage = p.detach().to(self.dtype).untyped_storage()
        if storage.nbytes() != nbytes:  # excluded at save time: a bug if it happens
            raise LMSError(f"re-cast gave {storage.nbytes()} bytes, expected {nbytes}")
        return storage


class Castable(NamedTuple):
    """Where this thread's training forward began, for recognising fresh casts (Rule 10)."""

    since: int  # autograd's next node number on this thread: nodes made later are newer
    params: dict[int, tuple[nn.Parameter, int]]  # by id: the parameter, and its version then
    # The dtype all of ``params`` have, if they have one (``None`` if mixed): a saved
    # tensor of that dtype is no cast of any of them, which is found without asking
    # for its ``grad_fn`` (several microseconds per saved tensor, in a hook).
    dtype: torch.dtype | None = None

    @staticmethod
    def of(since: int, params: list[nn.Parameter]) -> Castable | None:
        """The ``Castable`` of ``params`` (their versions read now); ``None`` if there are none."""
        if not params:
            return None
        dtypes = {p.dtype for p in params}
        return Castable(
            since,
            {id(p): (p, p._version) for p in params},
            dtypes.pop() if len(dtypes) == 1 else None,
        )


def cast_source(root: torch.Tensor, castable: Castable) -> CastSource | None:
    """The parameter ``root`` is a plain dtype cast of, if one of ``castable`` (Rule 10)."""
    if root.dtype is castable.dtype:
        return None  # every parameter has this dtype: a cast of one would have another
    fn = root.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return None
    if fn._sequence_nr() < castable.since:
        return None  # made before this forward, from autocast's cache: maybe of older values
    acc = fn.next_functions[0][0]
    param, version = castable.params.get(id(getattr(acc, "variable", None)), (None, None))
    if (
        param is None
        or param._version != version  # modified in this forward: the cast may predate it
        or root._version != 0  # written in place since the cast (under no_grad): other values
        or param.dtype == root.dtype
        or param.device != root.device
        or param.shape != root.shape
        or param.stride() != root.stride()
        or root.storage_offset() != 0
    ):
        return None
    return CastSource(param, root.dtype)
