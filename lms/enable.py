"""``lms.enable``: one call that turns LMS on for a model, and the handle that undoes it."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from .activations import ActivationSwapper
from .config import LMSConfig, Size, resolve_config
from .errors import LMSError
from .runtime import Runtime, is_oom
from .stats import Stats
from .weights import WeightPaging, attach_weight_paging

__all__ = ["LMSHandle", "enable"]

# Models LMS is on for, so that a second ``enable`` is refused instead of stacking.
_ENABLED: weakref.WeakKeyDictionary[nn.Module, LMSHandle] = weakref.WeakKeyDictionary()


class _GuardedForward:
    """The model's own ``forward``, re-raising a device OOM as ``LMSError`` with advice.

    Forward hooks cannot replace an exception (``always_call`` hooks that raise
    are silenced), so this one thin wrapper is set as an instance attribute and
    deleted again by ``remove``. It also closes LMS's scope on a
    ``KeyboardInterrupt``, which ``always_call`` hooks never see.
    """

    def __init__(self, model: nn.Module, runtime: Runtime, swapper: ActivationSwapper) -> None:
        self.original = model.forward
        self.runtime = runtime
        self.swapper = swapper

    def __reduce__(self) -> tuple:
        # A copied or pickled model gets its plain forward back (LMS is not on a copy).
        return (_plain_forward, (self.original.__self__,))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.original(*args, **kwargs)
        except RuntimeError as e:
            if is_oom(e) and not isinstance(e, LMSError):
                raise self.runtime.oom_error(e, "in the model's forward") from e
            raise
        except BaseException as e:
            if not isinstance(e, Exception):
                # Ctrl-C, SystemExit: nn.Module skips always_call hooks for these.
                self.swapper.close_scopes()
            raise


def _plain_forward(model: nn.Module) -> Any:
    return type(model).forward.__get__(model)


class _RemoveForwardGuard:
    def __init__(self, model: nn.Module) -> None:
        self.model = weakref.ref(model)

    def remove(self) -> None:
        model = self.model()
        if model is not None and isinstance(model.__dict__.get("forward"), _GuardedForward):
            del model.__dict__["forward"]


class LMSHandle:
    """Everything one ``lms.enable`` call installed; ``remove()`` undoes all of it.

    Use it as a context manager to remove LMS on exit. ``remove`` is idempotent.
    Tensors saved before ``remove`` stay valid: a backward after it still works.
    A copy of the model (``copy.deepcopy``, pickling) comes without LMS; the
    handle itself cannot be copied or pickled (it owns hooks and host memory).

    Attributes:
        config: the effective config (arguments, then environment overrides).
        runtime: the shared runtime (``None`` when LMS is disabled by ``LMS_DISABLE``).
        activations: the activation swapper (``None`` when disabled).
        weights: the weight pager (``lms.WeightPaging``) when weight paging is on, else ``None``.

    Example:
        >>> import lms
        >>> model = nn.Linear(256, 256)
        >>> with lms.enable(model, limit=0) as handle:
        ...     model(torch.randn(8, 256)).sum().backward()
        >>> handle.stats().swap_outs >= 0
        True
    """

    def __init__(self, model: nn.Module, config: LMSConfig, runtime: Runtime | None) -> None:
        self.config = config
        self.runtime = runtime
        self.activations: ActivationSwapper | None = None
        self.weights: WeightPaging | None = None
        self._model = weakref.ref(model)
        self._handles: list[Any] = []  # anything with .remove(), undone in reverse order
        self._removed = False

    @property
    def enabled(self) -> bool:
        """Whether LMS is active (``False`` after ``remove`` or under ``LMS_DISABLE=1``)."""
        return self.runtime is not None and not self._removed

    def stats(self) -> Stats:
        """A snapshot of the counters (see ``lms.Stats``)."""
        if self.runtime is None:
            return Stats()
        return self.runtime.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters and peaks (also the allocator's peak on CUDA)."""
        if self.runtime is not None:
            self.runtime.reset_stats()

    def remove(self) -> None:
        """Remove every hook and wrapper, finish copies in flight, free cached host memory."""
        if self._removed:
            return
        self._removed = True
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        if self.activations is not None:
            self.activations.close_scopes()  # one a KeyboardInterrupt left open, if any
            self.activations.drain()
        if self.runtime is not None:
            self.runtime.close()
        model = self._model()
        if model is not None and _ENABLED.get(model) is self:
            del _ENABLED[model]

    def __reduce__(self) -> tuple:
        raise TypeError(
            "an LMSHandle cannot be copied or pickled: it owns one model's hooks and host "
            "memory; copy the model (the copy comes without LMS) and call lms.enable on it"
        )

    def __enter__(self) -> LMSHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "on" if self.enabled else "off"
        limit = self.runtime.limit if self.runtime is not None else None
        return f"LMSHandle({state}, limit={limit}, min_size={self.config.min_size})"


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    params = list(model.parameters())
    if not params:
        raise LMSError(
            f"{type(model).__name__} has no parameters, so LMS cannot tell its device or "
            "what to keep resident; enable LMS on the module that owns the parameters"
        )
    lazy = [n for n, p in model.named_parameters() if isinstance(p, UninitializedParameter)]
    if lazy:
        raise LMSError(
            f"parameter {lazy[0]!r} is not initialized yet (a lazy module such as "
            "nn.LazyLinear); run one forward with a sample batch before lms.enable, so "
            "that LMS sees the parameters' real sizes"
        )
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise LMSError(
                f"device={device!r} is not a device ({e}); pass e.g. 'cuda', 'cuda:1' or 'cpu'"
            ) from None
    dev = params[0].device
    if dev.type == "meta":
        raise LMSError("the model's parameters are on the meta device; materialize them first")
    return dev


