"""What offloading to host memory needs, shared by the offloaded checkpoints and the host-resident optimizer state:
host buffers (pinned when the tensor lives on a GPU, so copies are asynchronous) and one side stream per device.

Usage::

    host = host_buffer(x)                 # an empty host tensor of x's shape and dtype
    streams = SideStreams()
    stream = streams(x.device)            # None off CUDA: copy on the caller's stream
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def host_buffer(like: Tensor) -> Tensor:
    """An empty contiguous host tensor of ``like``'s shape and dtype, pinned unless ``like`` is on the CPU already.

    Usage: ``host = host_buffer(x)``
    """
    if like.device.type == "cpu":
        return torch.empty(like.shape, dtype=like.dtype)
    try:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
    except RuntimeError:  # meta tensors on a machine without a pinned-memory allocator
        return torch.empty(like.shape, dtype=like.dtype)


class SideStreams:
    """One side CUDA stream per device, made on first use.

    Usage: ``stream = streams(x.device)`` (None for a device that is not CUDA); ``streams.synchronize()``
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, "torch.cuda.Stream"] = {}

    def __call__(self, device: torch.device) -> Optional["torch.cuda.Stream"]:
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def synchronize(self) -> None:
        """Block the host until every stream's work has finished."""
        for stream in self._streams.values():
            stream.synchronize()
