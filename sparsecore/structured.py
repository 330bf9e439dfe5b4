"""Unit ablation (``ablate_below``): the structured option that empties whole units and channels.

Unstructured sparse momentum spreads a layer's weights over most of its output units, so channel
compaction (:mod:`sparsecore.compaction`) finds little to remove. With ``ablate_below = a > 0``,
every mask update ablates the units that pruning has left with a small fan-in, and the weights
they held go back into the regrowth pool, so the layer's budget concentrates on fewer units:

1. After pruning, ``c_j`` is the active count of output unit ``j`` and ``t = a * kept / live``
   (``kept`` the layer's active count, ``live`` its units with ``c_j > 0``): a fraction of the mean
   fan-in of the units that still have weights. Candidates are the units with ``c_j < t``
   (empty units included); none when the layer has no active weight left.
2. Candidates are ablated in ascending ``c_j``, ties by the hash of the unit index (larger first,
   the engine's position hash with the unit index as position), then lower index, for as long as
   (i) the weights they hold, added to the ``r`` pruned already, stay within what ``min_density``
   lets the layer lose, and (ii) the units left hold at least the ``nnz`` positions the layer had
   before the update. The first candidate that would break either stops the ablation (a prefix).
3. An ablated unit's active weights are pruned (they count in ``r_l`` and in the pool ``R``), and
   none of its positions may be grown at this update: not by the growth mode, not by
   ``revive_dead_units``. Its capacity is 0, so ``c_l`` becomes the free slots of the layer's
   other units (and still at most ``floor(max_density * n_l) - kept_l``).

(ii) keeps every invariant: each layer can take back at least what it lost, so the capacities
hold the pool ``R`` and the total stays exactly N; with ``redistribution='none'`` every layer
regrows its own ``r_l``. A unit emptied by ablation is a candidate at the next update too (its
``c_j = 0``), so once ablated it stays empty unless (i) or (ii) stops the ablation. Decisions are
made on the host from per-unit counts, so every backend ablates the same units.

:class:`~sparsecore.SparseEngine` applies ``ablate_below`` to every layer but the last, whose
units are usually the network's outputs; :func:`sparsecore.update` takes one value per layer.
"""

from __future__ import annotations

import numpy as np

from .hashing import HashKey, position_hash

__all__ = ["ablated_units"]


def ablated_units(
    active: np.ndarray,
    *,
    ablate_below: float,
    per_unit: int,
    nnz_before: int,
    removable: int,
    key: HashKey,
) -> np.ndarray:
    """Which output units the update ablates (a host boolean array, one entry per unit).

    ``active``: active count per unit after pruning; ``per_unit``: positions per unit;
    ``nnz_before``: the layer's active count before the update; ``removable``: how many more
    weights the layer may lose after pruning (``min_density``); ``key``: this update's and
    layer's hash key. The rule is the module docstring's.
    """
    counts = np.asarray(active, dtype=np.int64)
    units = counts.size
    out = np.zeros(units, dtype=bool)
    kept = int(counts.sum())
    if ablate_below <= 0 or kept == 0:
        return out
    live = int(np.count_nonzero(counts))
    threshold = ablate_below * kept / live
    candidates = np.flatnonzero(counts < threshold)
    if candidates.size == 0:
        return out
    tie = position_hash(key, candidates).astype(np.int64)
    # lexsort: the last key is the primary one: fewest weights, then larger hash, then lower index
    order = candidates[np.lexsort((candidates, -tie, counts[candidates]))]
    removed = 0
    for taken, j in enumerate(order):
        removed += int(counts[j])
        if removed > removable or (units - taken - 1) * per_unit < nnz_before:
            break
        out[j] = True
    return out