def _refuse_nested_paging(model: nn.Module, weights: bool | str) -> None:
    """Refuse LMS inside or around a module LMS already manages, when weights may be paged.

    Nested activation swapping works (each scope swaps what is saved inside it), but
    two weight pagers would page the same parameters, and one pager's parameters would
    look like ordinary resident ones to the other LMS.
    """
    for other, handle in list(_ENABLED.items()):
        if other is model:
            continue
        inside = any(sub is other for sub in model.modules())
        if not inside and not any(sub is model for sub in other.modules()):
            continue
        if weights is False and handle.weights is None:
            continue
        where = "submodule of" if inside else "module containing"
        raise LMSError(
            f"LMS is already enabled on a {where} this {type(model).__name__}, and weight "
            "paging cannot nest: call remove() on that handle and enable LMS once on the "
            "outermost model (or pass weights=False to both)"
        )


def enable(
    model: nn.Module,
    limit: Size | None = None,
    min_size: Size | None = None,
    *,
    weights: bool | str | None = None,
    host_limit: Size | None = None,
    lookahead: int | None = None,
    config: LMSConfig | None = None,
    device: torch.device | str | None = None,
) -> LMSHandle:
    """Turn on Large Model Support for ``model``; the training loop stays unchanged.

    Saved activations stay on the device while its memory is under ``limit``;
    beyond it, the ones needed furthest in the future are swapped to pinned host
    memory and prefetched back ahead of their use in backward.

    Args:
        model: the model; its forward is the scope LMS acts in.
        limit: device memory budget: bytes, a string such as ``"20GiB"``, or a float
            in (0, 1] for a fraction of the device. ``0`` swaps every eligible
            tensor. Default 0.9 of the device. ``LMS_LIMIT`` overrides it.
        min_size: storages smaller than this never move. Default 1 MiB.
            ``LMS_MIN_SIZE`` overrides it.
        weights: page parameters, gradients and optimizer state too (``"auto"``,
            ``True``, ``False``).
        host_limit: cap on pinned host memory (default half of physical RAM).
        lookahead: swapped tensors always prefetched ahead in backward (default 1).
        config: a base ``LMSConfig``; the other arguments override its fields.
        device: the compute device (default: the device of the model's parameters).
            With weight paging, a model too large for the device can be built on
            the host and enabled with ``device="cuda"``: paged parameters go straight
            into host masters and never sit on the device whole; the rest moves to
            the device (NOTE [Weight paging] Rule 10 in lms/weights.py).

    Returns:
        An ``LMSHandle``: ``.stats()``, ``.remove()``, usable as a context manager.
        With ``LMS_DISABLE=1`` the handle is inert and nothing is installed.

    Raises:
        LMSError: on a bad setting, a limit larger than the device, a model with no
            parameters, or a model LMS is already enabled on. Nothing is changed then.

    Example:
        >>> import lms
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        >>> handle = lms.enable(model, limit="1GiB", min_size="1MiB")
        >>> model(torch.randn(4, 64)).sum().backward()
        >>> handle.remove()
    """
    cfg = resolve_config(
        limit, min_size, weights=weights, host_limit=host_limit, lookahead=lookahead, config=config
    )
    if not isinstance(model, nn.Module):
        raise LMSError(f"lms.enable needs an nn.Module, got {type(model).__name__}")
    if model in _ENABLED:
        raise LMSError(
            f"LMS is already enabled on this {type(model).__name__}; call remove() on the "
            "first handle (or use it as a context manager) before enabling again"
        )
    _refuse_nested_paging(model, cfg.weights)
    dev = _model_device(model, device)
    if not cfg.enabled:
        return LMSHandle(model, cfg, None)
    runtime = Runtime(dev, cfg)  # validates the limit against the device

    handle = LMSHandle(model, cfg, runtime)
    swapper = ActivationSwapper(model, runtime)
    handle.activations = swapper
    handle._handles.extend(swapper.install())
    if "forward" not in model.__dict__:
        model.forward = _GuardedForward(model, runtime, swapper)
        handle._handles.append(_RemoveForwardGuard(model))

    # --- weight paging attaches here (issue 4, lms/weights.py) -----------------
    # ``attach_weight_paging(model, runtime)`` returns a handle with ``.remove()``
    # (or None); it decides from ``runtime.config.weights`` whether to page anything.
    try:
        pager = attach_weight_paging(model, runtime)
    except BaseException:
        handle.remove()  # nothing stays installed when paging cannot be set up
        raise
    if pager is not None:
        handle.weights = pager
        swapper.paged = frozenset(id(pp.param) for pp in pager.paged)
        handle._handles.append(pager)  # removed first: parameters back on the device
    else:  # paging moves parameters between host and device on purpose; else they stay
        swapper.home = next(model.parameters()).device
    # --------------------------------------------------------------------------

    _ENABLED[model] = handle
    return handle
