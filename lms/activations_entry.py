"""What LMS keeps for each saved tensor: the entry of its storage, and what autograd holds.

The records of NOTE [Activation swapping] (in lms/activations.py): one ``Entry`` per
saved storage, with where it lives (``Where``, Rule 4), and in autograd's graph, in
place of each saved tensor, a ``Packed`` (an entry and the view's geometry, Rule 3)
or, for a tensor LMS does not move, a ``Kept``. Both check on unpacking that the
saved tensor was not modified in place (Rule 8). They hold state only; the swapper
(``ActivationSwapper`` in lms/activations.py) moves entries and keeps their books.
The rules cited below are those of that NOTE.
"""

from __future__ import annotations

import enum
import sys
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .activations import ActivationSwapper
    from .activations_recast import CastSource
    from .transfer import Copy

__all__ = ["Entry", "Kept", "Packed", "Where"]


class Where(enum.Enum):
    """Where one saved storage lives (NOTE [Activation swapping], Rule 4)."""

    DEVICE = "device"
    OUTGOING = "outgoing"
    HOST = "host"
    INCOMING = "incoming"
    BOTH = "both"
    OWNED = "owned"  # resized by its owner after it was saved: used in place (Rule 9)
    DROPPED = "dropped"  # a parameter's cast, freed; cast again when backward needs it (Rule 10)
    DEAD = "dead"


_DEVICE = Where.DEVICE  # a global reads faster than an enum member (lms/activations.py)


class Entry:
    """One saved storage and where it lives."""

    __slots__ = (
        "seq",
        "nbytes",
        "ptr",
        "storage_ref",
        "where",
        "storage",
        "block",
        "copy",
        "refs",
        "wanted",
        "version",
        "family",
        "counter",
        "source",
    )

    def __init__(
        self,
        seq: int,
        storage: Any,
        ptr: int,
        nbytes: int,
        version: int,
        root: torch.Tensor,
        counter: torch.Tensor,
    ) -> None:
        self.seq = seq
        self.nbytes = nbytes
        self.version = version  # the saved tensor's version when the entry was made (Rule 3)
        self.family = weakref.ref(root)  # whose version counter ``version`` was read from
        # Rule 8: shares that family's version counter, holds no storage. Every tensor
        # saved into this entry is of the family, so its ``Packed``s share this one.
        self.counter = counter
        self.ptr = ptr  # storage.data_ptr(), which the caller has read already
        self.storage_ref = weakref.ref(storage)
        self.where = _DEVICE
        self.storage = storage  # the device storage while LMS holds one, else None
        self.block = None  # HostBlock holding the host copy, once swapped
        self.copy: Copy | None = None  # the copy in flight, if any
        self.refs = 1  # live Packed objects: made for the first one
        self.wanted = False  # unpacked while OUTGOING: keep the device copy
        self.source: CastSource | None = None  # set when the storage is a parameter's cast


class Packed:
    """What autograd stores in place of a saved tensor: its entry and view geometry.

    The version the tensor had when saved, and the alias that sees its writes, are
    the entry's (``Entry.counter``): every tensor saved into one entry shares them.
    """

    __slots__ = ("owner", "entry", "dtype", "offset", "size", "stride")

    def __init__(self, owner: ActivationSwapper, entry: Entry, t: torch.Tensor) -> None:
        self.owner = owner
        self.entry = entry
        self.dtype = t.dtype
        self.offset = t.storage_offset()
        self.size = t.size()
        self.stride = t.stride()

    def check_version(self) -> None:
        """Raise autograd's in-place error if the saved tensor was modified (Rule 8)."""
        entry = self.entry
        now = entry.counter._version
        if now != entry.version:
            _raise_modified(self.dtype, self.size, now, entry.version)

    def __del__(self) -> None:
        if not sys.is_finalizing():
            self.owner.drop(self.entry)


class Kept:
    """A saved tensor LMS does not move, with its version at save time (Rule 8)."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: torch.Tensor) -> None:
        self.tensor = t
        self.version = t._version

    def unwrap(self) -> torch.Tensor:
        t = self.tensor
        if t._version != self.version:
            _raise_modified(t.dtype, t.size(), t._version, self.version)
        return t


def _raise_modified(dtype: torch.dtype, size: Any, now: int, expected: int) -> None:
    raise RuntimeError(
        "one of the variables needed for gradient computation has been modified by an "
        f"inplace operation: [{dtype} {list(size)}] is at version {now}; expected version "
        f"{expected} instead. (Detected by LMS: saved-tensor hooks switch off autograd's own "
        "check.) Hint: enable anomaly detection to find the operation that failed to compute "
        "its gradient, with torch.autograd.set_detect_anomaly(True)."
    )
