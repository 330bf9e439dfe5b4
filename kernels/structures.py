"""Sparse index structures shared by the CPU (Numba) and GPU (CUDA) kernels.

A structure is built on the host from a boolean weight mask and is rebuilt only when the mask
changes. Weight *values* are never stored here: each step the kernels gather them with
``values = W.reshape(-1)[flat]`` (cheap), and a weight gradient computed on the mask is scattered
back with ``dW.reshape(-1)[flat] = dvalues``. Every index array is C-contiguous; positions inside
a layer are int32 (checked not to overflow), ``flat`` is int64.

Linear layers (``LinearCSR``) use PyTorch's layout: weight ``W`` of shape ``(out, in)``, one CSR
row per output unit. The transposed structure (one row per input feature) serves the input
gradient ``dX = dY W`` without atomics.

Conv2d layers (``ConvCSR``) use a CSR per output channel whose column index is the offset of the
tap in the zero-padded input of the output channel's group ("direct sparse convolution"), so no
im2col matrix is built. For output pixel ``(p, q)`` of output channel ``o`` in group ``g``::

    y[n, o, p, q] = sum_k values[k] * xpad[n, g*Cg:(g+1)*Cg].reshape(-1)[
        offsets[k] + p*stride_h*Wp + q*stride_w]       for k in indptr[o]:indptr[o+1]

The same offsets serve the input gradient (scatter ``values[k] * dy[n, o, p, q]`` into a padded
gradient buffer at the same position) and the weight gradient (``dvalues[k]`` is the sum over
``n, p, q`` of ``dy[n, o, p, q]`` times that same input element). For kernels that prefer a gather
form of the input gradient (one thread per input element, no atomics) the module also keeps the
decomposed taps (``chan``, ``tap_r``, ``tap_s``) and a transposed structure grouped by global
input channel (``t_indptr``, ``t_out``, ``t_perm``, ``t_row_order``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "ConvCSR",
    "LinearCSR",
    "build_conv_csr",
    "build_linear_csr",
    "conv_output_hw",
]

_INT32_MAX = np.iinfo(np.int32).max

IntArray = npt.NDArray[np.int32]
LongArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class LinearCSR:
    """CSR of a linear layer's mask, weight shape ``(out_features, in_features)``.

    Attributes:
        shape: ``(out, in)``.
        nnz: number of active weights.
        indptr: int32[out+1]; row ``o`` holds entries ``indptr[o]:indptr[o+1]``.
        indices: int32[nnz]; input feature of each entry, ascending inside a row.
        rows: int32[nnz]; output row of each entry (for one-thread-per-entry SDDMM).
        flat: int64[nnz]; C-order position of each entry in ``W`` (``o * in + i``).
        row_order: int32[out]; rows by nnz descending, ties by lower row, so that work handed
            out in this order is balanced across threads ("row swizzle").
        t_indptr: int32[in+1]; transposed CSR (one row per input feature).
        t_indices: int32[nnz]; output row of each transposed entry, ascending inside a row.
        t_perm: int32[nnz]; position in the CSR value array of each transposed entry, so the
            transposed values are ``values[t_perm]``.
        t_row_order: int32[in]; input features by transposed nnz descending, ties by lower index.
    """

    shape: tuple[int, int]
    nnz: int
    indptr: IntArray
    indices: IntArray
    rows: IntArray
    flat: LongArray
    row_order: IntArray
    t_indptr: IntArray
    t_indices: IntArray
    t_perm: IntArray
    t_row_order: IntArray

    @property
    def density(self) -> float:
        """Fraction of active weights (0 for an empty-shaped layer)."""
        size = self.shape[0] * self.shape[1]
        return self.nnz / size if size else 0.0


@dataclass(frozen=True, eq=False)
class ConvCSR:
    """Direct-convolution CSR of a Conv2d mask for one input spatial size.

    Weight shape ``(O, C // groups, kh, kw)`` (PyTorch OIHW). Group ``g = o // (O // groups)``
    reads input channels ``g*Cg ... (g+1)*Cg - 1`` with ``Cg = C // groups``.

    Attributes:
        in_channels, out_channels, groups: ``C``, ``O``, ``groups``.
        kernel, stride, padding, dilation: ``(h, w)`` pairs.
        input_hw: ``(H, W)`` of the unpadded input.
        padded_hw: ``(Hp, Wp) = (H + 2*pad_h, W + 2*pad_w)``.
        output_hw: ``(Ho, Wo)``.
        nnz: number of active weights.
        indptr: int32[O+1]; output channel ``o`` holds entries ``indptr[o]:indptr[o+1]``,
            ordered by C-order position inside the channel (c, then r, then s).
        flat: int64[nnz]; C-order position of each entry in ``W``.
        offsets: int32[nnz]; ``c_local*Hp*Wp + r*dil_h*Wp + s*dil_w``, the offset of the tap in
            the padded input of the group.
        chan: int32[nnz]; local input channel ``c_local`` of each entry.
        tap_r, tap_s: int32[nnz]; kernel row ``r`` and column ``s`` of each entry.
        row_order: int32[O]; output channels by nnz descending, ties by lower channel.
        t_indptr: int32[C+1]; transposed structure, one row per *global* input channel.
        t_out: int32[nnz]; output channel of each transposed entry (ascending, then r, s).
        t_perm: int32[nnz]; position in the CSR value array of each transposed entry.
        t_row_order: int32[C]; input channels by transposed nnz descending, ties by lower index.
    """

    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    input_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    output_hw: tuple[int, int]
    nnz: int
    indptr: IntArray
    flat: LongArray
    offsets: IntArray
    chan: IntArray
    tap_r: IntArray
    tap_s: IntArray
    row_order: IntArray
    t_indptr: IntArray
    t_out: IntArray
    t_perm: IntArray
    t_row_order: IntArray

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """``(O, C // groups, kh, kw)``."""
        return (
            self.out_channels,
            self.in_channels // self.groups,
            self.kernel[0],
            self.kernel[1],
        )

    @property
    def density(self) -> float:
        """Fraction of active weights."""
        o, cg, kh, kw = self.weight_shape
        size = o * cg * kh * kw
        return self.nnz / size if size else 0.0


def _check_mask(mask: object, ndim: int, name: str) -> npt.NDArray[np.bool_]:
    """Return ``mask`` as a C-contiguous bool array, or raise naming the layer and the value."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(
            f"mask of layer {name!r} must be a numpy.ndarray, got {type(mask).__name__}"
        )
    if mask.dtype != np.bool_:
        raise TypeError(f"mask of layer {name!r} must have dtype bool, got {mask.dtype}")
    if mask.ndim != ndim:
        raise ValueError(
            f"mask of layer {name!r} must have {ndim} dimensions, got shape {mask.shape}"
        )
    if mask.size > _INT32_MAX:
        raise ValueError(
            f"mask of layer {name!r} has {mask.size} positions; at most {_INT32_MAX} are supported"
        )
    return np.ascontiguousarray(mask)


def _order_by_count_desc(counts: npt.NDArray[np.int64]) -> IntArray:
    """Indices sorted by count descending, ties by lower index (a stable sort of -counts)."""
    return np.argsort(-counts, kind="stable").astype(np.int32)


def _indptr(counts: npt.NDArray[np.int64]) -> IntArray:
    ptr = np.zeros(counts.shape[0] + 1, dtype=np.int32)
    np.cumsum(counts, out=ptr[1:])
    return ptr


def build_linear_csr(mask: npt.NDArray[np.bool_], name: str = "linear") -> LinearCSR:
    """Build the CSR (and its transpose) of a linear layer's boolean mask ``(out, in)``.

    ``name`` only labels error messages.
    """
    m = _check_mask(mask, 2, name)
    n_out, n_in = m.shape
    flat = np.flatnonzero(m).astype(np.int64)
    nnz = int(flat.shape[0])
    rows64 = flat // n_in if n_in else flat
    cols64 = flat - rows64 * n_in
    row_counts = np.bincount(rows64, minlength=n_out).astype(np.int64)
    col_counts = np.bincount(cols64, minlength=n_in).astype(np.int64)
    rows = rows64.astype(np.int32)
    indices = cols64.astype(np.int32)
    # Stable sort by column keeps rows ascending inside each transposed row.
    t_perm = np.argsort(indices, kind="stable").astype(np.int32)
    return LinearCSR(
        shape=(int(n_out), int(n_in)),
        nnz=nnz,
        indptr=_indptr(row_counts),
        indices=indices,
        rows=rows,
        flat=flat,
        row_order=_order_by_count_desc(row_counts),
        t_indptr=_indptr(col_counts),
        t_indices=np.ascontiguousarray(rows[t_perm]),
        t_perm=t_perm,
        t_row_order=_order_by_count_desc(col_counts),
    )


def _pair(value: int | Sequence[int], what: str, name: str, minimum: int) -> tuple[int, int]:
    """Normalise an int or a pair of ints, each at least ``minimum``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{what} of layer {name!r} must be an int or a pair of ints, got {value!r}")
    if pair[0] < minimum or pair[1] < minimum:
        raise ValueError(f"{what} of layer {name!r} must be >= {minimum}, got {value!r}")
    return pair


def conv_output_hw(
    input_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """Output spatial size of a convolution (PyTorch's formula; may be <= 0 if invalid)."""
    out = []
    for i in range(2):
        span = dilation[i] * (kernel[i] - 1) + 1
        out.append((input_hw[i] + 2 * padding[i] - span) // stride[i] + 1)
    return (out[0], out[1])


def build_conv_csr(
    mask: npt.NDArray[np.bool_],
    input_hw: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    name: str = "conv",
) -> ConvCSR:
    """Build the direct-convolution CSR of a Conv2d boolean mask ``(O, C // groups, kh, kw)``.

    The structure depends on the input spatial size (through the padded row length), so callers
    cache one per ``input_hw``. ``name`` only labels error messages.
    """
    m = _check_mask(mask, 4, name)
    hw = _pair(input_hw, "input_hw", name, 1)
    st = _pair(stride, "stride", name, 1)
    pad = _pair(padding, "padding", name, 0)
    dil = _pair(dilation, "dilation", name, 1)
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups of layer {name!r} must be a positive int, got {groups!r}")
    groups = int(groups)
    n_out, cg, kh, kw = (int(d) for d in m.shape)
    if n_out % groups:
        raise ValueError(
            f"layer {name!r}: out_channels {n_out} is not divisible by groups {groups}"
        )
    if min(n_out, cg, kh, kw) < 1:
        raise ValueError(f"mask of layer {name!r} has an empty dimension: shape {m.shape}")
    out_hw = conv_output_hw(hw, (kh, kw), st, pad, dil)
    if out_hw[0] < 1 or out_hw[1] < 1:
        raise ValueError(
            f"layer {name!r}: input size {hw} is too small for kernel {(kh, kw)} with padding "
            f"{pad} and dilation {dil} (output size {out_hw})"
        )
    hp, wp = hw[0] + 2 * pad[0], hw[1] + 2 * pad[1]
    if cg * hp * wp > _INT32_MAX:
        raise ValueError(
            f"layer {name!r}: padded group input of {cg}x{hp}x{wp} elements exceeds int32 offsets"
        )

    flat = np.flatnonzero(m).astype(np.int64)
    nnz = int(flat.shape[0])
    per_out = cg * kh * kw
    o_idx = flat // per_out
    rem = flat - o_idx * per_out
    c_loc = rem // (kh * kw)
    rem = rem - c_loc * (kh * kw)
    r = rem // kw
    s = rem - r * kw
    offsets = c_loc * (hp * wp) + r * (dil[0] * wp) + s * dil[1]

    out_counts = np.bincount(o_idx, minlength=n_out).astype(np.int64)
    n_in = cg * groups
    g = o_idx // (n_out // groups)
    c_glob = g * cg + c_loc
    in_counts = np.bincount(c_glob, minlength=n_in).astype(np.int64)
    # Stable sort by global input channel keeps (o, r, s) ascending inside each transposed row.
    t_perm = np.argsort(c_glob, kind="stable").astype(np.int32)

    return ConvCSR(
        in_channels=n_in,
        out_channels=n_out,
        groups=groups,
        kernel=(kh, kw),
        stride=st,
        padding=pad,
        dilation=dil,
        input_hw=hw,
        padded_hw=(hp, wp),
        output_hw=out_hw,
        nnz=nnz,
        indptr=_indptr(out_counts),
        flat=flat,
        offsets=offsets.astype(np.int32),
        chan=c_loc.astype(np.int32),
        tap_r=r.astype(np.int32),
        tap_s=s.astype(np.int32),
        row_order=_order_by_count_desc(out_counts),
        t_indptr=_indptr(in_counts),
        t_out=np.ascontiguousarray(o_idx[t_perm].astype(np.int32)),
        t_perm=t_perm,
        t_row_order=_order_by_count_desc(in_counts),
    )
