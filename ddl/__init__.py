"""ddl: topology-aware allreduce on torch.distributed, and gradient sync that overlaps backward.

Example (one rank here; under torchrun every rank runs the same lines):
    >>> import ddl, torch
    >>> ddl.init()                      # under torchrun; nccl with CUDA, gloo otherwise
    Topology(world_size=1, local_size=1)
    >>> x = torch.ones(3)
    >>> ddl.allreduce(x, op="mean")     # in place; torch, NumPy or CuPy
    tensor([1., 1., 1.])
    >>> model = torch.nn.Linear(3, 1)
    >>> handle = ddl.wrap(model)        # after backward(), every .grad is the mean over ranks
    >>> model(x).sum().backward()
    >>> handle.remove()
    >>> ddl.shutdown()
"""

__all__ = [
    "ALGORITHMS",
    "DDLError",
    "GradSync",
    "Handle",
    "Topology",
    "allreduce",
    "allreduce_async",
    "costmodel",
    "init",
    "is_initialized",
    "local_rank",
    "local_size",
    "rank",
    "shutdown",
    "topology",
    "world_size",
    "wrap",
    "WrapConfig",
]

from . import costmodel
from .buckets import GradSync, wrap
from .collectives import allreduce, allreduce_async
from .config import WrapConfig
from .errors import DDLError
from .group import (
    Handle,
    init,
    is_initialized,
    local_rank,
    local_size,
    rank,
    shutdown,
    topology,
    world_size,
)
from .topology import ALGORITHMS, Topology
