"""Saved-tensor hooks that swap activations under the limit, and their prefetch.

# NOTE [Activation swapping]
# 1. Scope. A forward pre-hook on the root module pushes
#    ``torch.autograd.graph.saved_tensors_hooks``; a forward hook registered with
#    ``always_call=True`` pops it, so an exception in forward cannot leave it on.
#    Only training forwards (``module.training``) with grad enabled are touched:
#    an eval, ``no_grad`` or ``inference_mode`` forward runs exactly as without LMS,
#    and so does one where saved-tensor hooks are disabled (pushing ours would
#    raise the disabler's error). ``always_call`` does not cover a
#    ``KeyboardInterrupt``: the model's guarded forward (lms/enable.py) and
#    ``remove()`` close the scope then (``close_scopes``).
#    The stack of open scopes is per thread, like the hooks it pushes. A copy of
#    the model (``copy.deepcopy``, pickling) gets inert hooks: LMS is not on it.
# 2. What may move. Plain strided tensors on the model's device whose storage is
#    at least ``min_size``. Never parameters, views of parameters, buffers, or
#    leaves that require grad (the user holds those; moving them frees nothing),
#    nor the plain tensors inside a wrapper-subclass parameter (a DTensor's local
#    shard). Tensor subclasses are left alone. A model moved to another device after
#    ``enable`` would have nothing eligible, silently: its training forward
#    raises ``LMSError`` instead.
# 3. Storages, not tensors. Everything is keyed by the storage: a tensor saved
#    twice, or several views of one storage (``q, k, v = qkv.split(...)``), is one
#    entry, moved once. Autograd keeps a small ``Packed`` (entry + view geometry);
#    unpacking rebuilds the exact view with ``set_``, so values are bitwise equal.
#    Entries are found again by the storage's data pointer, checked against a weak
#    reference to the storage so a recycled address is never mistaken for it, and
#    against the tensor's version: a storage modified in place since its entry was
#    made is a new entry (the old one's copy may predate the change). A version
#    only means something within one family of tensors that share a version
#    counter: a tensor and its views (same ``_base``). ``unsafe_chunk`` and
#    ``unsafe_split`` (used inside ``nn.GRU`` and ``nn.LSTM`` cells) make views of
#    one storage that each count their own versions, so a write through one chunk
#    is invisible to another's version; such a tensor gets its own entry, and its
#    own copy of the storage taken at its own save time. Each entry therefore
#    remembers (weakly) the root tensor of the family it was made for.
# 4. Life of an entry (``Where``): DEVICE -> OUTGOING (copy to host in flight;
#    the device memory is freed only once the copy's event has completed) -> HOST
#    -> INCOMING (prefetch in flight) -> BOTH (in use in backward; the host copy
#    is kept, so evicting it again is free) -> DEAD when autograd drops the last
#    ``Packed``. An entry needed while still OUTGOING is used from the device.
# 5. Limit. Each new entry is charged to the shared budget (NOTE [Memory budget]);
#    if the budget is exceeded the oldest-saved resident entries are evicted
#    (NOTE [Swap policy], Rule 1), the new one last. In backward, when gradients
#    push the device over the limit, entries not used yet are evicted the same
#    way; entries in use (unpacked, BOTH) are not.
# 6. Prefetch. In backward, each unpack issues host-to-device copies for the next
#    swapped entries in reverse save order, within the headroom, at least
#    ``lookahead`` of them (NOTE [Swap policy], Rule 2). An OUTGOING entry in
#    that window is only marked ``wanted``: it keeps its device copy when its copy
#    out completes. The compute stream waits on the copy's event, never the host
#    (NOTE [Copy ordering]). An autograd final callback marks the end of each
#    (outermost) backward: see ``_track_backward``.
# 7. Threads. Pack runs on the forward thread, unpack on autograd's device
#    threads, ``Packed.__del__`` wherever the graph is freed: all state changes
#    hold ``runtime.lock``, inside ``_critical``. A ``Packed`` can also be freed
#    by the garbage collector in the middle of a critical section of the same
#    thread (any allocation may run it); its entry is then queued and released
#    when the section ends, so no state changes under a running loop.
# 8. Versions. With saved-tensor hooks installed, autograd skips its check that a
#    saved tensor was not modified in place before backward, so LMS does it:
#    each entry keeps the version at save time and a storage-less alias of the
#    saved tensor that shares its version counter (``t.detach()`` with its data
#    swapped for an empty tensor: ``.data =`` keeps the counter and does not bump
#    it), made once for all its ``Packed`` (they are of one family, Rule 3, so
#    they share that counter), and unpacking raises autograd's own error on a
#    mismatch. The alias holds no memory, and sees every in-place write autograd
#    would have seen, also those made after the saved tensor and all its views
#    have died. Only writes autograd cannot see either (through ``.data``) go
#    unnoticed.
#    Tensors LMS does not move (parameters, buffers, tensors below ``min_size``)
#    are checked too: autograd's check is off for them as well, so they are
#    returned wrapped in a ``Kept`` that remembers their version.
# 9. Storages resized by their owner. FSDP-style code frees a saved tensor's
#    storage after forward (``resize_(0)``) and refills it before backward, with
#    no version bump. Such a storage is copied out only while it is still the one
#    that was saved (same address and size); once resized it is left to its
#    owner (``Where.OWNED``): uncharged, never copied, used in place in backward,
#    exactly as without LMS.
# 10. Casts of parameters. Autocast saves for backward the low-precision cast
#    of each weight it feeds to a matmul (``weight.to(bfloat16)``, cached per
#    region). Such a tensor is recognised at save time by its autograd history
#    (a ``ToCopyBackward0`` straight from the ``AccumulateGrad`` of one of the
#    model's parameters, same shape and strides) and remembered with its
#    source (``CastSource``). Only a cast made during this forward, of a
#    parameter not modified in place since the forward began, is recognised:
#    autocast's cache lives as long as the autocast region, not the forward, so
#    a training loop inside one region, or a weight updated in forward after its
#    first use, is handed a cast of values the parameter no longer holds; such a
#    cast is swapped like any activation, and so is a cast written in place
#    since it was made (version not 0). ``Castable`` notes, per thread
#    (autograd numbers its nodes per thread), where the forward began. While a
#    cast fits it stays resident like any entry; evicting it drops it
#    (``Where.DROPPED``): no copy out, none back, and backward makes it again
#    from the parameter, on the compute stream, when it is unpacked. The cast is
#    deterministic, so the values are bitwise those autocast saved. Dropped
#    casts are chosen before any other eviction, and a new cast that does not
#    fit is dropped at once (NOTE [Swap policy] Rule 5). The parameter must
#    still be unchanged when the cast is made again: a parameter modified in
#    place between forward and backward (an optimizer step in between) would
#    give a cast of the new values, so unpacking raises ``LMSError`` instead;
#    so does one whose data was replaced (``param.data = ...``, no version bump).
#    Paged parameters are left out: their shells are empty in backward (NOTE
#    [Weight paging] Rule 11), so their casts are swapped like any activation.

The records these rules speak of (``Where``, ``Entry``, ``Packed``, ``Kept``) are in
lms/activations_entry.py; how Rule 10 recognises a cast and makes it again is in
lms/activations_recast.py.
"""

