"""The NumPy reference backend: the plainest correct implementation of the interface.

Selection is O(n): ``np.partition`` finds the k-th score, everything strictly better is taken, and
only the positions tied with the k-th score are ordered by hash. Every other backend is tested
against this one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import ArrayBackend, Sign
from .hashing import HashKey, layer_hash, position_hash


def pick(
    scores: np.ndarray,
    positions: np.ndarray,
    k: int,
    *,
    largest: bool,
    key: HashKey,
) -> np.ndarray:
    """Of the candidates at flat ``positions`` with ``scores``, the ``k`` first in selection order.

    Returns the chosen entries of ``positions`` (in no particular order).
    """
    n = positions.size
    if k <= 0:
        return positions[:0]
    if k >= n:
        return positions
    kth = n - k if largest else k - 1
    threshold = np.partition(scores, kth)[kth]
    better = scores > threshold if largest else scores < threshold
    tied = np.flatnonzero(scores == threshold)
    need = k - int(np.count_nonzero(better))
    if need < tied.size:
        hashes = position_hash(key, positions[tied]).astype(np.int64)
        # lexsort sorts by the last key first: hash descending, then flat index ascending.
        order = np.lexsort((positions[tied], -hashes))
        tied = tied[order[:need]]
    return np.concatenate([positions[better], positions[tied]])


def candidate_scores(flat: np.ndarray, positions: np.ndarray, magnitude: bool) -> np.ndarray:
    values = flat[positions]
    return np.abs(values) if magnitude else values


class NumpyBackend(ArrayBackend):
    """Reference implementation on ``numpy.ndarray``."""

    name = "numpy"

    def owns(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(int(s) for s in x.shape)

    def dtype_kind(self, x: Any) -> str:
        kind = np.asarray(x).dtype.kind
        return "i" if kind == "u" else kind

    def all_finite(self, x: Any) -> bool:
        return bool(np.isfinite(x).all())

    def count(self, mask: Any) -> int:
        return int(np.count_nonzero(mask))

    def count_positive(self, x: Any, mask: Any) -> int:
        return int(np.count_nonzero(mask & (x > 0)))

    def abs_sum(self, x: Any, mask: Any | None) -> float:
        values = x if mask is None else x[mask]
        return float(np.abs(values).sum(dtype=np.float64))

    def unit_abs_sum(self, x: Any, axis: int) -> np.ndarray:
        units = np.moveaxis(np.abs(x), axis, 0).reshape(x.shape[axis], -1)
        return units.sum(axis=1, dtype=np.float64)

    def unit_count(self, mask: Any, axis: int, active: bool) -> np.ndarray:
        units = np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1)
        counts = np.count_nonzero(units, axis=1).astype(np.int64)
        return counts if active else units.shape[1] - counts

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
        flat = x.reshape(-1)
        candidates = mask.reshape(-1) if among_active else ~mask.reshape(-1)
        if sign == "positive":
            candidates = candidates & (flat > 0)
        elif sign == "nonpositive":
            candidates = candidates & ~(flat > 0)
        positions = np.flatnonzero(candidates)
        chosen = pick(
            candidate_scores(flat, positions, magnitude), positions, k, largest=largest, key=key
        )
        out = np.zeros(flat.shape, dtype=bool)
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
        units = x.shape[axis]
        ids = np.moveaxis(np.arange(x.size, dtype=np.int64).reshape(x.shape), axis, 0)
        ids = ids.reshape(units, -1)
        flat = x.reshape(-1)
        flat_mask = mask.reshape(-1)
        out = np.zeros(flat.shape, dtype=bool)
        for j in range(units):
            if ks[j] == 0:
                continue
            row = ids[j]
            row_candidates = row[flat_mask[row] == among_active]
            chosen = pick(
                candidate_scores(flat, row_candidates, magnitude),
                row_candidates,
                int(ks[j]),
                largest=largest,
                key=key,
            )
            out[chosen] = True
        return out.reshape(x.shape)

    def position_hash(self, key: HashKey, like: Any) -> Any:
        return layer_hash(key, tuple(like.shape))

    def and_not(self, a: Any, b: Any) -> Any:
        return a & ~b

    def logical_or(self, a: Any, b: Any) -> Any:
        return a | b

    def zeros_mask(self, like: Any) -> Any:
        return np.zeros(like.shape, dtype=bool)

    def apply(self, weight: Any, old_mask: Any, new_mask: Any) -> Any:
        return np.where(old_mask & new_mask, weight, np.zeros((), dtype=weight.dtype))
