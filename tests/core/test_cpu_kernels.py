"""The Numba kernels against plain NumPy on dense masked weights (no framework involved).

These are the numerical reference the CUDA kernels are compared with, so they are checked here
on their own, in both dtypes, on empty, sparse and full masks.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparsecore import cpu_kernels as K
from sparsecore.structures import build_conv_csr, build_linear_csr, conv_output_hw

NO_BIAS = {np.float32: np.empty(0, np.float32), np.float64: np.empty(0, np.float64)}


def _tol(dtype):
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == np.float64 else {"rtol": 1e-4, "atol": 1e-4}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("batch", "n_in", "n_out", "density"),
    [(1, 7, 5, 0.5), (9, 30, 20, 0.0), (16, 33, 17, 0.05), (5, 12, 9, 1.0), (0, 4, 3, 0.5)],
)
def test_linear_kernels(batch, n_in, n_out, density, dtype) -> None:
    rng = np.random.default_rng(batch + n_in)
    mask = rng.random((n_out, n_in)) < density
    w = (rng.standard_normal((n_out, n_in)) * mask).astype(dtype)
    bias = rng.standard_normal(n_out).astype(dtype)
    x = rng.standard_normal((batch, n_in)).astype(dtype)
    dy = rng.standard_normal((batch, n_out)).astype(dtype)
    csr = build_linear_csr(mask)
    values = w.reshape(-1)[csr.flat]
    xt, dyt = np.ascontiguousarray(x.T), np.ascontiguousarray(dy.T)

    yt = np.full((n_out, batch), np.nan, dtype)
    K.spmm_feature_major(csr.indptr, csr.indices, values, csr.row_order, xt, yt, bias, 2)
    np.testing.assert_allclose(yt.T, x @ w.T + bias, **_tol(dtype))

    dxt = np.full((n_in, batch), np.nan, dtype)
    K.spmm_feature_major(
        csr.t_indptr,
        csr.t_indices,
        values[csr.t_perm],
        csr.t_row_order,
        dyt,
        dxt,
        NO_BIAS[dtype],
        2,
    )
    np.testing.assert_allclose(dxt.T, dy @ w, **_tol(dtype))

    dv = np.full(csr.nnz, np.nan, dtype)
    K.sddmm_feature_major(csr.indptr, csr.indices, csr.row_order, dyt, xt, dv, 2)
    dense = np.full(n_out * n_in, np.nan, dtype)
    K.scatter_to_dense(csr.indptr, csr.flat, dv, dense, 2)
    np.testing.assert_allclose(dense.reshape(n_out, n_in), (dy.T @ x) * mask, **_tol(dtype))


def _conv_dense(x, w, stride, padding, dilation, groups):
    """Dense convolution by explicit loops over taps (NumPy), with the taps for the gradients."""
    n, _c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho, wo = conv_output_hw((h, wd), (kh, kw), stride, padding, dilation)
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    y = np.zeros((n, o, ho, wo), x.dtype)
    taps = []
    for oc in range(o):
        g = oc // (o // groups)
        for cl in range(cg):
            for r in range(kh):
                for s in range(kw):
                    rows = slice(
                        r * dilation[0], r * dilation[0] + stride[0] * (ho - 1) + 1, stride[0]
                    )
                    cols = slice(
                        s * dilation[1], s * dilation[1] + stride[1] * (wo - 1) + 1, stride[1]
                    )
                    taps.append((oc, g * cg + cl, cl, r, s, rows, cols))
                    y[:, oc] += w[oc, cl, r, s] * xp[:, g * cg + cl, rows, cols]
    return y, xp, taps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("n", "cg", "opg", "groups", "k", "stride", "padding", "dilation", "hw", "density"),
    [
        (2, 3, 4, 1, (3, 3), (1, 1), (1, 1), (1, 1), (6, 7), 0.3),
        (1, 2, 2, 2, (3, 2), (2, 1), (0, 2), (1, 2), (7, 6), 0.5),
        (3, 2, 3, 3, (1, 3), (1, 3), (2, 0), (2, 1), (5, 9), 1.0),
        (2, 4, 2, 1, (3, 3), (1, 1), (1, 1), (1, 1), (4, 4), 0.0),
    ],
)
@pytest.mark.parametrize("layout", ["nchw", "batch_last"])
def test_conv_kernels(n, cg, opg, groups, k, stride, padding, dilation, hw, density, dtype, layout):
    rng = np.random.default_rng(n + cg + opg)
    o, c = opg * groups, cg * groups
    mask = rng.random((o, cg, *k)) < density
    w = (rng.standard_normal(mask.shape) * mask).astype(dtype)
    bias = rng.standard_normal(o).astype(dtype)
    x = rng.standard_normal((n, c, *hw)).astype(dtype)
    y_ref, xp, taps = _conv_dense(x, w, stride, padding, dilation, groups)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dxp_ref = np.zeros_like(xp)
    dw_ref = np.zeros_like(w)
    for oc, ci, cl, r, s, rows, cols in taps:
        dxp_ref[:, ci, rows, cols] += w[oc, cl, r, s] * dy[:, oc]
        dw_ref[oc, cl, r, s] = np.sum(dy[:, oc] * xp[:, ci, rows, cols])

    csr = build_conv_csr(mask, hw, stride, padding, dilation, groups)
    values = w.reshape(-1)[csr.flat]
    hp, wp = csr.padded_hw
    ho, wo = csr.output_hw
    dv = np.full(csr.nnz, np.nan, dtype)
    if layout == "nchw":
        xpad = np.ascontiguousarray(xp)
        y = np.full(y_ref.shape, np.nan, dtype)
        K.conv2d_forward(csr.indptr, csr.offsets, values, xpad, y, bias, *stride, groups, 2)
        dxp = np.full(xp.shape, np.nan, dtype)
        K.conv2d_input_grad(csr.indptr, csr.offsets, values, dy, dxp, *stride, groups, 2)
        K.conv2d_weight_grad(
            csr.indptr, csr.offsets, csr.row_order, dy, xpad, dv, *stride, groups, 2
        )
        dxp_valid = dxp
    else:
        geometry = (hp, wp, ho, wo, *stride)
        x2 = np.full((c * hp * wp, n), np.nan, dtype)
        K.pack_batch_last(x, x2, padding[0], padding[1], 2)
        np.testing.assert_array_equal(x2, xp.transpose(1, 2, 3, 0).reshape(-1, n))
        y2 = np.full((o * ho * wo, n), np.nan, dtype)
        K.conv2d_forward_batch_last(
            csr.indptr, csr.offsets, values, csr.row_order, x2, y2, bias, geometry, groups, 2
        )
        y = y2.reshape(o, ho, wo, n).transpose(3, 0, 1, 2)
        dy2 = np.ascontiguousarray(dy.transpose(1, 2, 3, 0).reshape(-1, n))
        dx2 = np.full((c * hp * wp, n), np.nan, dtype)
        K.conv2d_input_grad_batch_last(
            csr.t_indptr,
            csr.t_out,
            csr.t_perm,
            csr.offsets,
            csr.chan,
            values,
            dy2,
            dx2,
            geometry,
            2,
        )
        dxp_valid = dx2.reshape(c, hp, wp, n).transpose(3, 0, 1, 2)
        dx = np.full(x.shape, np.nan, dtype)
        K.unpack_batch_last(dx2, dx, padding[0], padding[1], 2)
        ph, pw = padding
        np.testing.assert_array_equal(dx, dxp_valid[:, :, ph : ph + hw[0], pw : pw + hw[1]])
        K.conv2d_weight_grad_batch_last(
            csr.indptr, csr.offsets, csr.row_order, dy2, x2, dv, geometry, groups, 2
        )
    np.testing.assert_allclose(y, y_ref + bias[None, :, None, None], **_tol(dtype))
    ph, pw = padding
    inner = (slice(None), slice(None), slice(ph, ph + hw[0]), slice(pw, pw + hw[1]))
    np.testing.assert_allclose(dxp_valid[inner], dxp_ref[inner], **_tol(dtype))
    np.testing.assert_allclose(dv, dw_ref.reshape(-1)[csr.flat], **_tol(dtype))
