"""Weight paging: parameters, gradients and optimizer state through host memory.

``attach_weight_paging(model, runtime)`` makes a model whose parameter state does
not fit under ``limit`` trainable with an unchanged loop. The plan (which
parameters, what to prefetch) is pure and lives in ``lms/weights_plan.py``; this
file carries it out in forward with module hooks and the runtime's streams, and
``lms/weights_backward.py`` (a base class of ``WeightPaging``) in backward, with
gradient hooks and end-of-backward callbacks. One parameter's state is a
``PagedParam`` (``lms/weights_param.py``); what paging assumes about torch's own
modules is in ``lms/weights_torch.py``.

# NOTE [Weight paging]
#
# Rule 1 (one Parameter, two homes). A paged parameter stays the same
#   ``nn.Parameter`` object, so optimizers, tied modules and state_dict keys keep
#   their references. Its ``.data`` is one of two tensors:
#   - the host *master* (a block of the runtime's host pool, pinned where an
#     accelerator exists), which always holds the current values;
#   - the device *shell*, a device tensor whose storage is resized to 0 bytes
#     when released and back to full size (then filled from the master) when
#     fetched.
#   Phase HOST (between steps): ``.data`` is the master and ``.grad`` the host
#   gradient accumulator. This is what ``optimizer.step()``, ``zero_grad()``,
#   ``state_dict()`` and ``load_state_dict()`` see. Phase DEVICE (from the first
#   forward hook to the end of backward): ``.data`` is the shell (and ``.grad``
#   still the host accumulator until backward takes it, Rule 5).
# Rule 2 (resize the storage, do not re-point). Autograd saves parameters and
#   views of them (``F.linear`` saves ``weight.t()``). Those views share the
#   shell's storage object, so resizing it frees their memory after forward and
#   refilling it before backward makes them valid again. Re-pointing ``.data``
#   instead would leave the saved views holding the old device memory. Fills go
#   through an alias with its own version counter, so autograd's saved-tensor
#   version checks are untouched.
# Rule 3 (fetch before use, always). A module's forward pre-hook and its
#   pre-backward hook (a tensor hook on each output that requires grad) make its
#   paged parameters resident, the compute stream waiting on the fill's event.
#   Prefetching only hides latency (NOTE [Weight paging plan] Rule 3), so a
#   changed order costs time, never correctness. A module whose outputs carry no
#   grad cannot get a pre-backward hook; its parameters stay resident until the
#   backward ends. A weight read outside the forward of a module that owns it
#   (``x @ self.wte.weight.T`` in a parent) is fetched then by its guard (Rule 16)
#   and held until the backward ends, with a warning; ``register_external_parameter``
#   declares such a use, so that the parent's own hooks fetch, prefetch and release
#   it. LMS declares the
#   one such use inside torch.nn itself: ``nn.MultiheadAttention`` reads
#   ``out_proj``'s weights in its own forward and never calls ``out_proj``. LMS's
#   pre-hook is the first of a module's forward pre-hooks, so a user's pre-hook
#   that reads the weights (``torch.nn.utils.weight_norm``) finds them resident.
# Rule 4 (release after use). In forward the post-hook releases (refcounted: a
#   tied weight is used by two modules). In backward the post-accumulate-grad
#   hook releases: AccumulateGrad runs once all uses of the parameter have run,
#   so no later node of this backward reads it. Frozen parameters and prefetches
#   that were not used are released when the backward ends.
# Rule 5 (gradients leave as soon as final). ``.grad`` keeps pointing at the
#   host accumulator through forward (so ``zero_grad()`` called between forward
#   and backward clears it, as without LMS); a tensor hook on the parameter moves
#   it aside just before AccumulateGrad, which then builds a fresh device
#   gradient. The post-accumulate-grad hook copies that to host on the d2h
#   stream (straight into the accumulator if it is empty, else into one of a
#   small ring of staging blocks, added to the accumulator once the copy is
#   done: the same single fp32 add AccumulateGrad would have done, so results
#   are bitwise equal, and no host allocation after the first accumulation),
#   sets ``.grad`` to a zero placeholder (Rule 18) and drops the device gradient
#   when the copy's event has completed. The host add runs on a single helper thread (so a large add
#   does not hold up the autograd thread's kernel launches); entering phase HOST
#   waits for it and points ``.grad`` at the accumulator again. The copy, the
#   staging ring and the adder thread are ``GradOffload`` (lms/weights_grads.py).
#   A parameter frozen at enable has no accumulator or hooks; the first forward
#   that finds it trainable (``requires_grad_(True)`` between steps) gives it both,
#   else AccumulateGrad would leave a device ``.grad`` behind. (The limit check of
#   NOTE [Weight paging plan] Rule 5 counted no gradient for it.)
# Rule 6 (stream ordering, see NOTE [Copy ordering]). Shell storage is resized on
#   the compute stream, so the caching allocator recycles it in compute order.
#   A fill waits for the compute stream, runs on the h2d stream and records an
#   event; compute waits on that event before the first use, and before freeing
#   a shell whose fill was never used. Entering phase HOST synchronizes both copy
#   streams once, because the host step then reads the accumulators and writes
#   the masters that in-flight copies may still touch.
# Rule 7 (the optimizer steps on the host). The user's ``torch.optim`` optimizer
#   steps the masters in phase HOST; its state lives on the host. Why, measured,
#   and how optimizers made before ``lms.enable`` keep working: NOTE [Host
#   optimizer step] in lms/weights_optim.py.
# Rule 8 (the meeting point with a gradient reducer, e.g. ``ddl.wrap``). lms and
#   ddl do not import each other. ``handle.defer_grad_offload()`` returns
#   ``grads_ready(params)``. From then on the post-accumulate-grad hook of a
#   paged parameter leaves its ``.grad`` on the device, and LMS offloads it only
#   when ``grads_ready`` is called with that parameter: the reducer calls it
#   after writing the reduced values back into ``.grad`` (or straight from its
#   own hook in a step where it does not reduce). Every paged parameter whose
#   gradient was produced in a backward must be passed to ``grads_ready`` before
#   the next forward or optimizer step, else LMS raises ``LMSError`` naming the
#   parameters rather than stepping on unreduced gradients. Parameters that are
#   not paged may be passed too; they are ignored. With gradient accumulation the
#   reducer must see the whole sum, as without LMS: LMS's grad hook first adds
#   the host-accumulated part into ``.grad`` on the device, so ``lms.enable``
#   must come before ``ddl.wrap`` (hooks run in registration order); the other
#   order raises ``LMSError`` instead of reducing a partial gradient (once an
#   announcement has come before LMS's hook, any later host-accumulated part
#   raises, in the reducer's own no-sync step or in the synced one). LMS ends
#   its backward in a second end-of-backward callback, after the reducer's own,
#   so gradients the reducer writes there (parameters unused on this rank) are
#   taken too: such a gradient replaces whatever the accumulator held, and
#   ``.grad`` shows it in phase HOST as it would without LMS. ``grads_ready`` is a
#   ``GradsReady``; its ``close()`` (ddl's ``remove()`` calls it) ends the wait:
#   gradients still awaited go to the host as they are, later ones at once. Closed
#   inside a backward (``remove()`` from a hook), the wait ends with that backward,
#   after the reducer's own end: ddl still writes the buckets it launched into
#   ``.grad`` and announces them then, and a gradient sent earlier would have left
#   LMS's placeholder (Rule 18) for it to write into. A closed ``GradsReady``
#   called after that announces nothing (another reducer may be deferring).
# Rule 9 (activations are not ours). The activation path never swaps a
#   parameter or a view whose base is one (NOTE [Activation swapping] Rule 2),
#   which covers everything autograd saves from a shell; a copy made from a
#   shell (an autocast cast) is an ordinary activation. ``is_paged_storage(t)``
#   answers for any other path that needs to ask.
# Rule 11 (fetch for backward only what backward reads). Backward reads a
#   weight's values only through what autograd saved (or through a recompute,
#   which runs forward hooks and fetches). Two common cases save no weight: an
#   ``nn.Embedding`` lookup (its gradient needs only the indices), and an
#   ``nn.Linear`` under autocast with fp32 weights (autocast saves its
#   low-precision cast; lms/activations.py swaps that like any activation). For
#   those module calls the pre-backward hook fetches nothing, which removes a
#   third of a transformer's weight traffic under autocast (forward in, grad
#   out, no backward in). The rule is an allow-list of exact types, decided per
#   call; if a future torch saved the weight anyway, backward would meet an empty
#   storage and fail loudly, never compute with stale values.
# Rule 10 (a model larger than the device). It may be built on the host and
#   enabled with ``lms.enable(model, device="cuda", ...)``: paged parameters are
#   copied straight into their masters and never occupy the device whole; the
#   parameters that stay resident, and the buffers, are moved to the device.
#   ``remove()`` brings every parameter to the device (which must then fit), or
#   with ``remove(to_device=False)`` leaves them on the host.
# Rule 12 (a copy of the model comes without LMS). ``copy.deepcopy(model)`` and
#   pickling copy the model's hook dicts; every hook here is a ``ModelHook``
#   (lms/runtime.py), which copies to a no-op, so the copy does not drag this
#   pager (locks, host pool, budget) along. Its paged parameters get the masters'
#   values (Rule 1), so they are on the host: ``.to(device)`` the copy if it fits.
#   Between a training forward and the end of its backward the shells are
#   released, and ``Parameter.__deepcopy__`` would read empty storage (a crash on
#   the CPU). So each paged module's ``_parameters`` is moved after its hook dicts
#   in ``__dict__`` (which deepcopy and pickle visit in order), and its forward
#   pre-hook, copied first, seeds deepcopy's memo with parameters made from the
#   masters; pickling then raises ``LMSError`` (pickle between steps) before any
#   shell is read.
# Rule 13 (a backward that raises leaves state as without LMS). An exception inside
#   backward (a custom Function, a hook, an OOM) skips the end-of-backward callback,
#   and gradients LMS took would stay hidden (``.grad`` None) while the accumulator
#   holds them, so the user's ``zero_grad()`` could not clear them. The callback is
#   a ``_BackwardEnd`` object (lms/weights_backward.py): the engine frees it unrun
#   with the failed backward, before the error reaches the caller, and its
#   ``__del__`` ends the backward then: ``.grad`` points at the accumulators again,
#   holding what AccumulateGrad had summed before the error, exactly as without LMS,
#   and the shells are released. The second callback of Rule 8 is a ``_BackwardEnd``
#   too, so a reducer whose own end-of-backward raises (a collective that timed out)
#   leaves the same state. On the CPU the backward runs on the caller's thread,
#   which frees the callback before the error reaches it. On CUDA a device thread
#   may free it a moment after the caller has seen the error and called
#   ``zero_grad()``; Rule 18 keeps that correct (simulated on the CPU; the gpu test
#   ``test_cuda_failed_backward_then_zero_grad_leaves_no_partial_gradient`` has not
#   run yet).
# Rule 14 (``remove()`` mid-step). Between a forward and the end of its backward
#   autograd holds views of the shells (Rule 2). ``remove()`` then fills every
#   shell from its master and makes it the parameter's data (instead of a fresh
#   copy), so a backward after ``remove()`` reads valid weights and accumulates
#   into ``.grad`` as without LMS. ``remove(to_device=False)`` fills them too, but
#   the parameters move to the host, so such a backward fails in AccumulateGrad
#   on a device mismatch (loudly) on an accelerator: run it before ``remove``.
# Rule 15 (a backward that builds a graph). ``torch.autograd.grad(loss, x,
#   create_graph=True)`` (a gradient penalty) builds a graph whose nodes save the
#   shells (``grad_x = grad_y @ W``) and run in a later backward at points no
#   module hook sees. A backward that runs with grad mode on therefore keeps every
#   weight it fetched resident (held, Rule 4) until the next backward ends or the
#   optimizer steps, instead of going back to the host: correct, at the cost of
#   those weights' device memory. Gradients it took aside (``autograd.grad(loss,
#   params, create_graph=True)`` runs the Rule 5 hook but accumulates nothing) are
#   shown in ``.grad`` again, so a ``zero_grad()`` before the next backward works.
#   ``backward(create_graph=True)`` that gives a paged parameter a differentiable
#   ``.grad`` is refused with ``LMSError``: the host accumulator cannot carry a
#   graph.
# Rule 16 (reads no hook sees). In phase DEVICE a paged parameter whose shell is
#   not resident (OUT or FILLING) wears the pager's guard class (NOTE [Guarded
#   parameters] in lms/weights_guard.py): ``_enter_device`` and ``_release`` put it
#   on, ``_acquire`` takes it off, and so do ``_enter_host`` and ``remove()``. A
#   read by code outside the owning modules (an L2 penalty after the forward, a
#   norm logged, a parent's forward, a custom Function's backward) then acquires
#   the parameter and holds it until the backward ends, since that code may have
#   saved it for backward where no LMS hook sees the use. Correct, at the cost of
#   a blocking copy and of that parameter's device memory; LMS warns once. A view
#   or ``.detach()`` such a read hands out is fetched with its parameter when read
#   in a later step's window, and refuses reads between steps (NOTE [Guarded
#   parameters] Rule 5) instead of reading freed memory.
# Rule 17 (writes to a shell reach the master). Code may write a resident shell in
#   place in phase DEVICE: ``nn.Embedding(max_norm=...)`` renormalizes the rows it
#   looks up in its forward, and a user may scale or clamp a parameter that
#   backward does not read between forward and backward, as plain PyTorch allows.
#   The master holds the values the next step starts from (Rule 1), so before a
#   written shell is released (and before ``state_dict()``, a deepcopy or
#   ``remove()`` reads the master) it is copied into the master. Written means
#   the parameter's version counter moved since the fill (in-place ops on it, its
#   views and ``.detach()``), or that the guard handed out ``.data`` (Rule 16),
#   whose writes move no counter, or fetched it for an alias kept from an earlier
#   step (which may be such a ``.data``). Unseen: a write through ``.data`` taken while
#   the shell was resident (inside the owning module's forward, or after a guarded
#   read fetched it); that write is lost when the shell is released.
# Rule 18 (a sent gradient stays visible). Once a gradient is sent to the host,
#   ``.grad`` shows a zero placeholder (an expanded one-element device tensor, one
#   per parameter) until the backward's end points it at the accumulator. Were it
#   None, a backward that raised and whose end came only after the user's
#   ``zero_grad()`` (Rule 13 on CUDA) would bring the taken gradient back. The
#   end (``_settle_stand_in``) reads what the user did to the placeholder: set to
#   None, the accumulated gradient is dropped; zeroed in place (its version moved)
#   or replaced, that value goes into the accumulator; untouched, the accumulator
#   holds the gradient. Code that reads ``.grad`` between LMS's grad hook and the
#   end of the backward (another post-accumulate-grad hook) sees zeros, as it saw
#   None before: the value is on its way to the host.
# Rule 19 (autocast's cache). Autocast caches the low-precision cast of each leaf
#   parameter until its region ends, which would keep a copy of every paged weight
#   on the device; so the cache is cleared between paged modules (casts saved for
#   backward are activations, swapped by lms/activations.py under the same
#   budget). But plain autocast casts a weight used twice once, and sums its uses'
#   gradients in low precision before that one cast's backward: clearing between
#   the uses would change the gradient (two casts, summed in fp32). So the clear
#   due after a paged module's forward is made at the next paged module's forward
#   pre-hook, and skipped there while that module's weights were cast since the
#   last clear (a module called again in a row: ALBERT's shared layer) or while a
#   weight tied between modules (``pp.owners`` > 1) has run in fewer of its modules
#   than own it in this forward (counted from the model's forward pre-hook: a
#   checkpointed owner recomputed in backward counts too, with no end of forward
#   after it); the end of the forward makes any clear still due. An exact
#   ``nn.Embedding`` is not counted as an owner: its lookup casts nothing, and
#   counting it kept every cast of GPT's forward (embedding first, tied head last)
#   on the device until the head.
#   Not covered: a module called again after another paged module ran in between
#   (A, B, A), or using its own paged weight before and after paged children: its
#   weight is cast per use. The clears empty the whole cache, so a resident weight
#   used before and after a paged module is cast per use too (only paged modules
#   are hooked; counting resident ones would hook every module).
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._pytree import tree_leaves

from .config import format_bytes
from .errors import LMSError
from .runtime import ModelHook
from .weights_backward import GradientSide, GradsReady
from .weights_grads import GradOffload, paged_strides, typed_view
from .weights_guard import DATA_GET, guard_class, user_stacklevel
from .weights_optim import check_host_step, move_state, warn_if_unfused
from .weights_param import PagedParam, Phase, Residency, Where
from .weights_plan import (
    ModuleNeed,
    OrderTracker,
    ParamInfo,
    WeightPlan,
    check_modules_fit,
    plan_weights,
    prefetch_targets,
)
from .weights_torch import (
    autocast_on,
    backward_reads_weights,
    borrowed_params,
    casts_weights,
    movable,
)

__all__ = ["WeightPaging", "attach_weight_paging", "plan_for_model"]

# Modules looked ahead when prefetching (NOTE [Weight paging plan] Rule 4). A
# transformer block has four paged matrices, so four looks one block ahead: the
# link stays busy through a block's compute. The budget bounds it further. (Not
# yet tuned on a GPU; benchmarks/model_size.py is where to tune it.)
MAX_AHEAD = 4
# Bytes of optimizer state per parameter byte expected on the host (Adam's two
# moments); used only to refuse up front what would exhaust host memory.
HOST_OPTIMIZER_FACTOR = 2


# NOTE [LMS under torch.compile] Rule 3 (lms/runtime.py).
NO_COMPILE = (
    "weight paging does not work under torch.compile (compiled code would read parameter "
    "storage that LMS has released); run the model without torch.compile, or enable LMS "
    "with weights=False (activation swapping works under torch.compile)"
)


class _PagedModuleHook(ModelHook):
    """A paged module's forward pre-hook; a copy of the module reads the masters (Rule 12)."""

    __slots__ = ("pager", "params")

    def __init__(self, fn: Callable[..., Any], pager: WeightPaging, params: list[PagedParam]):
        super().__init__(fn, NO_COMPILE)
        self.pager = pager
        self.params = params  # the module's paged parameters (the list grows, Rule 3)

    def __deepcopy__(self, memo: dict) -> Any:
        # Copied before the module's ``_parameters`` (``_hook_module`` moves that last
        # in ``__dict__``): point deepcopy at the masters, never at a released shell.
        with self.pager.rt.lock:
            for pp in self.params:
                p = pp.param
                self.pager._write_back(pp)  # Rule 17: a write to the resident shell
                if id(p) not in memo:
                    # What Parameter.__deepcopy__ makes, from the real values.
                    memo[id(p)] = pp.own_class(pp.master.clone(), p.requires_grad)
        return super().__reduce__()[0]()  # the no-op a copied ModelHook becomes

    def __reduce__(self) -> tuple:
        if self.pager.phase is Phase.DEVICE and not self.pager._removed:
            raise LMSError(
                "cannot pickle a model between its training forward and the end of "
                "backward while LMS pages its weights (they are released from the "
                "device); pickle it between steps, e.g. after optimizer.step()"
            )
        return super().__reduce__()


