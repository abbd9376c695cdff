"""ddl: topology-aware allreduce on torch.distributed, and gradient sync that overlaps backward.

Example:
    >>> import ddl
    >>> ddl.init()                      # under torchrun; nccl with CUDA, gloo otherwise
    >>> ddl.allreduce(x, op="mean")     # in place; torch, NumPy or CuPy
    >>> handle = ddl.wrap(model)        # after backward(), every .grad is the mean over ranks
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
