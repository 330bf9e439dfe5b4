"""NumPy statement of what the CUDA kernels compute, on the same layouts and geometries.

The kernels cannot run without a GPU; these functions follow the same formulas entry by entry
(``gather.cu``, ``sddmm.cu``), so CPU tests check every host-built layout, offset and geometry
against PyTorch's dense convolution and matrix products. GPU tests then check the kernels
against PyTorch directly. Slow (a Python loop over stored entries): for tests only.
"""

from __future__ import annotations

import numpy as np

from .launch import TiledLaunch
from .layout import Geometry, RowSet, Tiling

__all__ = ["gather", "gather_tiled", "sddmm"]


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


def gather_tiled(
    x: np.ndarray,
    weight: np.ndarray,
    rowset: RowSet,
    geom: Geometry,
    tiling: Tiling,
    plan: TiledLaunch,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """What ``sc_conv_tiled_f32`` computes, block by block and stage by stage.

    Follows the kernel's tile and band arithmetic, the shared-memory layout (stale where the
    kernel leaves it unwritten: NaN here, so a read of it shows) and the packed entries.
    """
    assert rowset.packed is not None
    xf = np.ascontiguousarray(x).reshape(-1)
    wf = np.ascontiguousarray(weight).reshape(-1)
    y = np.full((geom.n_batch, geom.rows, geom.P, geom.Q), np.nan)
    P, Q = geom.P, geom.Q
    NB, PB, HB, CH = plan.NB, plan.PB, plan.HB, plan.CH
    plane = tiling.plane_h * tiling.plane_w
    seg_stride = HB * tiling.plane_w
    ch_stride = NB * seg_stride
    tile_pos = NB * PB * Q
    t = np.arange(tile_pos)
    nl, rem = t // (PB * Q), t % (PB * Q)
    pl, q = rem // Q, rem % Q
    soff = nl * seg_stride + pl * tiling.sh * tiling.plane_w + q * tiling.sw
    for bx in range(plan.grid[0]):
        for by in range(plan.grid[1]):
            n0 = (by // plan.p_tiles) * NB
            p0 = (by % plan.p_tiles) * PB
            n_valid = min(NB, geom.n_batch - n0)
            band_rows = min(HB, tiling.plane_h - p0 * tiling.sh)
            seg_len = band_rows * tiling.plane_w
            rows = [int(rowset.row_order[i]) for i in range(bx * 16, min(bx * 16 + 16, geom.rows))]
            cursor = {r: int(rowset.indptr[r]) for r in rows}
            acc = {r: np.zeros(tile_pos) for r in rows}
            base = n0 * geom.in_batch_stride + p0 * tiling.sh * tiling.plane_w
            for c0 in range(0, tiling.channels, CH):
                chs = min(CH, tiling.channels - c0)
                stage = np.full(CH * ch_stride, np.nan)
                for cs in range(chs):
                    for n in range(n_valid):
                        src = base + (c0 + cs) * plane + n * geom.in_batch_stride
                        dst = cs * ch_stride + n * seg_stride
                        stage[dst : dst + seg_len] = xf[src : src + seg_len]
                limit = (c0 + chs) << 16
                for r in rows:
                    while cursor[r] < int(rowset.indptr[r + 1]):
                        pk = int(rowset.packed[cursor[r]])
                        if pk >= limit:
                            break
                        v = float(wf[rowset.wflat[cursor[r]]])
                        acc[r] += v * stage[((pk >> 16) - c0) * ch_stride + (pk & 0xFFFF) + soff]
                        cursor[r] += 1
            valid = (nl < n_valid) & (p0 + pl < P)
            for r in rows:
                b = float(bias[r]) if bias is not None else 0.0
                y[n0 + nl[valid], r, p0 + pl[valid], q[valid]] = acc[r][valid] + b
    return y
