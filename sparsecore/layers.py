"""What the engine updates: a named sparse layer with its weight, mask and signals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layer:
    """One sparse layer as the engine sees it.

    ``weight``, ``mask`` (boolean, same shape), ``momentum`` (same shape; needed by the momentum
    modes) and ``grad`` (same shape; needed by ``growth='gradient'``) are arrays of one backend
    (NumPy, torch, ...). ``axis`` is the output axis: 0 for PyTorch's (out, in) and OIHW weights,
    -1 for Keras kernels; it matters for ``momentum_neuron`` growth and ER initialisation.
    Momentum and gradients must be read *before* any masking: sparse momentum needs them at
    inactive positions.
    """

    name: str
    weight: Any
    mask: Any
    momentum: Any | None = None
    grad: Any | None = None
    axis: int = 0