from __future__ import annotations

import enum
import functools
import itertools
import threading
from collections import OrderedDict, deque
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .activations_entry import Entry, Kept, Packed, Where
from .activations_recast import Castable, cast_source
from .errors import LMSError
from .policy import is_swappable_size, must_wait_for_copies, plan_evictions, plan_prefetch
from .runtime import ModelHook, Runtime, is_oom
from .transfer import Copy

__all__ = ["ActivationSwapper", "Phase"]

# Read in the hooks, once or more per saved tensor. A member of an ``enum.Enum`` costs
# about 0.1 us per read there (``EnumType`` defines ``__getattr__``), a module global
# a fraction of it; the same holds for a function three attributes deep in ``torch``.
_DEVICE, _OUTGOING, _HOST, _INCOMING = Where.DEVICE, Where.OUTGOING, Where.HOST, Where.INCOMING
_BOTH, _OWNED, _DROPPED, _DEAD = Where.BOTH, Where.OWNED, Where.DROPPED, Where.DEAD
_current_graph_task_id = torch._C._current_graph_task_id
_Tensor, _STRIDED = torch.Tensor, torch.strided


class Phase(enum.Enum):
    """Where the model is in its step, as seen by the hooks."""

    IDLE = "idle"  # outside the model's forward, no backward seen yet
    FORWARD = "forward"  # inside a training forward: tensors are being saved
    BACKWARD = "backward"  # saved tensors are being unpacked


