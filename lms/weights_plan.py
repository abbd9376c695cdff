"""Pure planning for weight paging: which parameters to page, and what to prefetch next.

Nothing here touches a tensor, a stream or a hook. The functions take plain data
(names, byte counts, module indices) and return plain data, so every decision is
tested in one process without a device. ``lms/weights.py`` carries the plans out.

# NOTE [Weight paging plan]
#
# Rule 1 (what is paged). ``weights=False`` pages nothing; ``weights=True`` pages
#   every parameter of at least ``min_size`` bytes; ``weights="auto"`` pages only
#   when the resident *state* of the model (parameter + gradient + optimizer
#   moments, ``state_factor`` x the parameter bytes, 4 for Adam) exceeds
#   ``AUTO_STATE_SHARE`` of the limit. When it pages, it pages the largest
#   parameters first until what stays resident fits in ``RESIDENT_SHARE`` of the
#   limit: a large tensor moves at full link bandwidth, a small one costs a
#   latency-bound copy (ANCHORS: 1 MiB at ~22 GB/s against ~50 GB/s for 1 GiB),
#   so the small ones are the last worth paging. The rest of the limit is the
#   window that paged parameters and activations share.
# Rule 2 (parameters below ``min_size`` stay resident), whatever the mode, and so
#   do parameters LMS cannot move: data of a tensor subclass (a wrapper such as a
#   DTensor or a quantized tensor keeps its values in inner tensors that a
#   storage resize does not reach; paged, such a model trained on silently wrong
#   values), or of a layout other than strided.
# Rule 3 (the order is a hint, never a contract). The module order is learned
#   from the first step's forward and only drives *prefetching*. Before a module
#   runs, its parameters are made resident on demand whatever was prefetched,
#   so a changed order (another branch taken) costs a stall, never a wrong
#   value. On a mismatch the tracker re-synchronises on the module it sees and
#   records the new order for the next step.
# Rule 4 (how far ahead). Prefetch at most ``max_ahead`` modules ahead and only
#   while the bytes fit in the free part of the budget, but always allow the
#   very next module (one module's parameters must be resident to run at all;
#   without that allowance ``limit=0`` would serialise every copy with compute).
# Rule 5 (a limit must hold one module). A paged module runs with its paged
#   parameters on the device, and its backward adds their gradients (same
#   bytes). A positive limit below that for some module cannot be honoured at
#   all, so enabling raises ``LMSError`` naming the module and its bytes instead
#   of silently overshooting. ``limit=0`` is exempt: it is the documented "keep
#   nothing that can move" setting, not a budget (``LMSConfig.limit``).
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field

from .config import format_bytes
from .errors import LMSError

__all__ = [
    "AUTO_STATE_SHARE",
    "RESIDENT_SHARE",
    "ParamInfo",
    "WeightPlan",
    "OrderTracker",
    "plan_weights",
    "prefetch_targets",
    "ModuleNeed",
    "check_modules_fit",
]

# See NOTE [Weight paging plan] Rule 1. "auto" pages once the state needs more
# than this share of the limit, leaving the rest for activations.
AUTO_STATE_SHARE = 0.8
# Once paging, resident state is kept under this share of the limit; the other
# half is the window for paged parameters in flight and for activations.
RESIDENT_SHARE = 0.5


@dataclass(frozen=True)
class ParamInfo:
    """One distinct parameter as the planner sees it (tied parameters appear once).

    Attributes:
        name: its first qualified name in ``model.named_parameters()``.
        nbytes: bytes of its data.
        trainable: ``requires_grad``; a frozen parameter has no gradient or
            optimizer state, so its resident state is just its bytes.
        movable: whether LMS can page its data at all (Rule 2).
    """

    name: str
    nbytes: int
    trainable: bool = True
    movable: bool = True


@dataclass(frozen=True)
class WeightPlan:
    """Which parameters to page, and the byte totals the decision was made on.

    Attributes:
        paged: names of the parameters that live on the host between uses.
        resident_state_bytes: estimated device bytes of the state kept resident.
        paged_bytes: bytes of the paged parameters themselves.
        reason: one line saying why, for logs and error messages.
    """

    paged: frozenset[str]
    resident_state_bytes: int
    paged_bytes: int
    reason: str


def _state_bytes(p: ParamInfo, state_factor: float) -> int:
    return int(p.nbytes * (state_factor if p.trainable else 1))


def plan_weights(
    params: Sequence[ParamInfo],
    limit: int,
    min_size: int,
    mode: bool | str = "auto",
    state_factor: float = 4.0,
) -> WeightPlan:
    """Choose the parameters to page under ``limit`` (NOTE [Weight paging plan] Rules 1-2).

    Args:
        params: the model's distinct parameters.
        limit: device budget in bytes.
        min_size: parameters smaller than this are never paged (nor unmovable ones).
        mode: ``"auto"``, ``True`` or ``False`` (the ``weights`` setting).
        state_factor: device bytes of resident state per parameter byte for a
            trainable parameter (1 parameter + 1 gradient + optimizer moments).

    Returns:
        A :class:`WeightPlan`.

    Raises:
        LMSError: on a bad mode, negative sizes or duplicate names.

    Example:
        >>> ps = [ParamInfo("a", 100), ParamInfo("b", 10)]
        >>> sorted(plan_weights(ps, limit=200, min_size=50).paged)
        ['a']
    """
    if not (mode is True or mode is False or mode == "auto"):
        raise LMSError(f"weights={mode!r} must be 'auto', True or False")
    if limit < 0 or min_size < 0:
        raise LMSError(f"limit={limit} and min_size={min_size} must be >= 0 bytes")
    if state_factor < 1:
        raise LMSError(f"state_factor={state_factor} must be >= 1")
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise LMSError("plan_weights got the same parameter name twice; pass tied ones once")
    total = sum(_state_bytes(p, state_factor) for p in params)
    candidates = [p for p in params if p.movable and p.nbytes >= min_size and p.nbytes > 0]
    if mode is False:
        return WeightPlan(frozenset(), total, 0, "weights=False")
    if mode is True:
        paged = frozenset(p.name for p in candidates)
        resident = total - sum(_state_bytes(p, state_factor) for p in candidates)
        nbytes = sum(p.nbytes for p in candidates)
        return WeightPlan(paged, resident, nbytes, "weights=True pages every param >= min_size")
    if total <= AUTO_STATE_SHARE * limit:
        return WeightPlan(frozenset(), total, 0, "auto: parameter state fits under the limit")
    # Largest first; ties broken by name so the plan does not depend on dict order.
    order = sorted(candidates, key=lambda p: (-p.nbytes, p.name))
    resident, paged, nbytes = total, [], 0
    for p in order:
        if resident <= RESIDENT_SHARE * limit:
            break
        resident -= _state_bytes(p, state_factor)
        paged.append(p.name)
        nbytes += p.nbytes
    return WeightPlan(
        frozenset(paged),
        resident,
        nbytes,
        f"auto: state {total} B > {AUTO_STATE_SHARE:.0%} of limit {limit} B; "
        f"paged {len(paged)} of {len(params)} params",
    )


@dataclass(frozen=True)
class ModuleNeed:
    """What one paged module must hold on the device while it runs.

    Attributes:
        name: the module's qualified name (``""`` for the model itself).
        param_bytes: bytes of the paged parameters it owns directly.
        grad_bytes: bytes of their gradients (0 for frozen ones).
    """

    name: str
    param_bytes: int
    grad_bytes: int

    @property
    def total(self) -> int:
        return self.param_bytes + self.grad_bytes


def check_modules_fit(needs: Sequence[ModuleNeed], limit: int, name: str = "limit") -> None:
    """Refuse a positive ``limit`` that some paged module cannot run under (Rule 5).

    ``name`` is what the user set the limit with (``LMS_LIMIT`` when it came from the
    environment), so that the message says what to raise.

    Raises:
        LMSError: naming the module with the largest need, and the limit that would do.

    Example:
        >>> check_modules_fit([ModuleNeed("fc", 40, 40)], limit=100)
        >>> check_modules_fit([ModuleNeed("fc", 40, 40)], limit=0)
    """
    if limit <= 0 or not needs:
        return
    worst = max(needs, key=lambda n: n.total)  # the first in model order on a tie
    if worst.total <= limit:
        return
    label = repr(worst.name) if worst.name else "the model itself"
    raise LMSError(
        f"{name}={format_bytes(limit)} is too small for module {label} to run: it needs "
        f"{format_bytes(worst.total)} ({worst.total} bytes) on the device at once "
        f"({format_bytes(worst.param_bytes)} of paged parameters and "
        f"{format_bytes(worst.grad_bytes)} of their gradients); raise {name} to at least "
        f"{worst.total} bytes plus room for activations"
    )


def prefetch_targets(
    order: Sequence[int],
    pos: int,
    step: int,
    sizes: Mapping[int, int],
    free_bytes: int,
    max_ahead: int,
    skip: Container[int] = frozenset(),
) -> list[int]:
    """Modules to prefetch after the one at ``order[pos]`` (NOTE [Weight paging plan] Rule 4).

    Args:
        order: module ids in the order they run (forward order).
        pos: index in ``order`` of the module running now.
        step: +1 to look forward (forward pass), -1 to look back (backward pass).
        sizes: bytes each module would bring to the device (already-resident
            ones may be missing or 0).
        free_bytes: budget left for prefetching.
        max_ahead: how many modules ahead to look at most.
        skip: modules already resident or in flight; they are passed over
            without costing budget or lookahead. ``sizes`` and ``skip`` are only
            queried for the modules looked at, so they may compute lazily.

    Returns:
        Module ids to prefetch, nearest first, each listed once.

    Example:
        >>> prefetch_targets([0, 1, 2, 3], pos=0, step=1, sizes={1: 5, 2: 5, 3: 5},
        ...                  free_bytes=7, max_ahead=3)
        [1]
    """
    if step not in (1, -1):
        raise LMSError(f"step={step} must be +1 or -1")
    out: list[int] = []
    seen: set[int] = set()
    looked = 0
    i = pos + step
    while 0 <= i < len(order) and looked < max_ahead:
        m = order[i]
        i += step
        if m in seen or m in skip:
            continue
        seen.add(m)
        looked += 1
        need = sizes.get(m, 0)
        if need <= free_bytes or not out and looked == 1:
            out.append(m)
            free_bytes -= need
        else:
            break
    return out


@dataclass
class OrderTracker:
    """The module order: learned from one step, followed in the next (Rule 3).

    ``see(m)`` is called before each paged module runs in forward. While the
    learned order holds it returns the position of ``m`` in it; on a mismatch it
    re-synchronises on the first later occurrence of ``m`` (or returns ``None``
    when ``m`` is new) and marks the step as diverged. ``finish_step()`` makes
    the order just recorded the one to follow next.

    Example:
        >>> t = OrderTracker()
        >>> for m in (1, 2, 3): _ = t.see(m)
        >>> t.finish_step(); t.see(1), t.see(3), t.diverged
        (0, 2, True)
    """

    learned: list[int] = field(default_factory=list)
    recording: list[int] = field(default_factory=list)
    pos: int = -1
    diverged: bool = False
    steps: int = 0

    def see(self, m: int) -> int | None:
        """Record ``m`` as run now; its position in the learned order, or None."""
        self.recording.append(m)
        nxt = self.pos + 1
        if nxt < len(self.learned) and self.learned[nxt] == m:
            self.pos = nxt
            return nxt
        self.diverged = self.diverged or bool(self.learned)
        try:
            self.pos = self.learned.index(m, max(nxt, 0))
        except ValueError:
            try:
                self.pos = self.learned.index(m)
            except ValueError:
                return None
        return self.pos

    def finish_step(self) -> None:
        """Adopt this step's recording as the order to follow; reset the cursor."""
        if self.recording:
            self.learned = self.recording
            self.steps += 1
        self.recording = []
        self.pos = -1
        self.diverged = False
