"""Mask updates of CPU parameters through the Numba backend, on NumPy views of the tensors.

Why: on a CPU, the torch backend's mask update is many small tensor operations per layer, each
with its own dispatch, and boolean passes that write one byte at a time. The Numba backend does
the same update in two compiled passes per layer (and spreads large updates over threads):
inside LeNet-300-100 training an update takes about 1.5 ms instead of 3.3 ms
(``benchmarks/overhead_torch.py`` prints both, and what they do to an epoch). Both backends give the NumPy reference's masks bit for bit (the core
and torch test suites prove each against it), so the choice changes no result, only the time.

How: ``Tensor.numpy()`` of a CPU tensor is a view of the same memory, so the weights, momentum
and gradients are read in place; the new masks come back as NumPy arrays and are wrapped with
``torch.from_numpy`` (no copy) before the adapter copies them into its own mask tensors. The
Numba backend's threads are as many as PyTorch's (:func:`sparsecore.torch.threads.kernel_threads`),
and starting them leaves PyTorch's thread count as it was.

When: ``attach(..., update_backend="auto")`` (the default) takes this path when every array of
the update is a CPU tensor in float16, float32 or float64 and Numba imports; otherwise (CUDA,
bfloat16, no Numba) the torch backend runs the update. ``update_backend="device"`` (earlier
``"torch"``) always uses the torch backend; ``"host"`` (earlier ``"numba"``) requires this path
and says why when it cannot be taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import numpy as np
import torch

from sparsecore.backend import ArrayBackend, get_backend
from sparsecore.layers import Layer
from sparsecore.placement import ALIASES, PLACEMENTS

#: Values of ``attach(update_backend=...)``: the placements, then PyTorch's earlier names.
UPDATE_BACKENDS = (*PLACEMENTS, *ALIASES["torch"])

#: Float dtypes NumPy can view.
VIEWABLE_DTYPES = (torch.float16, torch.float32, torch.float64)

_NUMBA: ArrayBackend | None = None
_NUMBA_PROBLEM: str | None = None


def numba_backend() -> tuple[ArrayBackend | None, str | None]:
    """The Numba backend, or ``(None, why not)``; imported once per process, on first use."""
    global _NUMBA, _NUMBA_PROBLEM
    if _NUMBA is None and _NUMBA_PROBLEM is None:
        try:
            _NUMBA = get_backend("numba")
        except Exception as err:  # ImportError, or any failure of Numba itself
            _NUMBA_PROBLEM = f"Numba is not usable here ({type(err).__name__}: {err})"
    return _NUMBA, _NUMBA_PROBLEM


def why_not_viewable(layers: Sequence[Layer]) -> str | None:
    """None if every array of ``layers`` can be read in place as NumPy, else the first reason."""
    for layer in layers:
        for label, array in (
            ("weight", layer.weight),
            ("mask", layer.mask),
            ("momentum", layer.momentum),
            ("gradient", layer.grad),
        ):
            problem = None if array is None else why_not_viewable_tensor(array, label != "mask")
            if problem is not None:
                return f"layer {layer.name!r}: {label} {problem}"
    return None


def why_not_viewable_tensor(t: torch.Tensor, floating: bool = True) -> str | None:
    """None if ``t`` can be read in place as NumPy (a dense CPU tensor; with ``floating``, in
    float16, float32 or float64), else why not, as a predicate ("is on cuda:0, not the CPU")."""
    if t.device.type != "cpu":
        return f"is on {t.device}, not the CPU"
    if t.layout != torch.strided:
        return f"is a {t.layout} tensor"
    if floating and t.dtype not in VIEWABLE_DTYPES:
        return f"is {t.dtype} (NumPy has no such type)"
    return None


def numpy_views(layers: Sequence[Layer]) -> list[Layer]:
    """The same layers with NumPy views of their CPU tensors (no copies)."""

    def view(t: torch.Tensor | None) -> Any:
        return None if t is None else t.detach().numpy()

    return [
        Layer(
            x.name,
            view(x.weight),
            view(x.mask),
            momentum=view(x.momentum),
            grad=view(x.grad),
            axis=x.axis,
        )
        for x in layers
    ]


@overload
def as_tensors(arrays: None) -> None: ...
@overload
def as_tensors(arrays: Sequence[Any]) -> list[torch.Tensor]: ...
def as_tensors(arrays: Sequence[Any] | None) -> list[torch.Tensor] | None:
    """Arrays from either backend as tensors (NumPy arrays wrapped without a copy)."""
    if arrays is None:
        return None
    return [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in arrays]


@overload
def as_arrays(tensors: None) -> None: ...
@overload
def as_arrays(tensors: Sequence[Any]) -> list[np.ndarray]: ...
def as_arrays(tensors: Sequence[Any] | None) -> list[np.ndarray] | None:
    """CPU tensors as NumPy views (no copy); NumPy arrays stay as they are."""
    if tensors is None:
        return None
    return [t.numpy() if isinstance(t, torch.Tensor) else t for t in tensors]
