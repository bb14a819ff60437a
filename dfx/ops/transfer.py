"""Small host-built constants on the compute device, without stalling the host."""

from __future__ import annotations

import torch
from torch import Tensor


def host_tensor(values, dtype: torch.dtype, device) -> Tensor:
    """``torch.tensor(values, dtype)`` on ``device``, copied without blocking.

    ``torch.tensor(values, device="cuda")`` copies synchronously: the host waits until the GPU has
    finished all queued work. Built on the CPU and copied with ``non_blocking=True``, the (pageable,
    tiny) source is staged by the driver at once and the host runs on.
    """
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
