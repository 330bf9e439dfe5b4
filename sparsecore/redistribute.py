"""Turning importance into integer budgets: the one host routine every backend shares.

Budgets are plain Python/NumPy on the host so that all backends, and all processes of a distributed
job, split the freed weights identically given the same importance values.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .errors import SparseCoreError


def importance_shares(scores: npt.ArrayLike, sizes: npt.ArrayLike) -> np.ndarray:
    """``pi_l = s_l / sum(s)``; proportional to layer size when every score is 0. Never NaN."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return s
    if not np.isfinite(s).all() or (s < 0).any():
        raise SparseCoreError(f"layer importance must be finite and >= 0, got {s.tolist()}")
    total = float(s.sum())
    if total > 0:
        return s / total
    n = np.asarray(sizes, dtype=np.float64)
    return n / n.sum()


def split_budget(total: int, weights: npt.ArrayLike, capacity: npt.ArrayLike) -> np.ndarray:
    """Split ``total`` units into integers ``g_l <= capacity_l`` in proportion to ``weights``.

    Water-filling: a layer whose proportional share reaches its capacity is filled and closed, and
    the rest is re-split over the open layers until no layer overflows. The open layers then get
    ``floor(ideal)`` and the leftover units go one each to the largest fractional parts, ties to the
    lower layer index. If the weights of the open layers sum to 0 they are split by capacity.
    Raises if the capacities cannot hold ``total``.
    """
    w = np.asarray(weights, dtype=np.float64)
    cap = np.asarray(capacity, dtype=np.int64)
    if w.shape != cap.shape:
        raise SparseCoreError(f"{w.size} weights but {cap.size} capacities")
    if total < 0 or (cap < 0).any() or (w < 0).any() or not np.isfinite(w).all():
        raise SparseCoreError(
            f"split_budget needs total >= 0, capacities >= 0 and finite weights >= 0; got "
            f"total={total}, capacity={cap.tolist()}, weights={w.tolist()}"
        )
    if int(cap.sum()) < total:
        raise SparseCoreError(
            f"cannot place {total} weights: the layers have only {int(cap.sum())} free slots "
            f"(capacity per layer {cap.tolist()}); raise max_density or lower the density"
        )
    out = np.zeros(cap.shape, dtype=np.int64)
    open_ = cap > 0
    remaining = int(total)
    while remaining > 0 and open_.any():
        ideal = _proportional(remaining, w, cap, open_)
        full = open_ & (ideal >= cap)
        if not full.any():
            floors = np.floor(ideal).astype(np.int64)
            floors[~open_] = 0
            out[open_] = floors[open_]
            leftover = remaining - int(floors.sum())
            frac = ideal - floors
            # 0 <= leftover < number of open layers: each floor is at most its ideal, and the
            # ideals sum to ``remaining`` up to a relative rounding error far below 1 / remaining.
            if leftover > 0:
                candidates = np.flatnonzero(open_)  # floor(ideal) < cap here, so +1 fits
                # largest fractional part first, then lower layer index (a stable sort keeps it).
                order = candidates[np.argsort(-frac[candidates], kind="stable")]
                out[order[:leftover]] += 1
            remaining = 0
            break
        out[full] = cap[full]
        remaining -= int(cap[full].sum())
        open_ &= ~full
    return out


def _proportional(remaining: int, w: np.ndarray, cap: np.ndarray, open_: np.ndarray) -> np.ndarray:
    weights = np.where(open_, w, 0.0)
    if weights.sum() <= 0:
        weights = np.where(open_, cap.astype(np.float64), 0.0)
    ideal = remaining * weights / weights.sum()
    ideal[~open_] = 0.0
    return ideal


def capacities(sizes: npt.ArrayLike, kept: npt.ArrayLike, max_density: float) -> np.ndarray:
    """Free slots per layer under the density ceiling: ``max(0, floor(max_density*n) - kept)``."""
    ceiling = np.floor(max_density * np.asarray(sizes, dtype=np.float64)).astype(np.int64)
    return np.maximum(0, ceiling - np.asarray(kept, dtype=np.int64))
