"""The gradient side of weight paging: from AccumulateGrad to the host accumulators.

``GradientSide`` is the half of ``WeightPaging`` (lms/weights.py) that runs in
backward: it takes each paged parameter's gradient aside before AccumulateGrad,
sends the final one to the host (``GradOffload``, lms/weights_grads.py), waits for a
gradient reducer that deferred the offload, and ends the backward, also one that
raised. Rule numbers refer to NOTE [Weight paging] in lms/weights.py: Rules 5, 8,
13, 15 and 18 are carried out here.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from .errors import LMSError
from .weights_grads import GradOffload, typed_view
from .weights_param import PagedParam, Phase, Where
from .weights_torch import graph_task_id

if TYPE_CHECKING:
    from .weights import WeightPaging

__all__ = ["GradientSide", "GradsReady"]


class _BackwardEnd:
    """The end-of-backward callback; dropped unrun when the backward raised (Rule 13).

    The engine holds queued callbacks in the backward's graph task and frees them
    with it, before the error reaches the caller. One that is freed without having
    run tells the pager that the backward failed.
    """

    __slots__ = ("pager", "ran", "__weakref__")

    def __init__(self, pager: WeightPaging) -> None:
        self.pager = weakref.ref(pager)
        self.ran = False

    def __call__(self) -> None:
        self.ran = True
        pager = self.pager()
        if pager is not None:
            pager._on_backward_end()

    def __del__(self) -> None:
        pager = self.pager()
        if not self.ran and pager is not None and not sys.is_finalizing():
            pager._backward_abandoned()


def _reducer_first_error(name: str) -> LMSError:
    """NOTE [Weight paging] Rule 8: the reducer would reduce a partial gradient."""
    return LMSError(
        f"the gradient reducer announced {name!r} before LMS could add the gradient it "
        "accumulated on the host, so the reduced value would miss it; call lms.enable "
        "before ddl.wrap (LMS's hooks must run first) when accumulating gradients"
    )


class GradsReady:
    """What :meth:`GradientSide.defer_grad_offload` hands a gradient reducer (Rule 8).

    Call it with parameters whose ``.grad`` holds its final (reduced) value; LMS
    then moves those gradients to the host. ``close()`` says the reducer is gone
    (``ddl``'s handle calls it from ``remove()``): gradients still awaited go to
    the host as they are, and once no reducer defers, LMS offloads each gradient
    as soon as AccumulateGrad has made it again. Closed inside a backward (from a
    hook), it takes effect at that backward's end, after the reducer's own end of
    backward, which may still reduce and announce. Idempotent. Once in effect, a
    call announces nothing: it would send gradients that another reducer, still
    deferring, is about to reduce.
    """

    __slots__ = ("_pager", "closed")

    def __init__(self, pager: GradientSide) -> None:
        self._pager = pager
        self.closed = False

    def __call__(self, params: Iterable[torch.Tensor]) -> None:
        if self.closed and self not in self._pager._reducers:
            return  # its reducer is gone (Rule 8)
        self._pager.grads_ready(params)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._pager._reducer_gone(self)


class GradientSide:
    """Backward-time methods of :class:`~lms.weights.WeightPaging`.

    A base class of ``WeightPaging`` only: its state is initialized in
    ``WeightPaging.__init__`` and shared with the forward side. This side owns
    ``grads`` (the offload), ``_reducers`` / ``_awaiting`` / ``_reducer_first`` /
    ``_ended_awaiting`` (deferring reducers, Rule 8), ``_callback_queued`` /
    ``_requeued`` (the end-of-backward callbacks, Rule 13) and ``_create_graph``
    (Rule 15); it reads the forward side's phase, residency and trace.
    """

    grads: GradOffload
    _awaiting: set[PagedParam]
    _reducers: set[GradsReady]  # open ones; while any is, offloads wait for it
    _reducer_first: bool
    _ended_awaiting: bool
    _callback_queued: int | None
    _requeued: bool
    _create_graph: bool

    # -- a gradient reducer that defers the offload (Rule 8) -------------------

    def defer_grad_offload(self) -> GradsReady:
        """Leave gradients on the device until a reducer says they are final (Rule 8).

        Returns:
            A :class:`GradsReady`: call it with parameters whose ``.grad`` now holds
            its final (reduced) value; LMS then moves those gradients to host.
            Parameters LMS does not page are ignored. Its ``close()`` ends the
            deferral (``ddl``'s ``remove()`` calls it), so LMS can be kept after
            the reducer is removed.

        Example:
            >>> grads_ready = handle.defer_grad_offload()  # doctest: +SKIP
            >>> sync = ddl.wrap(model, grad_ready=grads_ready)  # doctest: +SKIP
            >>> sync.remove()  # LMS goes on, offloading at once  # doctest: +SKIP
        """
        with self.rt.lock:
            ready = GradsReady(self)
            if not self._removed:
                self._reducers.add(ready)
            return ready

    @property
    def _deferred(self) -> bool:
        return bool(self._reducers)

    def _reducer_gone(self, ready: GradsReady) -> None:
        """A reducer closed its ``GradsReady``: stop waiting for it (Rule 8)."""
        with self.rt.lock:
            if self._callback_queued is not None or self._requeued:
                # Closed inside a backward (ddl's remove() from a hook): the reducer may
                # still write reduced values into ``.grad`` (a bucket in flight) and
                # announce them in its own end-of-backward. Stop waiting at this
                # backward's end, after that (_drop_closed_reducers).
                return
            self._drop_closed_reducers()

    def _drop_closed_reducers(self) -> None:
        """Stop waiting for the reducers that closed (Rule 8)."""
        self._reducers = {r for r in self._reducers if not r.closed}
        if self._reducers or self._removed:
            return
        self._reducer_first = False
        # What they still owed goes to the host unreduced, as without a reducer.
        ended = self._ended_awaiting
        self._awaiting_flush()
        if ended:
            self._finish_backward()

    def grads_ready(self, params: Iterable[torch.Tensor]) -> None:
        """Offload the gradients of ``params`` now (see :meth:`defer_grad_offload`).

        Raises:
            LMSError: if a gradient arrives that LMS cannot combine correctly with the
                one it accumulated on the host (Rule 8: the reducer's hook ran first).
        """
        with self.rt.lock:
            for p in params:
                pp = self._by_param.get(id(p))
                if pp is None:
                    continue
                if pp in self._awaiting:
                    self._awaiting.discard(pp)
                    self._send(pp)
                elif (
                    self.phase is Phase.DEVICE
                    and p.grad is not None
                    and p.grad is not pp.acc
                    and not pp.stand_in_shown  # Rule 18: already sent
                ):
                    # Announced before LMS's own grad hook ran (the reducer's hook came
                    # first), or a parameter unused here that the reducer filled in.
                    if not pp.grad_taken:
                        # Unused here: _take_grad never ran, so the reducer made or
                        # overwrote ``.grad`` (it was not the accumulator) and its value
                        # is the whole gradient; acc_valid may be stale from an earlier
                        # step. Taken, so that phase HOST shows it in ``.grad`` (Rule 8).
                        pp.acc_valid = False
                        pp.grad_taken = True
                    else:
                        # The reducer's hook runs before LMS's (wrapped before enable).
                        # Harmless until the host holds part of a gradient: from now
                        # on, a fold in _grad_hook would come after the reducer copied
                        # the partial value, so it raises too.
                        self._reducer_first = True
                        if pp.acc_valid:
                            raise _reducer_first_error(pp.name)
                    self._send(pp)
            if self._ended_awaiting and not self._awaiting:
                self._ended_awaiting = False
                self._finish_backward()

    def _check_no_awaiting(self, what: str) -> None:
        if self._awaiting:
            names = ", ".join(sorted(pp.name for pp in self._awaiting)[:5])
            raise LMSError(
                f"{what} came before grads_ready() was called for {len(self._awaiting)} "
                f"paged parameter(s) ({names}); the gradient reducer that called "
                "defer_grad_offload() must call grads_ready(params) once their .grad is final"
            )

    def _awaiting_flush(self) -> None:
        for pp in list(self._awaiting):
            self._awaiting.discard(pp)
            self._send(pp)
        self._ended_awaiting = False

    # -- gradient hooks (Rules 5 and 18) ---------------------------------------

    def _arm(self, pp: PagedParam) -> None:
        """Give a trainable parameter its accumulator and gradient hooks (Rule 5)."""
        if pp.acc is None:
            pp.acc_block = self.rt.pool.acquire(pp.nbytes)
            pp.acc = typed_view(pp.acc_block, pp.param)
        h = self._handles
        h.append(pp.param.register_hook(functools.partial(self._take_grad, pp)))
        h.append(pp.param.register_post_accumulate_grad_hook(self._grad_hook))
        pp.armed = True

    def _queue_end(self) -> None:
        # Keyed by graph task: if a backward raised, its callback never ran, and the
        # next backward must still queue its own.
        task = graph_task_id()
        if self._callback_queued != task:
            self._callback_queued = task
            end = _BackwardEnd(self)
            torch.autograd.Variable._execution_engine.queue_callback(end)

    def _take_grad(self, pp: PagedParam, incoming: torch.Tensor) -> None:
        """Just before AccumulateGrad: move what ``.grad`` holds into the accumulator.

        ``.grad`` is whatever the user left there (Rule 5): the accumulator itself
        (possibly zeroed in place), None (zero_grad(set_to_none=True)), or a tensor
        they assigned. AccumulateGrad then starts from None and makes a fresh device
        gradient, which the grad hook copies out and adds to the accumulator.
        """
        with self.rt.lock:
            p = pp.param
            g = p.grad
            if pp.stand_in_shown:
                # Sent in an earlier backward of this phase that has not ended (it raised,
                # and its end is still to come): the accumulator holds it (Rule 18).
                self._settle_stand_in(pp)
                g = pp.acc if pp.acc_valid else None
            if g is None:
                # A second backward in the same DEVICE phase finds None because LMS
                # took the gradient before; only a user's zero_grad clears it.
                pp.acc_valid = pp.acc_valid and pp.grad_taken
            elif g is not pp.acc:
                if g.shape != p.shape:
                    raise LMSError(
                        f"parameter {pp.name!r} has a .grad of shape {tuple(g.shape)}; "
                        "assign gradients of the parameter's shape"
                    )
                self.grads.reap(block=True)  # earlier adds into acc must land first
                with torch.no_grad():
                    pp.acc.copy_(g)
                pp.acc_valid = True
            else:
                pp.acc_valid = True
            pp.grad_taken = True
            p.grad = None

    def _grad_hook(self, param: torch.Tensor) -> None:
        with self.rt.lock:
            pp = self._by_param.get(id(param))
            if pp is None or self.phase is not Phase.DEVICE:
                return
            self._queue_end()
            if param.grad is not None and param.grad.requires_grad:
                raise LMSError(
                    f"backward(create_graph=True) made the gradient of paged parameter "
                    f"{pp.name!r} part of a graph, which LMS cannot move to the host; take "
                    "higher-order gradients with torch.autograd.grad(..., inputs=...), "
                    "or raise min_size or limit so that this parameter is not paged"
                )
            # Rule 4: every use of the parameter in this backward has run.
            self._release(pp)
            if self._deferred:
                if param.grad is not None and not pp.stand_in_shown:  # Rule 18: not sent yet
                    if pp.acc_valid:
                        if self._reducer_first:
                            # The reducer already copied this .grad, without the fold.
                            raise _reducer_first_error(pp.name)
                        self.grads.fold(pp)  # Rule 8: the reducer sees the whole sum
                    self._awaiting.add(pp)
                return
            self._send(pp)

    def _send(self, pp: PagedParam) -> None:
        """Move ``pp``'s device gradient to the host; ``.grad`` shows a placeholder (Rule 18)."""
        if pp.param.grad is None or pp.stand_in_shown:
            return  # nothing to send, or already sent (the placeholder shows)
        self.grads.send(pp)
        if self.phase is not Phase.DEVICE:
            return
        if pp.stand_in is None:
            zero = torch.zeros((), dtype=pp.param.dtype, device=pp.shell.device)
            pp.stand_in = zero.expand(pp.param.shape)
        pp.param.grad = pp.stand_in
        pp.stand_in_version = pp.stand_in._version
        pp.stand_in_shown = True

    def _settle_stand_in(self, pp: PagedParam) -> None:
        """Fold what the user did to the placeholder ``.grad`` into the accumulator (Rule 18)."""
        if not pp.stand_in_shown:
            return
        pp.stand_in_shown = False
        g = pp.param.grad
        if g is None:  # zero_grad() (set_to_none)
            pp.acc_valid = False
        elif g is not pp.stand_in or g._version != pp.stand_in_version:
            # zero_grad(set_to_none=False) zeroed it, or the user assigned a gradient.
            self.grads.reap(block=True)  # adds into acc must land first
            with torch.no_grad():
                pp.acc.copy_(g)
            pp.acc_valid = True

    # -- the end of backward (Rules 13 and 15) ---------------------------------

    def _on_backward_end(self) -> None:
        with self.rt.lock:
            self._callback_queued = None
            self._bwd_cursor = None
            if self._removed:
                return
            if self._deferred and not self._requeued:
                # Rule 8: run once more after the end-of-backward work that a reducer
                # queued during this backward (it may still call grads_ready there).
                # A _BackwardEnd again, not the bound method: if the reducer's own
                # end raises (a failed collective), it is dropped unrun and Rule 13
                # still ends this backward.
                self._requeued = True
                torch.autograd.Variable._execution_engine.queue_callback(_BackwardEnd(self))
                return
            self._requeued = False
            self._drop_closed_reducers()  # closed in this backward: the reducer's end ran
            self.grads.reap(block=True)
            if self._create_graph:
                # Rule 15: the graph this backward built reads the weights it fetched,
                # at nodes LMS cannot hook; they stay until the next backward ends.
                self._create_graph = False
                for pp in self.paged:
                    if pp.where is not Where.OUT:
                        pp.held = True
                        self._kept.add(pp)
                    if pp.grad_taken:
                        # autograd.grad(loss, params) took .grad aside (Rule 5) without
                        # accumulating: show it again, so zero_grad() reaches it.
                        self._show_grad(pp)
                self._graph_pending = True
                return
            if self._awaiting:
                # Rule 8: the reducer still owes grads_ready; finish when it calls.
                self._ended_awaiting = True
                return
            self._finish_backward()

    def _show_grad(self, pp: PagedParam) -> None:
        """Point ``.grad`` at the accumulator again (or None), in phase DEVICE too."""
        p = pp.param
        self._settle_stand_in(pp)
        p.data = pp.master  # .grad must match the data's device when assigned
        p.grad = pp.acc if pp.acc_valid else None
        p.data = pp.shell  # phase DEVICE: the data is the shell (Rule 1)
        pp.grad_taken = False

    def _backward_abandoned(self) -> None:
        """A backward that started ended without its callback: it raised (Rule 13)."""
        with self.rt.lock:
            if self._removed or self.phase is Phase.HOST:
                return
            self._callback_queued = None
            self._bwd_cursor = None
            self._requeued = False
            self._create_graph = False
            self._reducers = {r for r in self._reducers if not r.closed}
            # Gradients a deferred reducer never announced go to the accumulators, as
            # AccumulateGrad would have left them in ``.grad`` without LMS.
            self._awaiting_flush()
            self.grads.reap(block=True)
            self._finish_backward()

    def _finish_backward(self) -> None:
        # Another graph built before this backward may still be waiting for its own
        # (two forwards, two backwards): its pre-backward hooks must stay. Only the
        # handles of tensors that are gone are dropped.
        self._out_hooks = [h for h in self._out_hooks if h.hooks_dict_ref() is not None]
        self._kept.clear()
        self._graph_pending = False
        self.tracker.finish_step()
        self._enter_host()
