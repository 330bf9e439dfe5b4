"""The adapter's use of the sparse kernels: which layers they take, and the dense-gradient window.

``attach(kernels=...)`` routes the sparse ``nn.Linear``/``nn.Conv2d`` weights through the
sparse kernels (:class:`~.kernel_router.KernelRouter`). Those kernels compute the weight gradient
at the active positions only, but a mask update regrows by the momentum of *every* position: so
during the last steps before an update (about ``1 / (1 - beta)`` steps, the momentum's memory)
the router computes dense weight gradients again, and sparse ones the rest of the time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sparsecore.errors import SparseCoreError
from sparsecore.schedules import UpdateSchedule

from . import momentum as mom
from .selection import Target

__all__ = ["build_router", "dense_gradients_due", "gradient_window"]


def build_router(kernels: str, targets: Sequence[Target], masks: Sequence[torch.Tensor]) -> Any:
    """The sparse-kernel router over the sparse ``nn.Linear``/``nn.Conv2d`` weights.

    Other sparse parameters (Conv1d/3d, included embeddings, ...) keep the dense computation on
    masked weights. The router validates everything before it installs anything.
    """
    try:
        from .kernel_router import KernelRouter
    except ImportError as err:  # pragma: no cover - the module ships with the package
        raise SparseCoreError(
            f"kernels={kernels!r} needs sparsecore.torch.kernel_router, which could not be "
            f"imported ({err}); use kernels=None"
        ) from err
    routed: list[tuple[str, nn.Module, torch.Tensor]] = [
        (t.name, t.module, m)
        for t, m in zip(targets, masks)
        if isinstance(t.module, (nn.Linear, nn.Conv2d)) and t.module.weight is t.param
    ]
    if not routed:
        raise SparseCoreError(
            f"kernels={kernels!r}: none of the sparse parameters {[t.name for t in targets]} "
            f"belongs to an nn.Linear or nn.Conv2d, the layers the sparse kernels handle"
        )
    try:
        return KernelRouter(routed, kernels)
    except (TypeError, ValueError, RuntimeError) as err:
        raise SparseCoreError(f"kernels={kernels!r}: {err}") from err


def gradient_window(groups: Sequence[Any], kinds: Sequence[str], default_beta: float) -> int:
    """Steps before an update with dense weight gradients: the longest momentum memory,
    ``1 / (1 - beta)``, over the sparse parameters' momentum sources."""
    beta = max(mom.momentum_beta(g, k, default_beta) for g, k in zip(groups, kinds))
    return max(1, round(1.0 / (1.0 - beta)))


def dense_gradients_due(
    schedule: UpdateSchedule,
    steps: int,
    epochs: int,
    steps_per_epoch: int | None,
    window: int,
) -> bool:
    """Whether the next mask update is at most ``window`` steps away (counting an epoch-end
    update, whose step is known once the first epoch has ended; dense until then)."""
    until = schedule.steps_until_next(steps)
    if schedule.at_epoch_end and steps < schedule.stop_step():
        if steps_per_epoch is None:
            until = 0  # epoch length unknown until the first epoch ends: stay dense
        else:
            into = steps - epochs * steps_per_epoch
            until = min(until, max(0, steps_per_epoch - into))
    return until <= window
