"""A brute-force model of the specification, for checking every backend against.

It sorts everything (O(n log n)) with the full key of ALGORITHM.md and recomputes a whole mask update
step by step, so it is slow and obviously right; the library's O(n) selections must agree exactly.
Importable from any test (``pythonpath`` in pyproject.toml adds this folder).
"""

from __future__ import annotations

import math

import numpy as np

from sparsecore import HashKey, position_hash


def brute_select(
    scores: np.ndarray, candidates: np.ndarray, k: int, *, largest: bool, key: HashKey
) -> np.ndarray:
    """Boolean mask of the k first candidates by (score, hash descending, index ascending)."""
    flat = scores.reshape(-1)
    idx = np.flatnonzero(candidates.reshape(-1))
    hashes = position_hash(key, idx).astype(np.int64)
    kind = flat.dtype.kind
    values = flat[idx].astype(np.float64) if kind == "f" else flat[idx].astype(np.int64)
    primary = -values if largest else values
    order = sorted(range(idx.size), key=lambda j: (primary[j], -hashes[j], idx[j]))
    out = np.zeros(flat.size, dtype=bool)
    out[idx[order[:k]]] = True
    return out.reshape(scores.shape)


def brute_prune(
    weight: np.ndarray, mask: np.ndarray, rate: float, mode: str, key: HashKey
) -> np.ndarray:
    """The gross pruned set of one layer, from the specification's words."""
    if mode == "magnitude":
        r = round(rate * int(mask.sum()))
        return brute_select(np.abs(weight), mask, r, largest=False, key=key)
    positive = mask & (weight > 0)
    nonpositive = mask & ~(weight > 0)
    pos = brute_select(weight, positive, round(rate * int(positive.sum())), largest=False, key=key)
    neg = brute_select(
        weight, nonpositive, round(rate * int(nonpositive.sum())), largest=True, key=key
    )
    return pos | neg


def brute_importance(layer_signal: np.ndarray, mask: np.ndarray) -> float:
    """Mean |signal| over the active positions in float64 (over all positions if none)."""
    values = np.abs(layer_signal.astype(np.float64))
    return float(values[mask].mean()) if mask.any() else float(values.mean())


def brute_split(total: int, weights: list[float], capacity: list[int]) -> list[int]:
    """Water-filling written as a plain loop over Python floats, largest remainder at the end."""
    cap = list(capacity)
    g = [0] * len(cap)
    open_ = [c > 0 for c in cap]
    remaining = total
    while remaining > 0 and any(open_):
        w = [weights[i] if open_[i] else 0.0 for i in range(len(cap))]
        if sum(w) <= 0:
            w = [float(cap[i]) if open_[i] else 0.0 for i in range(len(cap))]
        ideal = [remaining * w[i] / sum(w) for i in range(len(cap))]
        full = [i for i in range(len(cap)) if open_[i] and ideal[i] >= cap[i]]
        if not full:
            floors = [math.floor(ideal[i]) if open_[i] else 0 for i in range(len(cap))]
            left = remaining - sum(floors)
            ranked = sorted(
                (i for i in range(len(cap)) if open_[i]), key=lambda i: (-(ideal[i] - floors[i]), i)
            )
            for i in range(len(cap)):
                if open_[i]:
                    g[i] = floors[i]
            for i in ranked[:left]:
                g[i] += 1
            return g
        for i in full:
            g[i] = cap[i]
            remaining -= cap[i]
            open_[i] = False
    return g


def brute_dead_units(mask: np.ndarray, momentum: np.ndarray | None, axis: int) -> np.ndarray:
    """Dead output units from the specification's words: no active weight, or momentum 0 at every
    position of the unit while the layer's momentum is not 0 everywhere."""
    rows_mask = np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1)
    dead = ~rows_mask.any(axis=1)
    if momentum is not None and np.any(momentum != 0):
        rows_p = np.moveaxis(momentum, axis, 0).reshape(mask.shape[axis], -1)
        dead |= ~(rows_p != 0).any(axis=1)
    return dead


def brute_revive(
    momentum: np.ndarray, kept: np.ndarray, budget: int, dead: np.ndarray, axis: int, key: HashKey
) -> np.ndarray:
    """Positions grown into dead units: their equal share of ``budget``, spread evenly (with each
    unit's free slots as capacity), largest |momentum| first inside each unit, ties by hash."""
    units = kept.shape[axis]
    ids = np.moveaxis(np.arange(kept.size).reshape(kept.shape), axis, 0).reshape(units, -1)
    free = [int((~kept.reshape(-1)[ids[j]]).sum()) if dead[j] else 0 for j in range(units)]
    share = round(budget * int(dead.sum()) / units)
    quotas = brute_split(min(share, sum(free)), [1.0 if d else 0.0 for d in dead], free)
    out = np.zeros(kept.size, dtype=bool)
    for j in range(units):
        if quotas[j]:
            candidates = np.zeros(kept.size, dtype=bool)
            candidates[ids[j]] = True
            candidates &= ~kept.reshape(-1)
            chosen = brute_select(
                np.abs(momentum).reshape(-1), candidates, quotas[j], largest=True, key=key
            )
            out |= chosen
    return out.reshape(kept.shape)


def brute_ablate(
    kept: np.ndarray,
    *,
    ablate_below: float,
    axis: int,
    nnz_before: int,
    removable: int,
    key: HashKey,
) -> np.ndarray:
    """Ablated output units from the specification's words (docs/algorithm.md, "Structure"):
    units whose active count after pruning is below ``ablate_below`` times the mean count of
    the units that have weights, fewest first, ties by the hash of the unit index (larger first)
    then lower index, while the weights removed stay within ``removable`` and the units left
    hold at least ``nnz_before`` positions."""
    units = kept.shape[axis]
    per_unit = kept.size // units
    counts = [int(c) for c in np.moveaxis(kept, axis, 0).reshape(units, -1).sum(axis=1)]
    live = [c for c in counts if c > 0]
    out = np.zeros(units, dtype=bool)
    if ablate_below <= 0 or not live:
        return out
    threshold = ablate_below * sum(live) / len(live)
    hashes = position_hash(key, np.arange(units)).astype(np.int64)
    candidates = sorted(
        (j for j in range(units) if counts[j] < threshold),
        key=lambda j: (counts[j], -hashes[j], j),
    )
    removed = 0
    for taken, j in enumerate(candidates):
        removed += counts[j]
        if removed > removable or (units - taken - 1) * per_unit < nnz_before:
            break
        out[j] = True
    return out
