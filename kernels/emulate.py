"""NumPy statement of what the CUDA kernels compute, on the same layouts and geometries.

The kernels cannot run without a GPU; these functions follow the same formulas entry by entry
(``gather.cu``, ``sddmm.cu``), so CPU tests check every host-built layout, offset and geometry
against PyTorch's dense convolution and matrix products. GPU tests then check the kernels
against PyTorch directly. Slow (a Python loop over stored entries): for tests only.
"""

from __future__ import annotations

import numpy as np

from .layout import Geometry, RowSet

__all__ = ["gather", "sddmm"]


def _window(geom: Geometry) -> np.ndarray:
    """Element offset of position (n, p, q)'s window, without the group base: (N, P, Q)."""
    n = np.arange(geom.n_batch, dtype=np.int64)[:, None, None] * geom.in_batch_stride
    p = np.arange(geom.P, dtype=np.int64)[None, :, None] * geom.row_step
    q = np.arange(geom.Q, dtype=np.int64)[None, None, :] * geom.col_step
    return n + p + q


def gather(
    x: np.ndarray,
    weight: np.ndarray,
    rowset: RowSet,
    geom: Geometry,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """``y (n_batch, rows, P, Q)``: ``y[n, r, p, q] = bias[r] + sum_k w[wflat[k]] * x[...]``."""
    xf = np.ascontiguousarray(x).reshape(-1)
    wf = np.ascontiguousarray(weight).reshape(-1)
    window = _window(geom)
    y = np.zeros((geom.n_batch, geom.rows, geom.P, geom.Q), dtype=np.float64)
    for row in range(geom.rows):
        base = (row // geom.rows_per_group) * geom.in_group_stride
        for k in range(int(rowset.indptr[row]), int(rowset.indptr[row + 1])):
            off = base + int(rowset.offsets[k]) * geom.off_scale
            y[:, row] += float(wf[rowset.wflat[k]]) * xf[window + off]
        if bias is not None:
            y[:, row] += float(bias[row])
    return y


def sddmm(x: np.ndarray, dy: np.ndarray, rowset: RowSet, geom: Geometry, size: int) -> np.ndarray:
    """Dense weight gradient (flat, ``size`` elements) with ``dw[wflat[k]]`` for every entry.

    ``dw[wflat[k]] = sum over n, p, q of dy[n, row, p, q] * x[...]``; zero off the mask.
    """
    xf = np.ascontiguousarray(x).reshape(-1)
    g = np.ascontiguousarray(dy).reshape(geom.n_batch, geom.rows, geom.P, geom.Q)
    window = _window(geom)
    dw = np.zeros(size, dtype=np.float64)
    for row in range(geom.rows):
        base = (row // geom.rows_per_group) * geom.in_group_stride
        for k in range(int(rowset.indptr[row]), int(rowset.indptr[row + 1])):
            off = base + int(rowset.offsets[k]) * geom.off_scale
            dw[rowset.wflat[k]] = float(np.sum(g[:, row] * xf[window + off]))
    return dw
