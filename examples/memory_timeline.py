"""Sample device and host memory over one training step and plot it.

Samples are taken at module boundaries (before and after each block's forward, and when the
gradient of each block's output arrives in backward), so the picture shows what LMS kept on the
device and what it moved, block by block, without adding any synchronisation to the step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook


@dataclass
class Sample:
    t: float  # seconds since the recording began
    label: str
    device_bytes: int  # allocator bytes on CUDA; LMS-resident bytes on the CPU
    host_bytes: int  # bytes LMS holds in host memory
    swapped_out_bytes: int  # cumulative
    swapped_in_bytes: int  # cumulative


class MemoryTimeline:
    """Records ``Sample``s while ``recording()`` is active; ``plot(path)`` draws them."""

    def __init__(self, model: nn.Module, device: torch.device, lms_handle: object | None) -> None:
        if device.type != "cuda" and lms_handle is None:
            # The CPU has no allocator to ask; without LMS's accounting every sample would
            # read 0 bytes and the plot would show an empty step.
            raise ValueError(
                f"nothing to sample on {device} without LMS: device bytes come from LMS's "
                "accounting there (or from the CUDA allocator on a GPU)"
            )
        self.device = device
        self.lms_handle = lms_handle
        self.samples: list[Sample] = []
        self._t0: float | None = None
        # Sample around the model's direct children and the children of module lists
        # (the transformer blocks), which is the granularity at which LMS pages.
        watched = []
        for name, child in model.named_children():
            if isinstance(child, nn.ModuleList):
                watched += [(f"{name}.{i}", m) for i, m in enumerate(child)]
            else:
                watched.append((name, child))
        self._hooks = []
        for name, module in watched:
            self._hooks.append(module.register_forward_pre_hook(self._pre(name)))
            self._hooks.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._sample(f"fwd {name}")

        return hook

    def _post(self, name: str):
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            self._sample(f"fwd {name} done")
            if self._t0 is not None and isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda grad: self._sample(f"bwd {name}"))

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self.samples.clear()
        self._t0 = time.perf_counter()
        self._sample("step start")
        opt_hook = register_optimizer_step_pre_hook(lambda *_: self._sample("optimizer"))
        try:
            yield
        finally:
            opt_hook.remove()
            self._sample("step end")
            self._t0 = None

    def _sample(self, label: str) -> None:
        if self._t0 is None:
            return
        if self.device.type == "cuda":
            device_bytes = torch.cuda.memory_allocated(self.device)
        elif self.lms_handle is not None:
            device_bytes = self.lms_handle.stats().resident_bytes
        else:
            device_bytes = 0
        stats = self.lms_handle.stats() if self.lms_handle is not None else None
        self.samples.append(
            Sample(
                t=time.perf_counter() - self._t0,
                label=label,
                device_bytes=device_bytes,
                host_bytes=stats.host_bytes if stats else 0,
                swapped_out_bytes=stats.swapped_out_bytes if stats else 0,
                swapped_in_bytes=stats.swapped_in_bytes if stats else 0,
            )
        )

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def plot(self, path: str) -> None:
        """Write a PNG: device and host bytes over the step, with copy activity shaded."""
        import matplotlib.pyplot as plt

        fig = self.figure()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def figure(self) -> object:
        """The matplotlib figure that ``plot`` writes (Agg backend, no window)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s = self.samples
        t = [x.t * 1e3 for x in s]
        mib = 2.0**20
        fig, ax = plt.subplots(figsize=(10, 4.5))
        # Say what was measured: on the CPU it is LMS's accounting, not an allocator.
        source = "allocator" if self.device.type == "cuda" else "LMS accounting"
        ax.step(
            t, [x.device_bytes / mib for x in s], where="post", label=f"device bytes ({source})"
        )
        limit = self.lms_handle.stats().limit_bytes if self.lms_handle is not None else None
        if limit is not None:  # the line the device bytes are meant to stay under
            ax.axhline(limit / mib, color="tab:blue", ls=":", lw=1, label="LMS limit")
        ax.step(t, [x.host_bytes / mib for x in s], where="post", label="host bytes (LMS pool)")
        for prev, cur in zip(s, s[1:]):
            if cur.swapped_out_bytes > prev.swapped_out_bytes:
                ax.axvspan(prev.t * 1e3, cur.t * 1e3, color="tab:red", alpha=0.15, lw=0)
            if cur.swapped_in_bytes > prev.swapped_in_bytes:
                ax.axvspan(prev.t * 1e3, cur.t * 1e3, color="tab:green", alpha=0.15, lw=0)
        ax.axvspan(0, 0, color="tab:red", alpha=0.15, label="copies to host issued")
        ax.axvspan(0, 0, color="tab:green", alpha=0.15, label="copies to device issued")
        for phase in ("bwd", "optimizer"):
            first = next((x.t * 1e3 for x in s if x.label.startswith(phase)), None)
            if first is not None:
                ax.axvline(first, color="grey", ls="--", lw=1)
                ax.text(first, ax.get_ylim()[1], f" {phase}", va="top", fontsize=8)
        ax.set_xlabel("time in step (ms)")
        ax.set_ylabel("MiB")
        ax.set_title(f"Memory over one training step ({self.device})")
        ax.legend(loc="upper right")
        fig.tight_layout()
        return fig
