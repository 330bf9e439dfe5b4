"""The NumPy reference backend, written once against an array module with NumPy's API.

:class:`ArrayModuleBackend` implements the interface with ``xp`` operations only (``flatnonzero``,
``partition``, ``lexsort``, ``count_nonzero``, ``moveaxis``, ``where``, wrapping ``uint32``
arithmetic). :class:`NumpyBackend` is it with ``xp = numpy``, the plainest correct implementation
that every other backend is tested against; ``sparsecore.cupy.CupyBackend`` is the same code with
``xp = cupy`` on the arrays' device. Selection is O(n): a partition finds the k-th score,
everything strictly better is taken, and only the positions tied with the k-th score are ordered
by (hash descending, position ascending). Only counts and float64 sums come back to the host.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .backend import ArrayBackend, Sign
from .hashing import HashKey, position_hash

__all__ = ["ArrayModuleBackend", "NumpyBackend"]


class ArrayModuleBackend(ArrayBackend):
    """The backend interface on any array module with NumPy's API (``numpy`` or ``cupy``)."""

    name = "array-module"

    def __init__(self, xp: ModuleType) -> None:
        self.xp = xp

    def _host(self, a: Any) -> np.ndarray:
        """``a`` as a NumPy array: a NumPy array is one already, a CuPy array is copied over."""
        return a if isinstance(a, np.ndarray) else a.get()

    def _rows(self, a: Any, axis: int) -> Any:
        """``a`` as one row per unit along ``axis`` (the other axes flattened in C order)."""
        units = a.shape[axis]
        return self.xp.moveaxis(a, axis, 0).reshape(units, a.size // units)

    # -- inspection ---------------------------------------------------------------------
    def owns(self, x: Any) -> bool:
        return isinstance(x, self.xp.ndarray)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(int(s) for s in x.shape)

    def dtype_kind(self, x: Any) -> str:
        kind = x.dtype.kind
        return "i" if kind == "u" else kind

    def all_finite(self, x: Any) -> bool:
        return bool(self.xp.isfinite(x).all())

    # -- the required primitives ---------------------------------------------------------
    def from_numpy(self, a: np.ndarray, like: Any) -> Any:
        return self.xp.asarray(a)

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return x.reshape(shape)

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        return self.xp.moveaxis(x, source, destination)

    def abs(self, x: Any) -> Any:
        return self.xp.abs(x)

    def positive(self, x: Any) -> Any:
        return x > 0

    def isfinite(self, x: Any) -> Any:
        return self.xp.isfinite(x)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self.xp.where(cond, a, b)

    def nonzero(self, flat: Any) -> Any:
        return self.xp.flatnonzero(flat)

    def take(self, flat: Any, index: Any) -> Any:
        return flat[index]

    def mark(self, positions: Any, size: int, like: Any) -> Any:
        out = self.xp.zeros(size, dtype=bool)
        out[positions] = True
        return out

    def argsort(self, flat: Any, *, descending: bool) -> Any:
        if not descending:
            return self.xp.argsort(flat, kind="stable")
        # Stable descending: sort the reversed array, reverse the order, index from the front.
        return flat.size - 1 - self.xp.argsort(flat[::-1], kind="stable")[::-1]

    def sum(self, x: Any, axis: int | None = None) -> np.ndarray:
        dtype = self.xp.float64 if x.dtype.kind == "f" else self.xp.int64
        total = x.sum(axis=axis, dtype=dtype)
        return np.asarray(total) if isinstance(total, (np.ndarray, np.generic)) else total.get()

    # -- reductions ---------------------------------------------------------------------
    def count(self, mask: Any) -> int:
        return int(self.xp.count_nonzero(mask))

    def count_positive(self, x: Any, mask: Any) -> int:
        return int(self.xp.count_nonzero(mask & (x > 0)))

    def abs_sum(self, x: Any, mask: Any | None) -> float:
        values = x if mask is None else x[mask]
        return float(self.xp.abs(values).sum(dtype=self.xp.float64))

    def unit_abs_sum(self, x: Any, axis: int) -> np.ndarray:
        xp = self.xp
        return self._host(self._rows(xp.abs(x), axis).sum(axis=1, dtype=xp.float64))

    def unit_count(self, mask: Any, axis: int, active: bool) -> np.ndarray:
        units = self._rows(mask, axis)
        counts = self._host(self.xp.count_nonzero(units, axis=1))  # int64
        return counts if active else units.shape[1] - counts

    # -- selection ----------------------------------------------------------------------
    def pick(self, scores: Any, positions: Any, k: int, *, largest: bool, key: HashKey) -> Any:
        """Of the candidates at flat ``positions`` with ``scores``, the ``k`` first in order.

        Returns the chosen entries of ``positions`` (in no particular order).
        """
        xp = self.xp
        n = int(positions.size)
        if k <= 0:
            return positions[:0]
        if k >= n:
            return positions
        kth = n - k if largest else k - 1
        threshold = xp.partition(scores, kth)[kth]
        better = scores > threshold if largest else scores < threshold
        tied = xp.flatnonzero(scores == threshold)
        need = k - int(xp.count_nonzero(better))
        if need < int(tied.size):
            tied_pos = positions[tied]
            # ~h = 2**32 - 1 - h orders the uint32 hashes from the largest down. lexsort: the last
            # key is the primary one: hash descending, then position ascending.
            order = xp.lexsort(xp.stack([tied_pos, ~position_hash(key, tied_pos)]))
            tied = tied[order[:need]]
        return xp.concatenate([positions[xp.flatnonzero(better)], positions[tied]])

    def _scores(self, flat: Any, positions: Any, magnitude: bool) -> Any:
        values = flat[positions]
        return self.xp.abs(values) if magnitude else values

    def select(
        self,
        x: Any,
        mask: Any,
        k: int,
        *,
        among_active: bool,
        largest: bool,
        magnitude: bool,
        key: HashKey,
        sign: Sign = "any",
    ) -> Any:
        xp = self.xp
        flat = x.ravel()
        candidates = mask.ravel() if among_active else ~mask.ravel()
        if sign != "any":  # "positive" or "nonpositive" (-0.0 included)
            positive = flat > 0
            candidates = candidates & (positive if sign == "positive" else ~positive)
        positions = xp.flatnonzero(candidates)
        chosen = self.pick(
            self._scores(flat, positions, magnitude), positions, k, largest=largest, key=key
        )
        out = xp.zeros(flat.shape, dtype=bool)
        out[chosen] = True
        return out.reshape(x.shape)

    def select_per_unit(
        self,
        x: Any,
        mask: Any,
        ks: np.ndarray,
        *,
        axis: int,
        among_active: bool,
        largest: bool,
        magnitude: bool,
        key: HashKey,
    ) -> Any:
        xp = self.xp
        ids = self._rows(xp.arange(x.size).reshape(x.shape), axis)  # flat positions per unit
        flat = x.ravel()
        flat_mask = mask.ravel()
        out = xp.zeros(flat.shape, dtype=bool)
        for j in range(x.shape[axis]):
            if int(ks[j]) == 0:
                continue
            row = ids[j]
            row_candidates = row[flat_mask[row] == among_active]
            chosen = self.pick(
                self._scores(flat, row_candidates, magnitude),
                row_candidates,
                int(ks[j]),
                largest=largest,
                key=key,
            )
            out[chosen] = True
        return out.reshape(x.shape)

    # -- element-wise -------------------------------------------------------------------
    def position_hash(self, key: HashKey, like: Any) -> Any:
        xp = self.xp
        return position_hash(key, xp.arange(like.size)).reshape(like.shape)

    def and_not(self, a: Any, b: Any) -> Any:
        return a & ~b

    def logical_or(self, a: Any, b: Any) -> Any:
        return a | b

    def zeros_mask(self, like: Any) -> Any:
        return self.xp.zeros(like.shape, dtype=bool)

    def apply(self, weight: Any, old_mask: Any, new_mask: Any) -> Any:
        xp = self.xp
        return xp.where(old_mask & new_mask, weight, xp.zeros((), dtype=weight.dtype))

    def signed_fill(self, x: Any, where: Any, value: float, key: HashKey) -> Any:
        xp = self.xp
        odd = (self.position_hash(key, x) & xp.uint32(1)).astype(bool)
        magnitude = xp.asarray(value, dtype=x.dtype)
        return xp.where(where, xp.where(odd, magnitude, -magnitude), x)


class NumpyBackend(ArrayModuleBackend):
    """Reference implementation on ``numpy.ndarray``."""

    name = "numpy"

    def __init__(self) -> None:
        super().__init__(np)
