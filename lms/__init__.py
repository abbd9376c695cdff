"""Large Model Support: train models whose activations (and weights) exceed device memory.

``lms.enable(model, limit=..., min_size=...)`` swaps saved activations between
the device and a pinned host pool under a memory limit, overlapped with compute.

Example:
    >>> import lms, torch
    >>> model = torch.nn.Linear(64, 64)
    >>> with lms.enable(model, limit="1GiB") as handle:
    ...     model(torch.randn(4, 64)).sum().backward()
    >>> isinstance(handle.stats(), lms.Stats)
    True
"""

from .config import LMSConfig, parse_size
from .enable import LMSHandle, enable
from .errors import LMSError
from .stats import Stats
from .weights import WeightPaging
from .weights_backward import GradsReady

__all__ = [
    "GradsReady",
    "LMSConfig",
    "LMSError",
    "LMSHandle",
    "Stats",
    "WeightPaging",
    "enable",
    "parse_size",
]