class _Section:
    """The critical section of NOTE [Activation swapping], Rule 7 (a plain class: this
    runs several times per saved tensor, where ``contextlib`` costs microseconds).

    ``owner._depth`` counts the sections open: they nest only on the thread that
    holds the (reentrant) lock, so a plain counter read under the lock says
    whether this thread is inside one already. The hooks that run once per saved
    tensor (``_pack``, ``_unpack``, ``drop``) open and close theirs inline instead,
    two Python calls cheaper, and call ``_leave_section`` only when entries died
    meanwhile.
    """

    __slots__ = ("owner",)

    def __init__(self, owner: ActivationSwapper) -> None:
        self.owner = owner

    def __enter__(self) -> None:
        owner = self.owner
        owner.lock.acquire()
        owner._depth += 1

    def __exit__(self, *exc: object) -> None:
        self.owner._leave_section()


def _pending(e: Entry) -> bool:
    """Swapped out and not yet asked back: a prefetch candidate (Rule 6)."""
    return e.where is _HOST or (e.where is _OUTGOING and not e.wanted)


def _hooks_allowed() -> bool:
    """False inside ``disable_saved_tensors_hooks`` (torch.func transforms, or the user)."""
    is_enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    return is_enabled is None or is_enabled()


def _inner_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors``, each wrapper subclass replaced by the plain tensors it wraps (Rule 2)."""
    out, stack = [], list(tensors)
    while stack:
        t = stack.pop()
        if hasattr(type(t), "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            stack.extend(getattr(t, n) for n in names)
        else:
            out.append(t)
    return out


class ActivationSwapper:
    """Swaps a model's saved activations between device and host under the runtime's budget.

    Args:
        model: the module whose forward is the scope (NOTE [Activation swapping], Rule 1).
        runtime: the shared runtime (budget, pool, streams, stats).

    Example:
        >>> from lms.config import LMSConfig
        >>> model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 1))
        >>> rt = Runtime(torch.device("cpu"), LMSConfig(limit=0, min_size=0))
        >>> swapper = ActivationSwapper(model, rt)
        >>> handles = swapper.install()
        >>> model(torch.randn(256, 512)).sum().backward()
        >>> rt.stats.swap_outs > 0
        True
    """

    def __init__(self, model: nn.Module, runtime: Runtime) -> None:
        self.model = model
        self.runtime = runtime
        self.device = runtime.device
        self.budget = runtime.budget
        self.transfers = runtime.transfers
        self.pool = runtime.pool
        self.lock = runtime.lock
        self.min_size = runtime.min_size
        self.phase = Phase.IDLE
        self._seq = itertools.count()
        # saved_tensors_hooks contexts (None: an untouched forward), one stack per
        # thread: the hooks they push are thread-local, and forwards of two threads
        # need not end in the order they began (Rule 1).
        self._threads = threading.local()
        self._frozen: set[int] = set()  # storage pointers of parameters and buffers
        self._index: dict[int, Entry] = {}  # storage data_ptr -> live entry
        # Entries on the device, in save order: not yet used in backward (evicted
        # first, also in backward), and already used or brought back (evicted in
        # forward only: they are in use).
        self._resident: OrderedDict[int, Entry] = OrderedDict()
        self._returned: OrderedDict[int, Entry] = OrderedDict()
        # Casts of parameters on the device, not yet used in backward: evicted
        # before anything in ``_resident``, since dropping them is free (Rule 10).
        self._resident_casts: OrderedDict[int, Entry] = OrderedDict()
        self._outgoing: deque[Entry] = deque()  # device-to-host copies in flight, FIFO
        self._outgoing_bytes = 0
        self._swapped: list[Entry] = []  # entries ever evicted, in eviction (= save) order
        self._prefetched: dict[int, Entry] = {}  # INCOMING entries, not yet unpacked
        self._cursor = -1  # prefetch position in _swapped, walking down in backward
        self._graveyard: deque[Copy] = deque()  # copies whose entry died while in flight
        self._largest = 0
        self._depth = 0  # critical sections open on the thread holding the lock (Rule 7)
        self._deferred: list[Entry] = []  # entries that died inside a nested section
        self._tasks: set[int] = set()  # autograd graph tasks (backwards) running now
        self._section = _Section(self)
        # Parameters and buffers, listed once: their storage pointers are re-read
        # every forward (weight paging may move them), the module tree is not walked.
        self._owned: list[torch.Tensor] = []
        self._params: list[nn.Parameter] = []  # those of them that are Parameters
        self._list_owned()
        # Parameters whose casts may be dropped and made again (Rule 10): the
        # model's parameters except the paged ones, which ``lms.enable`` lists in
        # ``paged`` once weight paging is attached. Each training forward puts a
        # ``Castable`` of them in ``self._threads.castable`` (``None`` if there are none).
        self.paged: frozenset[int] = frozenset()
        # Where the first parameter lives once ``lms.enable`` is done (it sets this,
        # after weight paging may have moved a host-built model to the device): a
        # training forward after the model moved elsewhere is refused (Rule 2).
        # ``None`` turns the check off (weight paging moves parameters on purpose).
        self.home: torch.device | None = None
        self._empty = torch.empty(0, device=self.device)  # what version aliases hold (Rule 8)
        # Empty tensors per dtype on the device: ``blank.new()`` makes the tensor that
        # unpacking points at a storage (``set_``), at about half the cost of
        # ``torch.empty(0, dtype=..., device=...)``, which parses its arguments. It
        # lands on the blank's device (``Tensor.new`` guards it), on any thread.
        self._blanks: dict[torch.dtype, torch.Tensor] = {}

    def _critical(self) -> _Section:
        """Hold the lock; release entries that died meanwhile on the way out (Rule 7)."""
        return self._section

    def _leave_section(self) -> None:
        """End a critical section (``_Section.__exit__``, or inline after ``lock.acquire()``
        and ``_depth += 1``)."""
        try:
            if self._depth == 1:
                # Outermost: release what died meanwhile, still inside the section,
                # so that entries freed by these releases are deferred to this loop.
                while self._deferred:
                    self._release(self._deferred.pop())
        finally:
            self._depth -= 1
            self.lock.release()

    # -- installation -------------------------------------------------------

    def install(self) -> list[RemovableHandle]:
        """Register the forward hooks that open and close the scope; returns their handles."""
        return [
            self.model.register_forward_pre_hook(ModelHook(self._enter)),
            self.model.register_forward_hook(ModelHook(self._exit), always_call=True),
            self.budget.add_evictor(self._make_room),
        ]

    def _list_owned(self) -> None:
        self._owned = [*self.model.parameters(), *self.model.buffers()]
        # Rule 2: a wrapper subclass (DTensor, a quantized wrapper) has no storage of
        # its own; its inner tensors hold the model's values, and never move either.
        self._owned_storages = _inner_tensors(self._owned)
        # ``isinstance`` runs Python code for ``Parameter`` (its metaclass defines
        # ``__instancecheck__``): asked here, once per listing, not every forward.
        self._params = [t for t in self._owned if isinstance(t, nn.Parameter)]

    def _scopes(self) -> list[Any]:
        scopes = getattr(self._threads, "scopes", None)
        if scopes is None:
            scopes = self._threads.scopes = []
        return scopes

    def _enter(self, module: nn.Module, args: Any) -> None:
        scopes = self._scopes()
        if (
            not (module.training and torch.is_grad_enabled())
            or torch.is_inference_mode_enabled()
            or not _hooks_allowed()
        ):
            scopes.append(None)
            return
        first = next(self.model.parameters(), None)
        if first is not None and first is not self._owned[0]:
            # Parameters replaced (``.to()`` across device kinds, ``load_state_dict(
            # assign=True)``): list them again, so the frozen set stays right.
            self._list_owned()
        if self.home is not None and first is not None and first.device != self.home:
            self._check_move(first.device, scopes)
        with self._critical():
            if self._tasks and torch._C._current_graph_task_id() == -1:
                # A backward that raised never ran its final callback (autograd
                # skips them on error), and no backward runs around this forward:
                # end it now, or prefetch would stay off for every later step.
                self._tasks.clear()
                self._end_backward()
            self.phase = Phase.FORWARD
            self._frozen = {t.untyped_storage().data_ptr() for t in self._owned_storages}
            paged = self.paged
            self._threads.castable = Castable.of(
                torch._C._autograd._get_sequence_nr(),
                [t for t in self._params if t.requires_grad and id(t) not in paged],
            )
            self._swapped = [e for e in self._swapped if e.where is not _DEAD]
            self.transfers.collect_stalls()  # once a step, so timing events do not pile up
        scope = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        scope.__enter__()
        scopes.append(scope)

    def close_scopes(self) -> None:
        """Close every scope this thread still has open (Rule 1).

        ``nn.Module`` runs ``always_call`` hooks only for an ``Exception``; a
        ``KeyboardInterrupt`` (Ctrl-C in a notebook) or ``SystemExit`` in forward
        skips ``_exit`` and would leave our hooks on the thread for good.
        """
        while self._scopes():
            self._exit(self.model, (), None)

    def _check_move(self, now: torch.device, scopes: list[Any]) -> None:
        """Refuse a training forward of a model moved off LMS's device (Rule 2)."""
        if now == self.device:
            self.home = now  # moved onto the device LMS was enabled for: fine
            return
        scopes.append(None)  # the always_call _exit pops it
        raise LMSError(
            f"the model moved from {self.home} to {now} after lms.enable; LMS manages "
            f"{self.device} memory only. Call remove() on the handle and lms.enable "
            "again after moving the model"
        )

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        scopes = self._scopes()
        scope = scopes.pop() if scopes else None
        if scope is not None:
            scope.__exit__(None, None, None)
            with self._critical():
                self.phase = Phase.IDLE
                self._reap()

    # -- pack: forward ------------------------------------------------------

    def _eligible(self, t: torch.Tensor) -> bool:
        """NOTE [Activation swapping], Rule 2."""
        if type(t) is not _Tensor or t.device != self.device:
            return False
        if t.layout is not _STRIDED or t.is_conj() or t.is_neg():
            return False
        if t.is_quantized or t.is_nested:
            return False  # their data is more than one storage's bytes (scales, offsets)
        base = t._base
        if base is not None and type(base) is not _Tensor:
            return False  # a view of a Parameter (e.g. ``weight.t()`` saved by addmm)
        if t.is_leaf and t.requires_grad:
            return False
        return True

    def _pack(self, t: torch.Tensor) -> Any:
        if not self._eligible(t):
            return Kept(t)  # Rule 8: still checked for in-place writes
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if not is_swappable_size(nbytes, self.min_size):
            return Kept(t)
        ptr = storage.data_ptr()
        if ptr in self._frozen:
            return Kept(t)
        version = t._version
        base = t._base
        root = t if base is None else base  # the family sharing t's version counter (Rule 3)
        lock = self.lock
        lock.acquire()  # the critical section (Rule 7), inline: see _Section
        self._depth += 1
        try:
            entry = self._index.get(ptr)
            if (
                entry is not None
                and entry.storage_ref() is storage
                and entry.version == version
                and entry.family() is root
            ):
                entry.refs += 1  # saved before (another view, or the same tensor): Rule 3
                return Packed(self, entry, t)
            counter = t.detach()  # Rule 8
            counter.data = self._empty
            entry = Entry(next(self._seq), storage, ptr, nbytes, version, root, counter)
            castable = getattr(self._threads, "castable", None)
            if castable is not None and root.dtype is not castable.dtype:  # else no cast
                entry.source = cast_source(root, castable)
            packed = Packed(self, entry, t)  # if anything below raises, this frees it
            self._index[ptr] = entry
            if nbytes > self._largest:
                self._largest = nbytes
                self.budget.note_tensor(nbytes)
            self._admit(entry)
            return packed
        finally:
            if self._deferred and self._depth == 1:
                self._leave_section()  # releases what died meanwhile first
            else:
                self._depth -= 1
                lock.release()

    def _admit(self, entry: Entry) -> None:
        """Charge a new entry, evicting oldest-saved first to stay under the limit.

        NOTE [Swap policy], Rules 1 and 3. The new entry is needed first in
        backward, so it is the last choice: it goes straight out only when evicting
        every older resident entry is not enough (always, at ``limit=0``).
        """
        if self._outgoing or self._graveyard:
            self._reap()
        need = self.budget.charge_if_fits(entry.nbytes)  # charged if need <= 0
        if entry.source is not None:
            # Rule 10: a cast that does not fit is dropped at once rather than
            # pushing out anything that would cost a copy.
            if need <= 0:
                self._resident_casts[entry.seq] = entry
            else:
                self._drop_cast(entry)
            return
        if need <= 0:
            # Fits: the common case while under the limit, without the eviction
            # bookkeeping below.
            self._resident[entry.seq] = entry
            if self._outgoing:
                self._throttle(entry.nbytes)
            return
        freed = 0
        block = None
        try:
            freed = self._evict_oldest(need, in_use_too=True)
            if freed < need:
                block = self.pool.acquire(entry.nbytes)
        except BaseException:
            # The host is full: the entry stays resident, and drop releases it.
            self.budget.charge(entry.nbytes)
            self._resident[entry.seq] = entry
            raise
        if block is not None:
            self.budget.charge(entry.nbytes, leaving=True)
            self._send_out(entry, block)
        else:
            self.budget.charge(entry.nbytes)
            self._resident[entry.seq] = entry
        self._throttle(entry.nbytes)

    def _throttle(self, allowance: int) -> None:
        """Wait for the oldest copies out while too many bytes are in flight (Rule 3)."""
        while self._outgoing and must_wait_for_copies(
            self._outgoing_bytes, self.budget.excess(), allowance
        ):
            self.transfers.block_on(self._outgoing[0].copy)
            self._reap()

    def _enforce_limit(self, protect: Entry | None = None) -> None:
        """In backward: evict not-yet-used entries, oldest saved first, while over the limit.

        Entries already brought back (BOTH) are in use, or about to be used again
        by another node that saved the same storage; evicting them would only
        bring them straight back, so they stay until autograd drops them.
        """
        need = self.budget.excess()
        if need <= 0:
            return  # under the limit: the common case
        self._evict_oldest(need, in_use_too=False, protect=protect)
        self._throttle(self._largest)

    def _make_room(self, need: int) -> None:
        """Evict about ``need`` bytes for another pager (NOTE [Memory budget] Rule 6).

        The same choice as for a new entry of our own: oldest saved first, and in
        backward only entries not used yet (Rule 5).
        """
        with self._critical():
            self._reap()
            self._evict_oldest(need, in_use_too=self.phase is not Phase.BACKWARD)
            self._throttle(need)

    def _evict_oldest(self, need: int, in_use_too: bool, protect: Entry | None = None) -> int:
        """Evict resident entries, oldest saved first, until ``need`` bytes leave.

        NOTE [Swap policy] Rule 1. ``in_use_too`` also offers the entries already
        used or brought back (``_returned``): fine in forward and between steps, but
        in backward they are in use (Rule 5). ``protect`` is never evicted.
        Casts of parameters go first, whatever their age: dropping them costs no
        copy (Rule 10). Returns the bytes evicted.
        """
        freed = 0
        if self._resident_casts:
            casts = self._resident_casts
            candidates = ((e.seq, e.nbytes) for e in casts.values() if e is not protect)
            for key in plan_evictions(candidates, need):
                victim = casts[key]
                self._evict(victim)
                freed += victim.nbytes
            if freed >= need:
                return freed
        on_device = self._resident
        if in_use_too and self._returned:
            on_device = {**self._resident, **self._returned}
        if not on_device:
            return freed  # nothing left to evict (at limit=0 in backward, the common case)
        candidates = ((e.seq, e.nbytes) for e in on_device.values() if e is not protect)
        for key in plan_evictions(candidates, need - freed):
            victim = on_device[key]
            self._evict(victim)
            freed += victim.nbytes
        return freed

    def _evict(self, entry: Entry) -> None:
        """Send a resident entry to the host (or just drop its device copy if it has one)."""
        if entry.source is not None:
            self._unlist(entry)
            self.budget.release(entry.nbytes)
            self._drop_cast(entry)
            return
        if entry.where is _BOTH:
            # The host copy is still valid (Rule 4): dropping the device copy is free.
            self._unlist(entry)
            entry.storage = None
            entry.where = _HOST
            self.budget.release(entry.nbytes)
            return
        storage = entry.storage
        if storage.data_ptr() != entry.ptr or storage.nbytes() != entry.nbytes:
            # Rule 9: resized since it was saved; a copy now would not hold the saved bytes.
            self._unlist(entry)
            entry.where = _OWNED
            self.budget.release(entry.nbytes)
            return
        block = self.pool.acquire(entry.nbytes)  # may raise LMSError; nothing changed yet
        self._unlist(entry)
        self.budget.leaving(entry.nbytes)
        self._send_out(entry, block)

    def _unlist(self, entry: Entry) -> None:
        # In at most one of the three. ``_returned`` first: an entry dies mostly in
        # backward, after its last use.
        seq = entry.seq
        if self._returned.pop(seq, None) is None and self._resident.pop(seq, None) is None:
            self._resident_casts.pop(seq, None)

    def _drop_cast(self, entry: Entry) -> None:
        """Let go of a parameter's cast: backward makes it again (Rule 10). Uncharged."""
        entry.storage = None
        entry.where = _DROPPED

    def _send_out(self, entry: Entry, block: Any) -> None:
        entry.block = block
        flat = self._blank(torch.uint8).new().set_(entry.storage)
        entry.copy = self.transfers.to_host(flat, block)
        entry.where = _OUTGOING
        self._outgoing.append(entry)
        self._outgoing_bytes += entry.nbytes
        self._swapped.append(entry)

    def _reap(self) -> None:
        """Finish copies whose events have completed; never blocks."""
        while self._outgoing and self.transfers.done(self._outgoing[0].copy):
            entry = self._outgoing.popleft()
            self._outgoing_bytes -= entry.nbytes
            entry.copy = None
            if entry.refs == 0:
                self.budget.release(entry.nbytes, leaving=True)
                self.pool.release(entry.block)
                entry.storage = entry.block = None
                entry.where = _DEAD
            elif entry.wanted:
                self.budget.stay(entry.nbytes)
                entry.wanted = False
                entry.where = _BOTH
                self._returned[entry.seq] = entry
            else:
                entry.storage = None  # Rule 4: freed only now that the copy is done
                entry.where = _HOST
                self.budget.release(entry.nbytes, leaving=True)
        while self._graveyard and self.transfers.done(self._graveyard[0]):
            self._graveyard.popleft()

    # -- unpack: backward ---------------------------------------------------

    def _unpack(self, packed: Any) -> torch.Tensor:
        if type(packed) is not Packed:
            if type(packed) is Kept:
                return packed.unwrap()  # Rule 8
            return packed  # not ours: returned as saved
        entry = packed.entry
        if entry.counter._version != entry.version:  # Rule 8, before anything changes
            packed.check_version()  # raises autograd's error
        lock = self.lock
        lock.acquire()  # the critical section (Rule 7), inline: see _Section
        self._depth += 1
        try:
            task = _current_graph_task_id()
            if task not in self._tasks:  # the first unpack of a backward, or outside one
                self._track_backward(task)
            if self._outgoing or self._graveyard:
                self._reap()
            if entry.where is _DEVICE:
                never_used = self._resident.pop(entry.seq, None)
                if never_used is None:
                    never_used = self._resident_casts.pop(entry.seq, None)
                if never_used is not None:
                    # Never swapped, now in use: not a candidate for eviction in backward.
                    self._returned[entry.seq] = never_used
            else:
                self._bring_back(entry)
            storage = entry.storage
            if self.budget.excess() > 0:  # gradients grow during backward
                self._enforce_limit(protect=entry)
            if self._cursor >= 0:  # else nothing swapped is still out: nothing to fetch
                self._prefetch()
        finally:
            if self._deferred and self._depth == 1:
                self._leave_section()  # releases what died meanwhile first
            else:
                self._depth -= 1
                lock.release()
        blank = self._blanks.get(packed.dtype)
        if blank is None:
            blank = self._blank(packed.dtype)
        return blank.new().set_(storage, packed.offset, packed.size, packed.stride)

    def _bring_back(self, entry: Entry) -> None:
        """Make a swapped entry usable on the device (it may still be on its way out)."""
        if entry.where is _DROPPED:
            entry.storage = entry.source.cast(entry.nbytes)  # Rule 10
            entry.where = _BOTH
            self.budget.charge(entry.nbytes)
            self._returned[entry.seq] = entry
            stats = self.runtime.stats
            stats.recasts += 1
            stats.recast_bytes += entry.nbytes
            return
        if entry.where is _HOST:
            self._fetch(entry)  # not prefetched: on demand
        if entry.where is _INCOMING:
            self.transfers.wait(entry.copy)
            entry.copy = None
            entry.where = _BOTH
            del self._prefetched[entry.seq]
            self._returned[entry.seq] = entry
        elif entry.where is _OUTGOING:
            entry.wanted = True

    def _blank(self, dtype: torch.dtype) -> torch.Tensor:
        """An empty tensor of ``dtype`` on the device: ``.new()`` of it is another one."""
        blank = self._blanks.get(dtype)
        if blank is None:
            blank = self._blanks[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return blank

    def _track_backward(self, task: int) -> None:
        """Note the start of a backward, and have autograd tell us when it ends.

        Backwards nest (reentrant checkpointing runs one inside another): only the
        end of the outermost one finishes the step. The end is an autograd final
        callback: finished copies are reaped, entries still alive
        (``retain_graph=True``) are put back under the limit, and the next
        backward prefetches from the top again. Autograd skips final callbacks
        when a backward raises; the next training forward ends such a backward.
        """
        if task == -1:  # unpacked outside a backward (e.g. reading ``grad_fn._saved_*``)
            if self.phase is not Phase.BACKWARD:
                self.phase = Phase.BACKWARD
                self._cursor = len(self._swapped) - 1
            return
        if task in self._tasks:
            return
        if not self._tasks:
            self.phase = Phase.BACKWARD
            self._cursor = len(self._swapped) - 1
        self._tasks.add(task)
        done = functools.partial(self._backward_done, task)
        torch.autograd.Variable._execution_engine.queue_callback(done)

    def _backward_done(self, task: int) -> None:
        with self._critical():
            self._tasks.discard(task)
            self._reap()
            if self._tasks:
                return  # an inner backward ended; the outer one goes on
            self._end_backward()

    def _end_backward(self) -> None:
        self.phase = Phase.IDLE
        # Put what retain_graph kept back under the limit before anything else
        # runs; entries with a host copy leave for free.
        need = self.budget.excess()
        if need > 0:
            self._evict_oldest(need, in_use_too=True)

    def _fetch(self, entry: Entry) -> None:
        try:
            copy = self.transfers.to_device(entry.block, entry.nbytes)
        except RuntimeError as e:
            if is_oom(e):
                raise self.runtime.oom_error(e, "while bringing a saved tensor back") from e
            raise
        entry.copy = copy
        entry.storage = copy.tensor.untyped_storage()
        entry.where = _INCOMING
        self.budget.charge(entry.nbytes)
        self._prefetched[entry.seq] = entry

    def _prefetch(self) -> None:
        """Issue the next host-to-device copies (NOTE [Swap policy], Rule 2).

        An entry whose copy out is still in flight is a candidate too: it is
        marked ``wanted`` and keeps its device copy when the copy completes, which
        costs no transfer at all.
        """
        swapped = self._swapped
        i = self._cursor
        while i >= 0 and not _pending(swapped[i]):
            i -= 1  # already back, or dead: never look at it again
        self._cursor = i
        if i < 0:
            return  # nothing swapped that is not back already
        # The keys are positions in _swapped, newest first, pending entries only.
        candidates = ((j, swapped[j].nbytes) for j in range(i, -1, -1) if _pending(swapped[j]))
        lookahead = self.runtime.config.lookahead
        keys = plan_prefetch(candidates, self.budget.headroom(), len(self._prefetched), lookahead)
        for j in keys:
            entry = swapped[j]
            if entry.where is _OUTGOING:
                entry.wanted = True
            else:
                self._fetch(entry)
        if keys:
            self._cursor = keys[-1] - 1

    # -- death --------------------------------------------------------------

    def drop(self, entry: Entry) -> None:
        """One ``Packed`` of ``entry`` was freed by autograd (or the garbage collector).

        Called by ``Packed.__del__``, on whichever thread freed it (Rule 7).
        """
        lock = self.lock
        lock.acquire()  # the critical section (Rule 7), inline: see _Section
        self._depth += 1
        try:
            entry.refs -= 1
            if entry.refs > 0:
                return
            if self._depth > 1:
                # Freed inside another section of this thread (the garbage collector
                # ran mid-way): Rule 7, released when the outermost one ends.
                self._deferred.append(entry)
                return
            self._release(entry)
        finally:
            if self._deferred and self._depth == 1:
                self._leave_section()  # releases what died meanwhile first
            else:
                self._depth -= 1
                lock.release()

    def _release(self, entry: Entry) -> None:
        """Free what a dead entry holds (device copy, host block, budget)."""
        index = self._index
        if index.get(entry.ptr) is entry:
            del index[entry.ptr]
        where = entry.where
        if where is _OUTGOING or where is _DEAD:
            return  # OUTGOING: _reap frees it once the copy is done
        if where is _DEVICE or where is _BOTH:
            self._unlist(entry)
            self.budget.release(entry.nbytes)
        elif where is _INCOMING:
            # The copy still writes the device buffer: keep it alive until done.
            self._graveyard.append(entry.copy)
            self._prefetched.pop(entry.seq, None)
            self.budget.release(entry.nbytes)
        if entry.block is not None:
            self.pool.release(entry.block)
        entry.storage = entry.block = entry.copy = None
        entry.where = _DEAD

    # -- teardown -----------------------------------------------------------

    def drain(self) -> None:
        """Wait for every copy in flight and finish its bookkeeping."""
        with self._critical():
            while self._outgoing:
                self.transfers.block_on(self._outgoing[0].copy)
                self._reap()
            for copy in self._graveyard:
                self.transfers.block_on(copy)
            self._reap()

    def live_entries(self) -> int:
        """Entries autograd still holds (for tests and diagnostics)."""
        with self.lock:
            return len(self._index)
