"""A recording stand-in for an accelerator's streams and events, shared by the stream tests.

The accelerator branch of ``lms.transfer.Transfers`` (side streams, events, waits,
stall timing) only runs on a GPU, since the CPU's streams are no-ops. With this
stand-in as the device module it runs on the CPU: streams log what they were
asked to wait for, record or synchronize, and events report "not done" until
queried twice or synchronized, so the ordering rules of NOTE [Copy ordering] and
NOTE [Weight paging] Rule 6 are checked in CI. The copies themselves are CPU copies.

Test modules in this directory import it by plain name (``from recording_streams
import ...``): tests/lms has no ``__init__.py`` (it would shadow the ``lms``
package), so pytest's default import mode puts this directory on ``sys.path``.
"""

import contextlib

import torch

from lms.transfer import Transfers


class Event:
    clock = 0.0

    def __init__(self, enable_timing=False):
        self.timing = enable_timing
        self.stream = None
        self.left = 2  # "not done" for two queries, like a copy still running
        self.at = None

    def record(self, stream=None):
        assert stream is not None, "record on an explicit stream"
        self.stream = stream
        Event.clock += 1.0  # one "millisecond" per recorded event
        self.at = Event.clock
        stream.log.append(("record", self))

    def query(self):
        if self.left:
            self.left -= 1
            return False
        return True

    def synchronize(self):
        self.left = 0

    def elapsed_time(self, other):
        assert self.timing and other.timing
        return other.at - self.at


class Stream:
    def __init__(self, name="side", device=None):
        self.name = name
        self.log = []

    def wait_stream(self, other):
        self.log.append(("wait_stream", other))

    def wait_event(self, event):
        self.log.append(("wait_event", event))

    def synchronize(self):
        self.log.append(("synchronize", None))


class Device:
    """Stands in for ``torch.cuda`` as ``Transfers.mod``."""

    Event = Event

    def __init__(self):
        self.compute = Stream("compute")
        self.active = []

    def Stream(self, device=None):  # noqa: N802 - mirrors torch.cuda.Stream
        return Stream(device=device)

    def current_stream(self, device=None):
        return self.active[-1] if self.active else self.compute

    @contextlib.contextmanager
    def stream(self, s):
        self.active.append(s)
        try:
            yield
        finally:
            self.active.pop()


def accelerator_transfers(stats):
    """A ``Transfers`` on the CPU that takes the accelerator branch, over the stand-in."""
    t = Transfers(torch.device("cpu"), stats)
    t.is_cpu = False
    t.mod = Device()
    t.d2h, t.h2d = Stream("d2h"), Stream("h2d")
    return t


def accelerate(handle):
    """Swap an ``lms.enable`` handle's copy machinery for the stand-in (both pagers share it)."""
    t = accelerator_transfers(handle.runtime.stats)
    handle.runtime.transfers = t
    handle.activations.transfers = t
    return t
