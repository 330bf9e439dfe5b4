"""The two pieces a compact model needs besides ordinary layers (see :mod:`.compaction`).

- :class:`ConstantChannelNorm`: batch norm of channels that compaction removed because they hold
  one value for the whole batch. In training mode batch norm maps such a channel to its shift
  ``beta`` (the batch mean is the value itself, the variance 0) and still moves the running
  statistics towards that mean and a variance of 0; in evaluation mode it applies the running
  statistics. Both depend on the mode, so the value is computed on every call, on a vector of one
  entry per removed channel, and the running statistics of the removed channels stay exact.
- :func:`constant_map`: what constant channels add to a zero-padded convolution. Inside the image
  every tap sees the constant; at the borders the taps that fall on the padding see 0, so the
  contribution differs per output position. It is the convolution of a one-image batch holding
  the constants with the weights that read them, computed for the input's size on each call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ConstantChannelNorm", "constant_map"]


class ConstantChannelNorm(nn.Module):
    """Batch norm of constant channels: ``forward(values)`` maps one value per channel.

    Built from a ``BatchNorm1d/2d`` and the channel indices it stands for; its statistics and
    affine parameters are buffers (compaction freezes what it removes).
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, channels: torch.Tensor) -> None:
        super().__init__()
        idx = channels.to(device="cpu", dtype=torch.long)
        self.eps = float(bn.eps)
        self.momentum = bn.momentum
        self.affine = bool(bn.affine)
        self.track_running_stats = bool(bn.track_running_stats)
        self.channels = [int(c) for c in idx]
        self.training = bn.training

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach()[idx.to(t.device)].clone()

        self.register_buffer("weight", take(bn.weight) if self.affine else None)
        self.register_buffer("bias", take(bn.bias) if self.affine else None)
        self.register_buffer("running_mean", take(bn.running_mean))
        self.register_buffer("running_var", take(bn.running_var))
        nbt = bn.num_batches_tracked
        self.register_buffer("num_batches_tracked", None if nbt is None else nbt.detach().clone())

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training or not self.track_running_stats
        if batch_stats:
            if self.training and self.track_running_stats:
                self._update_running_stats(values)
            out = torch.zeros_like(values)  # (value - batch mean) is exactly 0
        else:
            assert self.running_mean is not None and self.running_var is not None
            out = (values - self.running_mean) / torch.sqrt(self.running_var + self.eps)
        if self.affine:
            assert self.weight is not None and self.bias is not None
            out = out * self.weight + self.bias
        return out

    @torch.no_grad()
    def _update_running_stats(self, values: torch.Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None
        factor = 0.0 if self.momentum is None else float(self.momentum)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as batch norm does
                factor = 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - factor).add_(values.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor)  # the batch variance of a constant is 0

    def extra_repr(self) -> str:
        return f"{len(self.channels)} channels, eps={self.eps}, momentum={self.momentum}"


def constant_map(
    x: torch.Tensor,
    values: torch.Tensor,
    weight: torch.Tensor,
    stride: Any,
    padding: Any,
    dilation: Any,
) -> torch.Tensor:
    """``(1, out, Ho, Wo)``: what constant input channels (``values``, one per channel) add to a
    zero-padded convolution of ``x`` with ``weight`` (the weights that read those channels)."""
    h, w = x.shape[-2:]
    image = values.to(weight.dtype).reshape(1, -1, 1, 1).expand(1, -1, h, w)
    return F.conv2d(image, weight, None, stride, padding, dilation)
