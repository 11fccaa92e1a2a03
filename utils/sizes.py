"""Bytes held by tensors and networks, as the results report memory (MB = 2^20 bytes)."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

BYTES_PER_MB = 2 ** 20


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def network_bytes(module: nn.Module) -> int:
    """Parameters plus floating-point buffers (e.g. BatchNorm running statistics)."""
    buffers = (b for b in module.buffers() if b.is_floating_point())
    return tensor_bytes(module.parameters()) + tensor_bytes(buffers)
