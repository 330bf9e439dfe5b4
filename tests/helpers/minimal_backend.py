"""A backend that implements only the required primitives of ``sparsecore.backend``.

It shows what a new backend needs: fifteen one-line array operations. Everything the mask update
asks of a backend (counts, masked and per-unit sums, the selection with its tie order, the
position hash, applying masks, signed fills) then comes from the defaults written once on top of
them. It works on NumPy arrays with plain NumPy calls, so its results can be compared with the
reference backend's bit for bit; ``tests/core/test_backend_interface.py`` runs the equivalence
suite on it, and a whole engine update.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsecore.backend import REQUIRED_PRIMITIVES, ArrayBackend


class MinimalBackend(ArrayBackend):
    """The required primitives on ``numpy.ndarray``, nothing else."""

    name = "minimal"

    def owns(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in x.shape)

    def dtype_kind(self, x: Any) -> str:
        return {"u": "i"}.get(x.dtype.kind, x.dtype.kind)

    def from_numpy(self, a: np.ndarray, like: Any) -> Any:
        return np.array(a)

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return np.reshape(x, shape)

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        return np.moveaxis(x, source, destination)

    def abs(self, x: Any) -> Any:
        return np.abs(x)

    def positive(self, x: Any) -> Any:
        return x > 0

    def isfinite(self, x: Any) -> Any:
        return np.isfinite(x)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return np.where(cond, a, b)

    def nonzero(self, flat: Any) -> Any:
        return np.flatnonzero(flat)

    def take(self, flat: Any, index: Any) -> Any:
        return flat[index]

    def mark(self, positions: Any, size: int, like: Any) -> Any:
        out = np.zeros(size, dtype=bool)
        out[positions] = True
        return out

    def argsort(self, flat: Any, *, descending: bool) -> Any:
        if descending:  # stable: sort the reversed array, then undo the reversal
            return flat.size - 1 - np.argsort(flat[::-1], kind="stable")[::-1]
        return np.argsort(flat, kind="stable")

    def sum(self, x: Any, axis: int | None = None) -> np.ndarray:
        return np.asarray(
            np.sum(x, axis=axis, dtype=np.float64 if x.dtype.kind == "f" else np.int64)
        )


def overridden(backend: ArrayBackend) -> list[str]:
    """The methods of ``backend`` other than the required primitives that its class defines
    itself (none for :class:`MinimalBackend`)."""
    own = {
        name
        for cls in type(backend).__mro__
        if cls is not ArrayBackend and issubclass(cls, ArrayBackend)
        for name in vars(cls)
        if callable(vars(cls)[name]) and not name.startswith("_")
    }
    return sorted(own - set(REQUIRED_PRIMITIVES))


#: The operations with a default on the primitives (a backend may override them for speed).
OPERATIONS = tuple(
    name
    for name, value in vars(ArrayBackend).items()
    if callable(value)
    and not name.startswith("_")
    and name not in REQUIRED_PRIMITIVES
    and not name.startswith("fused_")
)


def defaults_only(cls: type[ArrayBackend]) -> type[ArrayBackend]:
    """``cls`` with its own operations set aside: its primitives under the interface's defaults
    (and no fused capability), to check the primitives of a real framework's backend."""
    namespace = {name: vars(ArrayBackend)[name] for name in OPERATIONS}
    namespace["supports_fused_update"] = False
    return type(f"{cls.__name__}Defaults", (cls,), namespace)
