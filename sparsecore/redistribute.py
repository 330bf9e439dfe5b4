"""Turning importance into integer budgets: the one host routine every backend shares.

Budgets are plain Python/NumPy on the host so that all backends, and all processes of a distributed
job, split the freed weights identically given the same importance values.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .errors import SparseCoreError


def importance_shares(scores: npt.ArrayLike, sizes: npt.ArrayLike) -> np.ndarray:
    """``pi_l = s_l / sum(s)``; proportional to layer size when every score is 0. Never NaN.

    The scores are converted to float64 first, so float32 importance (from a GPU backend) gives
    the shares of its exact values, as float64 scores would.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return s
    if not np.isfinite(s).all() or (s < 0).any():
        raise SparseCoreError(f"layer importance must be finite and >= 0, got {s.tolist()}")
    total = float(s.sum())
    if total > 0:
        return s / total
    n = np.asarray(sizes)  # integer counts: true division gives float64 shares
    return n / n.sum()


def split_budget(total: int, weights: npt.ArrayLike, capacity: npt.ArrayLike) -> np.ndarray:
    """Split ``total`` units into integers ``g_l <= capacity_l`` in proportion to ``weights``.

    Water-filling: a layer whose proportional share reaches its capacity is filled and closed, and
    the rest is re-split over the open layers until no layer overflows. The open layers then get
    ``floor(ideal)`` and the leftover units go one each to the largest fractional parts, ties to the
    lower layer index. If the weights of the open layers sum to 0 they are split by capacity.
    Raises if the capacities cannot hold ``total``.
    """
    w = np.asarray(weights, dtype=np.float64)  # float32 weights split like their exact values
    cap = np.asarray(capacity)  # integer counts
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
    while open_.any():
        ideal = _proportional(remaining, w, cap, open_)
        full = open_ & (ideal >= cap)
        if not full.any():
            # Every open layer fits: floor(ideal) each, then one more for the largest fractional
            # parts until ``remaining`` is placed. Fewer are left over than there are open layers
            # (each floor is at most its ideal, and the ideals sum to ``remaining`` up to a
            # relative rounding error far below 1 / remaining), and floor(ideal) < cap, so +1 fits.
            share = ideal[open_]
            floors = np.floor(share)  # float64 holding exact integers
            # largest fractional part first, ties to the lower layer index (a stable sort)
            order = np.argsort(floors - share, kind="stable")
            floors[order[: remaining - int(floors.sum())]] += 1
            out[open_] = floors
            break
        out[full] = cap[full]
        remaining -= int(cap[full].sum())
        open_ &= ~full
    return out


def _proportional(remaining: int, w: np.ndarray, cap: np.ndarray, open_: np.ndarray) -> np.ndarray:
    """``remaining`` split over the open layers in proportion to their weights, or to their
    capacities if those weights are all 0; closed layers get 0."""
    weights = np.where(open_, w, 0.0)
    if weights.sum() <= 0:
        weights = np.where(open_, cap, 0.0)
    return remaining * weights / weights.sum()


def capacities(sizes: npt.ArrayLike, kept: npt.ArrayLike, max_density: float) -> np.ndarray:
    """Free slots per layer under the density ceiling: ``max(0, floor(max_density*n) - kept)``."""
    ceiling = np.floor(max_density * np.asarray(sizes)).astype(np.int64)
    return np.maximum(0, ceiling - np.asarray(kept))