def _mem_available() -> int:
    """Host bytes the OS says are available now (physical RAM if it does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _move_rest_to(model: nn.Module, device: torch.device, paged: dict[int, Any]) -> None:
    """Move the parameters LMS does not page, and the buffers, from the host to ``device``.

    NOTE [Weight paging] Rule 10: a model too large for the device is built on the
    host; the paged parameters are copied into their masters, the rest moves.
    """
    if device.type == "cpu":
        return
    with torch.no_grad():
        for module in model.modules():
            for p in module._parameters.values():
                if p is None or id(p) in paged or p.device == device:
                    continue
                grad = p.grad
                p.grad = None
                p.data = p.data.to(device)
                if grad is not None:
                    p.grad = grad.to(device)
            for name, b in module._buffers.items():
                if b is not None and b.device != device:
                    module._buffers[name] = b.to(device)


def plan_for_model(model: nn.Module, runtime: Any) -> WeightPlan:
    """The weight plan for ``model`` under ``runtime``'s limit, min_size and ``weights``.

    Args:
        model: the model.
        runtime: an ``lms.runtime.Runtime``.

    Returns:
        The :class:`~lms.weights_plan.WeightPlan` (tied parameters counted once).
    """
    infos = [
        ParamInfo(name, p.numel() * p.element_size(), p.requires_grad, movable(p))
        for name, p in model.named_parameters()
    ]
    return plan_weights(infos, runtime.limit, runtime.min_size, runtime.config.weights)


class WeightPaging(GradientSide):
    """The installed weight pager of one model; ``remove()`` undoes everything.

    Built by :func:`attach_weight_paging`. Works as a context manager.

    Attributes:
        plan: the plan it carries out.
        paged: the paged parameters, in ``named_parameters`` order.
        phase: where paged parameters point now (NOTE [Weight paging] Rule 1).
        tracker: the learned module order (NOTE [Weight paging plan] Rule 3).
        prefetched: parameters a module found already on their way in.
        on_demand: parameters a module had to fetch itself when it ran (a stall).
    """

    # -- initialization ----------------------------------------------------

    def __init__(self, model: nn.Module, runtime: Any, plan: WeightPlan) -> None:
        self.model = model
        self.rt = runtime
        self.plan = plan
        self.phase = Phase.HOST
        self.tracker = OrderTracker()
        self.paged: list[PagedParam] = []
        self._by_param: dict[int, PagedParam] = {}
        self._module_ids: dict[int, int] = {}
        self._module_params: list[list[PagedParam]] = []
        self._module_names: list[str] = []
        self._handles: list[Any] = []
        self._out_hooks: list[Any] = []  # pre-backward tensor hooks of pending graphs
        self._kept: set[PagedParam] = set()
        self._awaiting: set[PagedParam] = set()
        self._reducers: set[GradsReady] = set()  # Rule 8
        self._graph_pending = False
        self._callback_queued: int | None = None
        self._ended_awaiting = False
        self._requeued = False
        self._reducer_first = False  # grads_ready came before our grad hook (Rule 8)
        self._bwd_cursor: int | None = None
        self._create_graph = False  # this backward builds a graph of its own (Rule 15)
        self._optimizers: weakref.WeakSet = weakref.WeakSet()
        self._warned: weakref.WeakSet = weakref.WeakSet()
        self._removed = False
        self._storage_ptrs: set[int] = set()
        # NOTE [Guarded parameters]: by own class, the class of a parameter not resident.
        self._guards: dict[type, type] = {}  # a parameter's own class -> its guard class
        self._warned_outside = False
        # Fills found in flight when a module needed them, and fills issued only
        # when it did (a stall): how well the learned order predicts.
        self.prefetched = 0
        self.on_demand = 0
        self._no_backward_fetch: set[int] = set()  # Rule 11, from each module's last call
        self._cast_uses: dict[PagedParam, int] = {}  # Rule 19: tied weights used this forward
        self._cast_since_clear: set[PagedParam] = set()  # Rule 19: a clear is due if any
        self._setup()
        # Rule 5; its staging blocks hold the largest paged parameter.
        self.grads = GradOffload(runtime, max((pp.nbytes for pp in self.paged), default=0))

    def _setup(self) -> None:
        device = self.rt.device
        named = [(n, p) for n, p in self.model.named_parameters() if n in self.plan.paged]
        cpu = torch.device("cpu")
        for name, p in named:
            if p.device not in (device, cpu):
                raise LMSError(
                    f"parameter {name!r} is on {p.device} but LMS manages {device}; "
                    "build the model on the host or on that device before lms.enable"
                )
        ids = {id(p) for _, p in named}
        needs = []
        for mname, module in self.model.named_modules():
            mine = [p for p in module.parameters(recurse=False) if id(p) in ids]
            if getattr(module, "sparse", False) and mine:
                raise LMSError(
                    f"module {mname!r} makes sparse gradients, which weight paging cannot "
                    "accumulate on the host; use sparse=False, or raise min_size above its "
                    "weight so that it stays resident"
                )
            if mine:
                nbytes = [(p.numel() * p.element_size(), p.requires_grad) for p in mine]
                needs.append(
                    ModuleNeed(mname, sum(n for n, _ in nbytes), sum(n for n, g in nbytes if g))
                )
        # NOTE [Weight paging plan] Rule 5
        check_modules_fit(needs, self.rt.limit, self.rt.config.name_of("limit"))
        self._check_host_memory(named)
        created: list[PagedParam] = []
        block = None
        try:
            for name, p in named:
                block = self.rt.pool.acquire(p.numel() * p.element_size())
                # Allocated once here and resized to 0 below; afterwards its storage
                # only holds memory between a fetch and a release.
                shell = torch.empty_strided(p.shape, paged_strides(p), dtype=p.dtype, device=device)
                pp = PagedParam(name, p, block, shell)
                block = None
                pp.storage().resize_(0)
                created.append(pp)
                if p.requires_grad or p.grad is not None:  # a frozen one may keep its .grad
                    pp.acc_block = self.rt.pool.acquire(pp.nbytes)
                    pp.acc = typed_view(pp.acc_block, p)
        except BaseException:
            # Nothing was changed on the model yet: give the host memory back.
            if block is not None:
                self.rt.pool.release(block)
            for pp in created:
                self._free_blocks(pp)
            raise
        with torch.no_grad():
            for pp in created:
                p = pp.param
                pp.master.copy_(p.data)
                if p.grad is not None:
                    pp.acc.copy_(p.grad)
                    pp.acc_valid = True
                self._storage_ptrs.add(pp.storage()._cdata)
                p.grad = None
                p.data = pp.master
                p.grad = pp.acc if pp.acc_valid else None
                self.paged.append(pp)
                self._by_param[id(p)] = pp
        _move_rest_to(self.model, device, self._by_param)  # Rule 10
        self._install_hooks()

    def _check_host_memory(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """Refuse up front what would exhaust host memory (the cap, then the machine)."""
        params = sum(p.numel() * p.element_size() for _, p in named)
        grads = sum(p.numel() * p.element_size() for _, p in named if p.requires_grad)
        pool = self.rt.pool
        if pool.held_bytes + params + grads > pool.cap:
            raise LMSError(
                f"weight paging needs {format_bytes(params + grads)} of host memory for "
                f"parameters and gradients, over host_limit {format_bytes(pool.cap)} "
                f"(LMS already holds {format_bytes(pool.held_bytes)}); raise host_limit if the "
                "machine has the RAM, or raise limit so that fewer parameters are paged"
            )
        need = params + grads + HOST_OPTIMIZER_FACTOR * grads
        avail = _mem_available()
        if avail and need > avail:
            raise LMSError(
                f"weight paging needs about {format_bytes(need)} of host memory (parameters, "
                f"gradients and optimizer state) but the machine has {format_bytes(avail)} "
                "available; raise limit so that fewer parameters are paged, or free host memory"
            )

    def _install_hooks(self) -> None:
        h = self._handles
        h.append(self.model.register_forward_pre_hook(ModelHook(self._root_pre, NO_COMPILE)))
        for mname, module in self.model.named_modules():
            mine = [
                self._by_param[id(p)]
                for p in [*module._parameters.values(), *borrowed_params(module)]
                if p is not None and id(p) in self._by_param
            ]
            if mine:
                self._hook_module(mname, module, mine)
        # After the modules' post-hooks, so that it sees whether they built a graph.
        root_post = ModelHook(self._root_post, NO_COMPILE)
        h.append(self.model.register_forward_hook(root_post, always_call=True))
        for pp in self.paged:
            if pp.param.requires_grad:
                self._arm(pp)
        h.append(register_optimizer_step_pre_hook(self._optimizer_pre))

    def _hook_module(self, mname: str, module: nn.Module, mine: list[PagedParam]) -> int:
        idx = len(self._module_params)
        self._module_ids[id(module)] = idx
        self._module_params.append(mine)
        self._module_names.append(mname)
        if casts_weights(module):  # Rule 19: a lookup table's module keeps no cast
            for pp in mine:
                pp.owners += 1
        h = self._handles
        pre = _PagedModuleHook(functools.partial(self._mod_pre, idx), self, mine)
        # First of the module's pre-hooks (Rule 3): a pre-hook registered before
        # lms.enable may read the weights (torch.nn.utils.weight_norm computes
        # ``weight`` from ``weight_g`` and ``weight_v`` in one).
        h.append(module.register_forward_pre_hook(pre, prepend=True))
        # Rule 12: deepcopy and pickle visit ``__dict__`` in order; with the hooks
        # first, a copy reads the masters and never a released shell.
        module.__dict__["_parameters"] = module.__dict__.pop("_parameters")
        # The model's own post-hook must run before _root_post, which reads its effect.
        post = ModelHook(functools.partial(self._mod_post, idx), NO_COMPILE)
        h.append(module.register_forward_hook(post, always_call=True, prepend=module is self.model))
        h.append(module.register_state_dict_pre_hook(ModelHook(self._state_dict_pre_hook)))
        h.append(module._register_state_dict_hook(ModelHook(self._state_dict_hook)))
        h.append(module._register_load_state_dict_pre_hook(ModelHook(self._load_pre_hook)))
        return idx

    # -- public surface ----------------------------------------------------

    def register_external_parameter(self, module: nn.Module, param: nn.Parameter) -> None:
        """Declare that ``module``'s forward uses ``param``, which another module owns.

        A paged parameter is resident only while a module that owns it runs (Rule 3).
        Code such as ``x @ self.wte.weight.T`` in a parent's forward reads it outside
        its owner; undeclared, the read is fetched by the guard (Rule 16) and holds the
        weight on the device until the backward ends. Declaring it here makes
        ``module``'s hooks fetch, prefetch and release it instead (DeepSpeed ZeRO-3 has
        the same call).

        Args:
            module: a submodule of the model (or the model) whose forward reads ``param``.
            param: a parameter of the model.

        Raises:
            LMSError: if ``module`` is not part of the model.

        Example:
            >>> pager = handle.weights  # doctest: +SKIP
            >>> pager.register_external_parameter(model, model.wte.weight)  # doctest: +SKIP
        """
        with self.rt.lock:
            if not any(m is module for m in self.model.modules()):
                raise LMSError("register_external_parameter: module is not part of the model")
            pp = self._by_param.get(id(param))
            if pp is None:
                return  # resident anyway
            idx = self._module_ids.get(id(module))
            if idx is None:
                name = next(n for n, m in self.model.named_modules() if m is module)
                self._hook_module(name, module, [pp])
            elif pp not in self._module_params[idx]:
                self._module_params[idx].append(pp)
                pp.owners += casts_weights(module)  # Rule 19

    def is_paged_storage(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in a paged parameter's device shell (Rule 9)."""
        try:
            return t.untyped_storage()._cdata in self._storage_ptrs
        except (RuntimeError, NotImplementedError):
            return False

    @property
    def paged_names(self) -> list[str]:
        """Qualified names of the paged parameters."""
        return [pp.name for pp in self.paged]

    def remove(self, to_device: bool = True) -> None:
        """Bring every paged parameter back to the device and remove all hooks (idempotent).

        Args:
            to_device: ``False`` leaves the parameters (and their optimizer state) on
                the host as ordinary tensors, for a model larger than the device.
        """
        with self.rt.lock:
            if self._removed:
                return
            self._removed = True
            for pp in self.paged:
                self._set_guard(pp, False)  # Rule 16
            self._awaiting_flush()
            device = self.rt.device if to_device else torch.device("cpu")
            # Rule 14: mid-step, autograd holds views of the shells; fill them and
            # make them the parameters' data, so that a backward after remove() works.
            keep_shells = self.phase is Phase.DEVICE
            if keep_shells:
                for pp in self.paged:
                    self._acquire(pp)
                    self._write_back(pp)  # Rule 17: to_device=False copies the master
            self._enter_host(release=not keep_shells)
            for handle in self._handles + self._out_hooks:
                handle.remove()
            self._handles.clear()
            self._out_hooks.clear()
            for pp in self.paged:
                p = pp.param
                grad = p.grad
                p.grad = None
                if keep_shells:
                    self.rt.budget.release(pp.nbytes)  # the model's memory now, not LMS's
                    pp.where = Where.OUT
                if keep_shells and device == self.rt.device:
                    p.data = pp.shell
                else:
                    # A copy even on the host: the pool blocks are handed out again.
                    p.data = pp.master.to(device, copy=True)
                if grad is not None:
                    p.grad = grad.to(device, copy=True)
            if to_device:
                for opt in list(self._optimizers):
                    move_state(opt, self._by_param, self._state_home(False), to_host=False)
            self.grads.close()
            for pp in self.paged:
                self._free_blocks(pp)
            self.paged.clear()
            self._by_param.clear()
            self._storage_ptrs.clear()

    def __enter__(self) -> WeightPaging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- phases --------------------------------------------------------------

    def _enter_device(self) -> None:
        """Point paged parameters at their shells (Rule 1); idempotent."""
        if self.phase is Phase.DEVICE:
            return
        self._check_no_awaiting("a forward")
        for pp in self.paged:
            p = pp.param
            if p.data.data_ptr() != pp.master.data_ptr() or p.shape != pp.master.shape:
                raise LMSError(
                    f"parameter {pp.name!r} was replaced or moved while LMS pages it "
                    "(e.g. model.to(), param.data = ..., load_state_dict(assign=True)); "
                    "call handle.remove() first, then enable LMS again"
                )
            if p.requires_grad and not pp.armed:
                # Frozen at enable, trainable now (requires_grad_(True)): without its
                # hooks AccumulateGrad would leave a device .grad behind (Rule 5).
                self._arm(pp)
            # ``.grad`` stays what it was (the host accumulator, or None) while the
            # data points at the shell, so that zero_grad() between forward and
            # backward still acts on it; _take_grad moves it aside (Rule 5).
            p.data = pp.shell
        self.phase = Phase.DEVICE
        for pp in self.paged:
            self._update_guard(pp)  # Rule 16
        if self._graph_pending:
            for pp in self._kept:
                self._acquire(pp)

    def _enter_host(self, release: bool = True) -> None:
        """Point paged parameters at their masters, gradients at the accumulators.

        ``release=False`` (only ``remove()``, Rule 14) keeps the shells filled.
        """
        if self.phase is Phase.HOST:
            return
        self._check_no_awaiting("the optimizer step")
        self.grads.reap(block=True)
        if release:
            for pp in self.paged:
                self._release(pp)
        self.rt.transfers.synchronize()  # Rule 6: host code reads and writes next
        for pp in self.paged:
            p = pp.param
            self._set_guard(pp, False)  # Rule 16: the masters are always readable
            self._settle_stand_in(pp)
            p.data = pp.master
            if pp.grad_taken:
                p.grad = pp.acc if pp.acc_valid else None
                pp.grad_taken = False
        self.phase = Phase.HOST

    # -- residency -----------------------------------------------------------

    def _fetch(self, pp: PagedParam) -> None:
        """Start filling ``pp``'s shell from its master (Rule 6); no wait."""
        if pp.where is not Where.OUT:
            return
        tr = self.rt.transfers
        with torch.profiler.record_function("lms::weights::h2d"):
            # Activations needed later than this module leave first (NOTE [Memory budget]
            # Rule 6); prefetches beyond the very next module fit in the headroom anyway.
            self.rt.budget.make_room(pp.nbytes)
            storage = pp.storage()
            storage.resize_(pp.nbytes)  # on the compute stream
            self.rt.budget.charge(pp.nbytes)
            alias = torch.empty(0, dtype=pp.shell.dtype, device=pp.shell.device)
            alias.set_(storage, 0, pp.shell.shape, pp.shell.stride())
            pp.fill = tr.copy_in(alias, pp.master)
        pp.where = Where.FILLING

    def _acquire(self, pp: PagedParam) -> None:
        """Make ``pp`` usable on the compute stream now (Rule 3)."""
        if pp.where is Where.OUT:
            self.on_demand += 1
        elif pp.where is Where.FILLING:
            self.prefetched += 1
        self._fetch(pp)
        if pp.where is Where.FILLING:
            self.rt.transfers.wait(pp.fill)
            pp.fill = None
            pp.where = Where.RESIDENT
            pp.version = pp.param._version  # Rule 17
            pp.data_taken = False
            self._update_guard(pp)  # Rule 16: resident now, so off

    def _release(self, pp: PagedParam) -> None:
        """Free ``pp``'s device storage (Rule 4); waits for an unused fill first."""
        if pp.where is Where.OUT:
            return
        if pp.where is Where.FILLING:
            self.rt.transfers.wait(pp.fill)
            pp.fill = None
        self._write_back(pp)
        pp.storage().resize_(0)
        self.rt.budget.release(pp.nbytes)
        pp.where = Where.OUT
        pp.held = False
        self._update_guard(pp)  # Rule 16

    def _write_back(self, pp: PagedParam) -> None:
        """Copy a resident shell that was written in place into its master (Rule 17)."""
        if pp.where is not Where.RESIDENT or self.phase is not Phase.DEVICE:
            return
        if pp.param._version == pp.version and not pp.data_taken:
            return
        with torch.no_grad():
            # On the compute stream, where the write ran; blocking, so the host sees it.
            pp.master.copy_(pp.shell)
        pp.version = pp.param._version
        pp.data_taken = False

    def _update_guard(self, pp: PagedParam) -> None:
        """Guard ``pp`` exactly while phase is DEVICE and its shell is not resident (Rule 16)."""
        self._set_guard(pp, self.phase is Phase.DEVICE and pp.where is not Where.RESIDENT)

    def _set_guard(self, pp: PagedParam, on: bool) -> None:
        """Put the guard class on ``pp``'s parameter, or give it its own (Rule 16)."""
        if not pp.guardable:
            return
        if not on:
            pp.param.__class__ = pp.own_class
            return
        guard = self._guards.get(pp.own_class)
        if guard is None:
            guard = self._guards[pp.own_class] = guard_class(self._outside_read, pp.own_class)
        pp.param.__class__ = guard

    def _outside_read(self, p: nn.Parameter, func: Any = None) -> None:
        """A torch function ``func`` is about to read a guarded parameter (Rule 16)."""
        with self.rt.lock:
            pp = self._by_param.get(id(p))
            if pp is None or self.phase is not Phase.DEVICE:
                p.__class__ = type(p)._lms_own  # removed, or between steps: readable
                return
            self._acquire(pp)
            pp.held = True
            # Rule 17: a write through ``.data`` bumps no version; copy back to be sure.
            pp.data_taken = func == DATA_GET
            if not self._warned_outside:
                self._warned_outside = True
                warnings.warn(
                    f"LMS fetched paged parameter {pp.name!r} for a read outside the modules "
                    "that own it, between a forward and the end of its backward (an L2 "
                    "penalty, a logged norm, a parent module's forward, ...); it stays on the "
                    "device until the backward ends, at the cost of a blocking copy and its "
                    "device memory. Use the optimizer's weight_decay, read parameters between "
                    "steps, or declare a parent's use with "
                    "handle.weights.register_external_parameter(module, param)",
                    stacklevel=user_stacklevel(),
                )

    def _prefetch(self, order: list[int], pos: int | None, step: int) -> None:
        if pos is None or not order:
            return
        # Asked only about the modules looked at. Looking back (step -1) is for
        # backward, which does not fetch for modules whose backward reads no weight.
        unneeded = self._no_backward_fetch if step < 0 else frozenset()
        view = Residency(self._module_params, unneeded)
        free = self.rt.budget.headroom()
        for m in prefetch_targets(order, pos, step, view, free, MAX_AHEAD, view):
            for pp in self._module_params[m]:
                self._fetch(pp)

    # -- forward hooks -------------------------------------------------------

    def _root_pre(self, module: nn.Module, args: Any) -> None:
        with self.rt.lock:
            self._enter_device()
            # Rule 19: counted per forward. A checkpointed module recomputed in backward
            # counts its uses too, and no _root_post follows it to reset them.
            self._cast_uses.clear()

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        with self.rt.lock:
            if self._cast_since_clear:
                # Rule 19: no module of this forward reuses a cast now (also when a
                # tied weight's other module never ran, or the forward raised).
                torch.clear_autocast_cache()
                self._cast_since_clear.clear()
            self._cast_uses.clear()
            if self._graph_pending:
                if output is not None:  # None: the forward raised; no backward follows it
                    # Backward starts with the modules that ran last: fetch them now.
                    rec = self.tracker.recording
                    self._prefetch(rec, len(rec), -1)
                return
            # No graph: nothing will run backward. Release everything, back to HOST.
            self.tracker.finish_step()
            self._enter_host()

    def _mod_pre(self, idx: int, module: nn.Module, args: Any) -> None:
        with self.rt.lock:
            self._enter_device()
            if len(self.tracker.recording) > 64 * len(self._module_params):
                # Many grad-enabled forwards and no backward: keep the trace bounded.
                self.tracker.finish_step()
            pos = self.tracker.see(idx)
            if self._cast_since_clear and autocast_on(self.rt.device.type):
                self._drop_casts(self._module_params[idx])  # Rule 19
            for pp in self._module_params[idx]:
                pp.fwd_users += 1
                self._acquire(pp)
            self._prefetch(self.tracker.learned, pos, 1)

    def _mod_post(self, idx: int, module: nn.Module, args: Any, output: Any) -> None:
        with self.rt.lock:
            params = self._module_params[idx]
            trainable = any(pp.param.requires_grad for pp in params)
            hooked = False
            needs = backward_reads_weights(module, params, self.rt.device.type)
            if needs:
                self._no_backward_fetch.discard(idx)
            else:
                self._no_backward_fetch.add(idx)
            if torch.is_grad_enabled():
                # Also for frozen parameters: backward needs them for the input's grad.
                for t in tree_leaves(output):
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        hook = functools.partial(self._pre_backward, idx, needs)
                        self._out_hooks.append(t.register_hook(hook))
                        hooked = True
            # None: the forward raised (always_call hooks still run) or returned
            # nothing differentiable; either way no backward will need the weights.
            keep = torch.is_grad_enabled() and trainable and not hooked and output is not None
            self._graph_pending = self._graph_pending or hooked or keep
            if autocast_on(self.rt.device.type):
                self._note_casts(module, params)  # Rule 19
            for pp in params:
                pp.fwd_users = max(0, pp.fwd_users - 1)
                if keep:
                    self._kept.add(pp)  # Rule 3: no way to learn when backward needs it
                    pp.held = True
                elif pp.fwd_users == 0 and not pp.held:
                    # A held parameter is in use by backward (e.g. a checkpointed
                    # module recomputing its forward inside backward).
                    self._release(pp)

    def _note_casts(self, module: nn.Module, params: list[PagedParam]) -> None:
        """After a paged module under autocast: its weights' casts are cached (Rule 19)."""
        if not casts_weights(module):
            return  # nothing of its weights in the cache, nor counted in ``owners``
        for pp in params:
            if pp.owners > 1:
                self._cast_uses[pp] = self._cast_uses.get(pp, 0) + 1
        self._cast_since_clear.update(params)

    def _drop_casts(self, params: list[PagedParam]) -> None:
        """Before a paged module: clear autocast's cache unless it reuses a cast (Rule 19)."""
        if self._tied_cast_pending() or not self._cast_since_clear.isdisjoint(params):
            return
        torch.clear_autocast_cache()
        self._cast_since_clear.clear()

    def _tied_cast_pending(self) -> bool:
        return any(n < pp.owners for pp, n in self._cast_uses.items())

    # -- backward hooks ------------------------------------------------------

    def _pre_backward(self, idx: int, needs: bool, grad: torch.Tensor) -> None:
        with self.rt.lock:
            self._queue_end()
            self._enter_device()
            self._create_graph = self._create_graph or torch.is_grad_enabled()
            if needs:  # Rule 11: else this call's backward reads none of them
                for pp in self._module_params[idx]:
                    self._acquire(pp)
                    pp.held = True
            rec = self.tracker.recording
            cursor = len(rec) if self._bwd_cursor is None else self._bwd_cursor
            pos = None
            for i in range(min(cursor, len(rec)) - 1, -1, -1):
                if rec[i] == idx:
                    pos = i
                    break
            if pos is not None:
                self._bwd_cursor = pos
                self._prefetch(rec, pos, -1)

    # -- optimizer and state_dict --------------------------------------------

    def _optimizer_pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not any(id(p) in self._by_param for g in opt.param_groups for p in g["params"]):
            return
        with self.rt.lock:
            # A step normally ends the graph: backward ran (or never will). But a graph
            # may still be pending, e.g. a GAN's generator output that goes through the
            # discriminator after the discriminator's step: its tensors are alive, so
            # their pre-backward hooks stay and fetch the weights again (as in
            # _finish_backward); only the handles of tensors that are gone are dropped.
            self._enter_host()
            self._kept.clear()
            self._graph_pending = False
            self._out_hooks = [h for h in self._out_hooks if h.hooks_dict_ref() is not None]
            check_host_step(opt, self._by_param)
            self._optimizers.add(opt)
            move_state(opt, self._by_param, self._state_home(True), to_host=True)
            if opt not in self._warned:
                self._warned.add(opt)
                warn_if_unfused(opt, self._by_param)

    def _state_home(self, to_host: bool) -> Callable[[torch.Tensor], torch.device]:
        if to_host:
            return lambda p: self._by_param[id(p)].master.device
        return lambda p: self.rt.device

    def _state_dict_pre_hook(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        # ``state_dict`` detaches each parameter, a read to the guard (Rule 16), while
        # the post-hook below puts the masters in its place: take the guard off first.
        for p in module._parameters.values():
            pp = self._by_param.get(id(p)) if p is not None else None
            if pp is not None:
                self._set_guard(pp, False)

    def _state_dict_hook(
        self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict
    ) -> None:
        # The masters always hold the real values, whatever the phase (Rule 1).
        for name, p in module._parameters.items():
            pp = self._by_param.get(id(p)) if p is not None else None
            if pp is None:
                continue
            key = prefix + name
            if key in state_dict and self.phase is Phase.DEVICE:
                self._write_back(pp)  # Rule 17: a write to the resident shell
                state_dict[key] = pp.master
            self._update_guard(pp)

    def _load_pre_hook(
        self, state_dict: dict, prefix: str, local_metadata: dict, *args: Any
    ) -> None:
        if local_metadata.get("assign_to_params_buffers"):
            raise LMSError(
                "load_state_dict(assign=True) would replace parameters LMS pages; "
                "load without assign=True, or call handle.remove() first"
            )
        with self.rt.lock:
            self._enter_host()  # copy into the masters, which are what the device reads

    def _free_blocks(self, pp: PagedParam) -> None:
        self.rt.pool.release(pp.master_block)
        if pp.acc_block is not None:
            self.rt.pool.release(pp.acc_block)
            pp.acc_block = None


def attach_weight_paging(
    model: nn.Module, runtime: Any, plan: WeightPlan | None = None
) -> WeightPaging | None:
    """Page ``model``'s parameters, gradients and optimizer state through host memory.

    See NOTE [Weight paging]. What the training loop sees does not change.

    Args:
        model: the model, on ``runtime.device``.
        runtime: the ``lms.runtime.Runtime`` of this ``lms.enable`` call (its
            config's ``weights``, ``limit`` and ``min_size`` drive the plan).
        plan: a precomputed plan (default: :func:`plan_for_model`).

    Returns:
        The :class:`WeightPaging` handle, or ``None`` when the plan pages nothing.

    Raises:
        LMSError: when parameters are on another device, or host memory (the
            ``host_limit`` cap or the machine) cannot hold the paged state.

    Example:
        >>> from lms.config import LMSConfig
        >>> from lms.runtime import Runtime
        >>> m = nn.Linear(256, 256)
        >>> rt = Runtime(torch.device("cpu"), LMSConfig(limit="1MiB", min_size=0, weights=True))
        >>> h = attach_weight_paging(m, rt)
        >>> h.paged_names
        ['weight', 'bias']
        >>> h.remove()
    """
    if plan is None:
        plan = plan_for_model(model, runtime)
    if not plan.paged:
        _move_rest_to(model, runtime.device, {})  # Rule 10: a host-built model that fits
        return None
    return WeightPaging(model, runtime, plan)
