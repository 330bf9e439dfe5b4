"""Sparse CPU kernels (Numba, parallel over cores) for linear and 2-D convolution layers.

They consume the host-built structures of :mod:`sparsecore.kernels.structures`. Training needs three
products per layer: the forward pass, the input gradient and the weight gradient at the active
positions only (SDDMM on the mask). Every kernel takes the weight *values* in CSR order
(``W.reshape(-1)[csr.flat]``) and writes into caller-allocated, C-contiguous outputs.

Layouts and why:

- Linear kernels work *feature-major*: activations are ``(features, batch)`` arrays (the
  transpose of the usual ``(batch, features)``). Each stored weight then touches one contiguous
  batch row, so the inner loops are unit-stride and vectorise; the framework layer passes
  transposed views, which are free when activations already arrive feature-major.
- Convolution kernels work on NCHW inputs that the caller has zero-padded. With stride 1 the
  output of a channel is computed in a "wide" row layout of ``Wp`` columns (the padded width), so
  each stored tap is a single contiguous loop over ``(Ho - 1) * Wp + Wo`` elements; the columns
  past ``Wo`` are scratch and are never copied out. Other strides use plain (p, q) loops.

Parallel work is handed out by thread: thread ``t`` of ``T`` takes items ``t, t + T, ...`` of a
list sorted by work descending (``row_order``), which balances the load without atomics.

Compilation is lazy with ``cache=True``: one specialisation per dtype (float32 in training,
float64 for gradient checks) as long as callers pass C-contiguous arrays.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

__all__ = [
    "conv2d_forward",
    "conv2d_forward_batch_last",
    "conv2d_input_grad",
    "conv2d_input_grad_batch_last",
    "conv2d_weight_grad",
    "conv2d_weight_grad_batch_last",
    "pack_batch_last",
    "scatter_to_dense",
    "sddmm_feature_major",
    "spmm_feature_major",
    "unpack_batch_last",
]

_FASTMATH: set[str] = {"contract", "reassoc", "nsz"}
# Reassociation lets LLVM vectorise the dot products; contraction allows FMA.
_parallel_jit = numba.njit(parallel=True, nogil=True, cache=True, fastmath=_FASTMATH)


@_parallel_jit
def spmm_feature_major(
    indptr, indices, values, row_order, xt, yt, bias, n_threads
):  # pragma: no cover - jitted
    """``yt[r, :] = bias[r] + sum_k values[k] * xt[indices[k], :]`` over the entries of row r.

    With a layer's CSR this is the forward pass ``Y^T = W X^T (+ b)``; with its transposed
    structure (and ``values[t_perm]``) it is the input gradient ``dX^T = W^T dY^T``. ``bias``
    is an empty array for no bias. ``yt`` is overwritten. A row is accumulated in a private
    buffer, which lets LLVM keep it apart from the input (no aliasing checks in the loop).
    """
    n_rows = yt.shape[0]
    batch = yt.shape[1]
    has_bias = bias.shape[0] > 0
    n_threads = max(1, min(n_threads, n_rows))
    for t in prange(n_threads):
        acc = np.empty(batch, dtype=yt.dtype)
        for i in range(t, n_rows, n_threads):
            r = row_order[i]
            init = bias[r] if has_bias else 0.0
            for b in range(batch):
                acc[b] = init
            for k in range(indptr[r], indptr[r + 1]):
                v = values[k]
                src = xt[indices[k]]
                for b in range(batch):
                    acc[b] += v * src[b]
            out = yt[r]
            for b in range(batch):
                out[b] = acc[b]


@_parallel_jit
def scatter_to_dense(indptr, flat, dvalues, out_flat, n_threads):  # pragma: no cover - jitted
    """Dense gradient from gradient values on the mask: ``out_flat`` is zeroed and
    ``out_flat[flat[k]] = dvalues[k]``. Rows (``indptr``) own contiguous spans of ``out_flat``
    (C order), so threads zero and fill disjoint slices in one pass over memory."""
    n_rows = indptr.shape[0] - 1
    size = out_flat.shape[0]
    per_row = size // n_rows if n_rows > 0 else 0
    n_threads = max(1, min(n_threads, max(n_rows, 1)))
    for t in prange(n_threads):
        r0 = t * n_rows // n_threads
        r1 = (t + 1) * n_rows // n_threads
        lo = r0 * per_row
        hi = r1 * per_row if t < n_threads - 1 else size
        for i in range(lo, hi):
            out_flat[i] = 0.0
        for k in range(indptr[r0], indptr[r1]):
            out_flat[flat[k]] = dvalues[k]


@_parallel_jit
def sddmm_feature_major(
    indptr, indices, row_order, at, bt, out, n_threads
):  # pragma: no cover - jitted
    """``out[k] = dot(at[r, :], bt[indices[k], :])`` for every entry ``k`` of every row ``r``.

    With ``at = dY^T`` and ``bt = X^T`` this is the weight gradient of a linear layer on its
    mask, in CSR order (scatter it with ``dW.reshape(-1)[flat] = out``).
    """
    n_rows = at.shape[0]
    batch = at.shape[1]
    n_threads = max(1, min(n_threads, n_rows))
    for t in prange(n_threads):
        for i in range(t, n_rows, n_threads):
            r = row_order[i]
            a = at[r]
            for k in range(indptr[r], indptr[r + 1]):
                b_row = bt[indices[k]]
                out[k] = 0.0
                acc = out[k]  # zero of the array's dtype: float32 stays float32
                for b in range(batch):
                    acc += a[b] * b_row[b]
                out[k] = acc


@_parallel_jit
def conv2d_forward(
    indptr, offsets, values, xpad, y, bias, stride_h, stride_w, groups, n_threads
):  # pragma: no cover - jitted
    """Direct sparse convolution: ``y[n, o] = bias[o] + sum_k values[k] * xpad_group[...]``.

    ``xpad``: (N, C, Hp, Wp) zero-padded input, ``y``: (N, O, Ho, Wo) output, overwritten;
    ``bias`` is an empty array for no bias.
    """
    has_bias = bias.shape[0] > 0
    n_batch, n_out, ho, wo = y.shape
    n_in, hp, wp = xpad.shape[1], xpad.shape[2], xpad.shape[3]
    cg = n_in // groups
    opg = n_out // groups
    group_size = cg * hp * wp
    wide = (ho - 1) * wp + wo
    n_items = n_batch * n_out
    n_threads = max(1, min(n_threads, n_items))
    unit = stride_h == 1 and stride_w == 1
    for t in prange(n_threads):
        acc = np.empty(ho * wp, dtype=y.dtype)
        for item in range(t, n_items, n_threads):
            n = item // n_out
            o = item - n * n_out
            xg = xpad[n].reshape(-1)[(o // opg) * group_size : (o // opg + 1) * group_size]
            init = bias[o] if has_bias else 0.0
            if unit:
                for i in range(wide):
                    acc[i] = init
                for k in range(indptr[o], indptr[o + 1]):
                    v = values[k]
                    src = xg[offsets[k] : offsets[k] + wide]
                    for i in range(wide):
                        acc[i] += v * src[i]
                for p in range(ho):
                    for q in range(wo):
                        y[n, o, p, q] = acc[p * wp + q]
            else:
                out = y[n, o]
                for p in range(ho):
                    for q in range(wo):
                        out[p, q] = init
                for k in range(indptr[o], indptr[o + 1]):
                    v = values[k]
                    off = offsets[k]
                    for p in range(ho):
                        base = off + p * stride_h * wp
                        for q in range(wo):
                            out[p, q] += v * xg[base + q * stride_w]


@_parallel_jit
def conv2d_input_grad(
    indptr, offsets, values, dy, dxpad, stride_h, stride_w, groups, n_threads
):  # pragma: no cover - jitted
    """Input gradient of the direct sparse convolution, scattered into a padded buffer.

    ``dy``: (N, O, Ho, Wo); ``dxpad``: (N, C, Hp, Wp), overwritten; the caller crops the padding.
    Work is split by (sample, group) so that no two threads write the same element.
    """
    n_batch, n_out, ho, wo = dy.shape
    n_in, hp, wp = dxpad.shape[1], dxpad.shape[2], dxpad.shape[3]
    cg = n_in // groups
    opg = n_out // groups
    group_size = cg * hp * wp
    wide = (ho - 1) * wp + wo
    n_items = n_batch * groups
    n_threads = max(1, min(n_threads, n_items))
    unit = stride_h == 1 and stride_w == 1
    for t in prange(n_threads):
        gw = np.zeros(ho * wp, dtype=dy.dtype)
        for item in range(t, n_items, n_threads):
            n = item // groups
            g = item - n * groups
            dxg = dxpad[n].reshape(-1)[g * group_size : (g + 1) * group_size]
            for i in range(group_size):
                dxg[i] = 0.0
            for o in range(g * opg, (g + 1) * opg):
                if indptr[o] == indptr[o + 1]:
                    continue
                if unit:
                    # Wide copy of dy[n, o] whose scratch columns stay zero.
                    for p in range(ho):
                        for q in range(wo):
                            gw[p * wp + q] = dy[n, o, p, q]
                    for k in range(indptr[o], indptr[o + 1]):
                        v = values[k]
                        dst = dxg[offsets[k] : offsets[k] + wide]
                        for i in range(wide):
                            dst[i] += v * gw[i]
                else:
                    g_o = dy[n, o]
                    for k in range(indptr[o], indptr[o + 1]):
                        v = values[k]
                        off = offsets[k]
                        for p in range(ho):
                            base = off + p * stride_h * wp
                            for q in range(wo):
                                dxg[base + q * stride_w] += v * g_o[p, q]


@_parallel_jit
def conv2d_weight_grad(
    indptr, offsets, row_order, dy, xpad, out, stride_h, stride_w, groups, n_threads
):  # pragma: no cover - jitted
    """Weight gradient of the direct sparse convolution on the mask (CSR order), overwritten.

    ``out[k] = sum_{n, p, q} dy[n, o, p, q] * xpad_group[offsets[k] + p*sh*Wp + q*sw]``.
    Output channels are handed out by ``row_order`` so each thread owns whole channels.
    """
    n_batch, n_out, ho, wo = dy.shape
    n_in, hp, wp = xpad.shape[1], xpad.shape[2], xpad.shape[3]
    cg = n_in // groups
    opg = n_out // groups
    group_size = cg * hp * wp
    wide = (ho - 1) * wp + wo
    n_threads = max(1, min(n_threads, n_out))
    unit = stride_h == 1 and stride_w == 1
    for t in prange(n_threads):
        gw = np.zeros(ho * wp, dtype=dy.dtype)
        zero = np.zeros(1, dtype=out.dtype)  # accumulate in the array's dtype
        for i in range(t, n_out, n_threads):
            o = row_order[i]
            start, stop = indptr[o], indptr[o + 1]
            for k in range(start, stop):
                out[k] = 0.0
            if start == stop:
                continue
            g = o // opg
            for n in range(n_batch):
                xg = xpad[n].reshape(-1)[g * group_size : (g + 1) * group_size]
                if unit:
                    for p in range(ho):
                        for q in range(wo):
                            gw[p * wp + q] = dy[n, o, p, q]
                    for k in range(start, stop):
                        src = xg[offsets[k] : offsets[k] + wide]
                        acc = zero[0]
                        for j in range(wide):
                            acc += gw[j] * src[j]
                        out[k] += acc
                else:
                    g_o = dy[n, o]
                    for k in range(start, stop):
                        off = offsets[k]
                        acc = zero[0]
                        for p in range(ho):
                            base = off + p * stride_h * wp
                            for q in range(wo):
                                acc += g_o[p, q] * xg[base + q * stride_w]
                        out[k] += acc


# -- batch-last convolution kernels ---------------------------------------------------------
# For small feature maps the per-tap loops of the NCHW kernels are too short to vectorise.
# These kernels take the padded input as a (C*Hp*Wp, N) matrix (channel, row, column, batch:
# "batch-last") and produce the output as (O*Ho*Wo, N), so every inner loop runs over the batch,
# contiguous, whatever the feature-map size or stride. Tap k of output pixel (p, q) of channel o
# in group g reads row g*Cg*Hp*Wp + offsets[k] + p*stride_h*Wp + q*stride_w.


@_parallel_jit
def conv2d_forward_batch_last(
    indptr, offsets, values, row_order, x2, y2, bias, geometry, groups, n_threads
):  # pragma: no cover - jitted
    """Direct sparse convolution, batch-last. ``geometry = (Hp, Wp, Ho, Wo, sh, sw)``.

    ``x2``: (C*Hp*Wp, N) padded input; ``y2``: (O*Ho*Wo, N), overwritten. Parallel over output
    channels in ``row_order``; a channel's whole output is accumulated in a private buffer.
    """
    hp, wp, ho, wo, sh, sw = geometry
    n_out = indptr.shape[0] - 1
    batch = x2.shape[1]
    n_in = x2.shape[0] // (hp * wp)
    group_rows = (n_in // groups) * hp * wp
    opg = n_out // groups
    pix = ho * wo
    has_bias = bias.shape[0] > 0
    n_threads = max(1, min(n_threads, n_out))
    for t in prange(n_threads):
        acc = np.empty((pix, batch), dtype=y2.dtype)
        for i in range(t, n_out, n_threads):
            o = row_order[i]
            base_g = (o // opg) * group_rows
            init = bias[o] if has_bias else 0.0
            for j in range(pix):
                for b in range(batch):
                    acc[j, b] = init
            for k in range(indptr[o], indptr[o + 1]):
                v = values[k]
                off = base_g + offsets[k]
                for p in range(ho):
                    row0 = off + p * sh * wp
                    for q in range(wo):
                        src = x2[row0 + q * sw]
                        dst = acc[p * wo + q]
                        for b in range(batch):
                            dst[b] += v * src[b]
            out0 = o * pix
            for j in range(pix):
                out = y2[out0 + j]
                for b in range(batch):
                    out[b] = acc[j, b]


@_parallel_jit
def conv2d_input_grad_batch_last(
    t_indptr, t_out, t_perm, offsets, chan, values, dy2, dx2, geometry, n_threads
):  # pragma: no cover - jitted
    """Input gradient, batch-last: ``dx2`` (C*Hp*Wp, N) padded, overwritten; the caller crops.

    Gather form over the transposed structure: each input channel (handed out to threads) sums
    the contributions of its taps into a private plane, so no two threads write the same row.
    """
    hp, wp, ho, wo, sh, sw = geometry
    n_in = t_indptr.shape[0] - 1
    batch = dx2.shape[1]
    plane = hp * wp
    pix = ho * wo
    n_threads = max(1, min(n_threads, n_in))
    for t in prange(n_threads):
        acc = np.empty((plane, batch), dtype=dx2.dtype)
        for c in range(t, n_in, n_threads):
            for j in range(plane):
                for b in range(batch):
                    acc[j, b] = 0.0
            for e in range(t_indptr[c], t_indptr[c + 1]):
                k = t_perm[e]
                o = t_out[e]
                v = values[k]
                off = offsets[k] - chan[k] * plane  # tap offset inside the channel plane
                for p in range(ho):
                    row0 = off + p * sh * wp
                    for q in range(wo):
                        dst = acc[row0 + q * sw]
                        src = dy2[o * pix + p * wo + q]
                        for b in range(batch):
                            dst[b] += v * src[b]
            base = c * plane
            for j in range(plane):
                out = dx2[base + j]
                for b in range(batch):
                    out[b] = acc[j, b]


@_parallel_jit
def pack_batch_last(x, out2, pad_h, pad_w, n_threads):  # pragma: no cover - jitted
    """(N, C, H, W) -> (C*Hp*Wp, N) with a zero border: the batch-last padded input."""
    n_batch, n_ch, h, w = x.shape
    hp, wp = h + 2 * pad_h, w + 2 * pad_w
    n_threads = max(1, min(n_threads, n_ch))
    for t in prange(n_threads):
        for c in range(t, n_ch, n_threads):
            base = c * hp * wp
            for j in range(hp * wp):
                for n in range(n_batch):
                    out2[base + j, n] = 0.0
            for n in range(n_batch):
                src = x[n, c]
                for i in range(h):
                    row = base + (i + pad_h) * wp + pad_w
                    for jj in range(w):
                        out2[row + jj, n] = src[i, jj]


@_parallel_jit
def unpack_batch_last(x2, out, pad_h, pad_w, n_threads):  # pragma: no cover - jitted
    """(C*Hp*Wp, N) -> (N, C, H, W), dropping the border: inverse of :func:`pack_batch_last`."""
    n_batch, n_ch, h, w = out.shape
    hp, wp = h + 2 * pad_h, w + 2 * pad_w
    n_threads = max(1, min(n_threads, n_ch))
    for t in prange(n_threads):
        for c in range(t, n_ch, n_threads):
            base = c * hp * wp
            for n in range(n_batch):
                dst = out[n, c]
                for i in range(h):
                    row = base + (i + pad_h) * wp + pad_w
                    for jj in range(w):
                        dst[i, jj] = x2[row + jj, n]


@_parallel_jit
def conv2d_weight_grad_batch_last(
    indptr, offsets, row_order, dy2, x2, out, geometry, groups, n_threads
):  # pragma: no cover - jitted
    """Weight gradient on the mask, batch-last (CSR order), overwritten."""
    hp, wp, ho, wo, sh, sw = geometry
    n_out = indptr.shape[0] - 1
    batch = x2.shape[1]
    n_in = x2.shape[0] // (hp * wp)
    group_rows = (n_in // groups) * hp * wp
    opg = n_out // groups
    pix = ho * wo
    n_threads = max(1, min(n_threads, n_out))
    for t in prange(n_threads):
        # Lane-wise partial sums over the pixels, one horizontal sum per weight at the end.
        lanes = np.empty(batch, dtype=out.dtype)
        for i in range(t, n_out, n_threads):
            o = row_order[i]
            base_g = (o // opg) * group_rows
            for k in range(indptr[o], indptr[o + 1]):
                off = base_g + offsets[k]
                for b in range(batch):
                    lanes[b] = 0.0
                for p in range(ho):
                    row0 = off + p * sh * wp
                    for q in range(wo):
                        a = dy2[o * pix + p * wo + q]
                        src = x2[row0 + q * sw]
                        for b in range(batch):
                            lanes[b] += a[b] * src[b]
                out[k] = lanes.sum()
