"""What a recompute needs to run a forward again exactly: the random generators' state (dropout masks, and the
seeds of fastlora's counter-based dropout, are drawn from them) and autocast's state. Shared by the offloaded
checkpoints (:mod:`fastlora.training.offload`) and the tiled MLP (:mod:`fastlora.training.tiled_mlp`), which both run a forward
under ``no_grad`` and again with gradients in backward.

Usage::

    state = ForwardState.capture(x.device)
    with torch.no_grad():
        y = f(x)
    ...
    with torch.enable_grad(), state.replaying():
        y_again = f(x)            # the same masks, the same autocast dtypes
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor


class ForwardState(NamedTuple):
    """The generators' and autocast's state at the start of a forward on ``device``."""

    device: torch.device
    cpu_rng: Tensor
    cuda_rng: Optional[Tensor]
    autocast: tuple[tuple[str, bool, torch.dtype], ...]

    @classmethod
    def capture(cls, device: torch.device) -> "ForwardState":
        """The state now, for a forward whose tensors live on ``device``."""
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        types = ("cpu",) if device.type in ("cpu", "meta") else ("cpu", device.type)
        autocast = tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types)
        return cls(device, torch.get_rng_state(), cuda_rng, autocast)

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Run the block with the generators set back to this state (restored afterwards) and autocast as it was."""
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            for device_type, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield


def gradients(outputs: Tensor, grad_outputs: Tensor, inputs: Sequence[Tensor]) -> list[Optional[Tensor]]:
    """d(outputs)/d(inputs) contracted with ``grad_outputs``; None for an input the outputs do not depend on."""
    if not inputs or not outputs.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True))
