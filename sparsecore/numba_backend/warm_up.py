"""Compiling the kernels ahead of the first update."""

from __future__ import annotations

import numpy as np

from ..hashing import HashKey
from ..layers import Layer
from .backend import NumbaBackend
from .bits import SMALL_LAYER
from .selection import select_flat


def warm_up() -> None:
    """Compile (or load from the cache) the float32 kernels, e.g. before timing a first update."""
    backend = NumbaBackend()
    rng = np.random.default_rng(0)
    key = HashKey(0, 1, 0)
    for n in (64, SMALL_LAYER + 1):
        x = rng.standard_normal(n).astype(np.float32)
        mask = x > 0.5
        for largest in (False, True):
            backend.select(
                x, mask, 3, among_active=largest, largest=largest, magnitude=True, key=key
            )
        select_flat(
            x, mask, 3, among_active=True, largest=False, magnitude=True, key=key, sampled=False
        )
    backend.abs_sum(x, mask)
    backend.all_finite(x)
    backend.apply(x, mask, mask)
    backend.and_not(mask, mask)
    # The fused update's kernels, called as the engine calls them (one scan, then prune 3 and
    # regrow 3), without importing the engine.
    layer = Layer("warm_up", x * mask, mask, x[::-1].copy())
    scans = backend.fused_scan([layer], source="momentum")
    assert scans is not None  # float32 layers are the fused kernels' own
    backend.fused_prune_regrow([layer], [scans[0].nnz], [3], [3], [key])
