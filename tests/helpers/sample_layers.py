"""Sample sparse layers for tests of the torch update paths (importance sums, sharding)."""

from __future__ import annotations

import numpy as np
import torch

import sparsecore as sc


def spread_layers(rng: np.random.Generator, dtype: torch.dtype) -> list[sc.Layer]:
    """Three layers of values spread over many binades (float16's range is narrow)."""
    spread = 8 if dtype == torch.float16 else 30
    out = []
    for i, shape in enumerate([(40, 33), (7, 5, 3, 3), (1, 9)]):
        mask = torch.from_numpy(rng.random(shape) < 0.3)
        w, p = (
            torch.from_numpy(
                rng.standard_normal(shape) * 2.0 ** rng.integers(-spread, spread, shape)
            )
            for _ in range(2)
        )
        out.append(sc.Layer(f"l{i}", (w * mask).to(dtype), mask, p.to(dtype)))
    return out
