"""Host-side layouts the CUDA kernels consume, built from :mod:`sparsecore.kernels.structures`.

Every kernel in this package computes one formulation (``gather.cu``): a sparse *row* is a list
of entries ``(wflat[k], offsets[k])``, and output position ``(n, p, q)`` of the row reads the
input element at ``n*in_batch_stride + g*in_group_stride + offsets[k]*off_scale + p*row_step +
q*col_step``. A :class:`RowSet` is such a list of rows (NumPy, uploaded once per mask change) and a
:class:`Geometry` says how positions map to input and output for one input size.

- Linear layer ``(out, in)``: activations are used *feature-major*, ``(in, batch)``; the forward
  rows are the CSR rows with ``offsets = indices`` and ``off_scale = batch``; the input gradient
  uses the transposed CSR the same way (rows = input features, entries = output units).
- Conv2d: the forward rows are the structure's per-output-channel CSR over the zero-padded
  input. The input gradient is the same gather over the output gradient placed in a zero buffer
  of ``(H + (kh-1)*dil_h, W + (kw-1)*dil_w)`` per channel (dilated by the stride, shifted by
  ``(kh-1)*dil_h - pad_h``): then ``dx[n, c, i, j] = sum w[o, c, r, s] *
  buf[n, o, i + (kh-1-r)*dil_h, j + (kw-1-s)*dil_w]``, a stride-1 gather with the kernel flipped,
  one row per input channel, no atomics.

Everything here is plain NumPy and Python so it is tested on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sparsecore.errors import SparseCoreError

from .structures import ConvCSR, LinearCSR

__all__ = [
    "ConvLayout",
    "Geometry",
    "GradPlacement",
    "LinearLayout",
    "RowSet",
    "Tiling",
    "conv_layout",
    "linear_layout",
]

_INT32_MAX = int(np.iinfo(np.int32).max)


@dataclass(frozen=True, eq=False)
class RowSet:
    """Sparse rows in the kernels' upload layout (all C-contiguous).

    Attributes:
        indptr: int32[rows+1]; row ``r`` holds entries ``indptr[r]:indptr[r+1]``.
        wflat: int64[nnz]; flat position of each entry's weight in the dense weight tensor (the
            kernels read the current weight through it, so no per-step gather is needed).
        offsets: int32[nnz]; input offset of each entry (multiplied by ``off_scale`` at launch).
        row_order: int32[rows]; rows by entry count descending (longest first, load balance).
        packed: uint32[nnz] or None; for the tiled convolution kernel (``tiled.cu``): the entry's
            input channel << 16 | its offset inside that channel's plane (None when a plane or
            the channel count does not fit in 16 bits).
    """

    indptr: npt.NDArray[np.int32]
    wflat: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int32]
    row_order: npt.NDArray[np.int32]
    packed: npt.NDArray[np.uint32] | None = None

    @property
    def rows(self) -> int:
        return int(self.indptr.shape[0]) - 1

    @property
    def nnz(self) -> int:
        return int(self.wflat.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The four arrays by name (what an upload copies to the device)."""
        arrays: dict[str, np.ndarray] = {
            "indptr": self.indptr,
            "wflat": self.wflat,
            "offsets": self.offsets,
            "row_order": self.row_order,
        }
        if self.packed is not None:
            arrays["packed"] = self.packed
        return arrays


@dataclass(frozen=True)
class Geometry:
    """How positions of a row map to the input and the output of one product.

    The output is ``(n_batch, rows, P, Q)`` C-contiguous; row ``r`` reads group
    ``r // rows_per_group`` of its input.
    """

    n_batch: int
    rows: int
    rows_per_group: int
    in_batch_stride: int
    in_group_stride: int
    P: int
    Q: int
    row_step: int
    col_step: int
    off_scale: int = 1

    @property
    def positions(self) -> int:
        """Output positions per row (``n_batch * P * Q``)."""
        return self.n_batch * self.P * self.Q

    def vector_ok(self) -> bool:
        """True if quads of 4 consecutive q can be read as aligned float4 (linear layers)."""
        return (
            self.col_step == 1
            and self.Q % 4 == 0
            and self.off_scale % 4 == 0
            and self.row_step % 4 == 0
            and self.in_batch_stride % 4 == 0
            and self.in_group_stride % 4 == 0
        )


@dataclass(frozen=True, eq=False)
class LinearLayout:
    """Forward and input-gradient rows of a linear layer ``(out, in)``."""

    out_features: int
    in_features: int
    forward: RowSet
    backward: RowSet

    @property
    def nnz(self) -> int:
        return self.forward.nnz

    def forward_geometry(self, batch: int) -> Geometry:
        """``y^T (out, batch) = W x^T`` over ``x^T`` of shape ``(in, batch)``."""
        _check_batch(batch, self.in_features, "linear")
        return Geometry(
            n_batch=1,
            rows=self.out_features,
            rows_per_group=max(self.out_features, 1),
            in_batch_stride=self.in_features * batch,
            in_group_stride=0,
            P=1,
            Q=batch,
            row_step=0,
            col_step=1,
            off_scale=batch,
        )

    def input_grad_geometry(self, batch: int) -> Geometry:
        """``dx^T (in, batch) = W^T dy^T`` over ``dy^T`` of shape ``(out, batch)``."""
        _check_batch(batch, self.out_features, "linear")
        return Geometry(
            n_batch=1,
            rows=self.in_features,
            rows_per_group=max(self.in_features, 1),
            in_batch_stride=self.out_features * batch,
            in_group_stride=0,
            P=1,
            Q=batch,
            row_step=0,
            col_step=1,
            off_scale=batch,
        )


def _check_batch(batch: int, features: int, name: str) -> None:
    if batch < 1:
        raise SparseCoreError(f"layer {name!r}: batch size must be >= 1, got {batch}")
    if features * batch > _INT32_MAX:
        raise SparseCoreError(
            f"layer {name!r}: {features} features x batch {batch} exceeds the int32 offsets of "
            "the CUDA kernels; split the batch"
        )


def linear_layout(csr: LinearCSR) -> LinearLayout:
    """Upload layout of a linear layer from its structure (rebuilt when the mask changes)."""
    n_out, n_in = csr.shape
    forward = RowSet(
        indptr=np.ascontiguousarray(csr.indptr, dtype=np.int32),
        wflat=np.ascontiguousarray(csr.flat, dtype=np.int64),
        offsets=np.ascontiguousarray(csr.indices, dtype=np.int32),
        row_order=np.ascontiguousarray(csr.row_order, dtype=np.int32),
    )
    backward = RowSet(
        indptr=np.ascontiguousarray(csr.t_indptr, dtype=np.int32),
        wflat=np.ascontiguousarray(csr.flat[csr.t_perm], dtype=np.int64),
        offsets=np.ascontiguousarray(csr.t_indices, dtype=np.int32),
        row_order=np.ascontiguousarray(csr.t_row_order, dtype=np.int32),
    )
    return LinearLayout(n_out, n_in, forward, backward)


@dataclass(frozen=True)
class GradPlacement:
    """Where the output gradient goes in the input-gradient buffer, along one spatial axis.

    Output-gradient index ``a`` in ``[first, last]`` lands at buffer index ``start + (a - first)
    * stride``; indices outside that range fall outside the buffer (they cannot reach the
    unpadded input) and are dropped. ``last < first`` means none lands.
    """

    size: int  # buffer length along the axis: input size + (k - 1) * dilation
    first: int
    last: int
    start: int
    stride: int

    @property
    def count(self) -> int:
        return max(0, self.last - self.first + 1)


def _placement(
    input_len: int, output_len: int, k: int, stride: int, pad: int, dil: int
) -> GradPlacement:
    reach = (k - 1) * dil
    size = input_len + reach
    shift = reach - pad  # buffer index of output-gradient index 0
    first = 0 if shift >= 0 else -(shift // stride)  # ceil(-shift / stride)
    last = min(output_len - 1, (size - 1 - shift) // stride)
    return GradPlacement(
        size=size, first=first, last=last, start=shift + first * stride, stride=stride
    )


@dataclass(frozen=True)
class Tiling:
    """What the tiled convolution kernel needs beyond a :class:`Geometry` (groups == 1).

    The input is ``channels`` planes of ``plane_h x plane_w`` per image; an output row reads
    ``kernel_rows`` consecutive plane rows starting at ``p * sh``.
    """

    channels: int
    plane_h: int
    plane_w: int
    kernel_rows: int
    sh: int
    sw: int


@dataclass(frozen=True, eq=False)
class ConvLayout:
    """Forward and input-gradient rows of a Conv2d layer for one input size."""

    csr: ConvCSR
    forward: RowSet
    backward: RowSet
    grad_h: GradPlacement
    grad_w: GradPlacement

    @property
    def nnz(self) -> int:
        return self.forward.nnz

    def forward_geometry(self, n_batch: int) -> Geometry:
        """``y (N, O, P, Q)`` from the padded input ``(N, C, Hp, Wp)``."""
        c = self.csr
        hp, wp = c.padded_hw
        cg = c.in_channels // c.groups
        return Geometry(
            n_batch=n_batch,
            rows=c.out_channels,
            rows_per_group=c.out_channels // c.groups,
            in_batch_stride=c.in_channels * hp * wp,
            in_group_stride=cg * hp * wp,
            P=c.output_hw[0],
            Q=c.output_hw[1],
            row_step=c.stride[0] * wp,
            col_step=c.stride[1],
        )

    def forward_tiling(self) -> Tiling | None:
        """Tiled-kernel description of the forward pass (None: groups > 1 or no packed form)."""
        c = self.csr
        if c.groups != 1 or self.forward.packed is None:
            return None
        return Tiling(
            channels=c.in_channels,
            plane_h=c.padded_hw[0],
            plane_w=c.padded_hw[1],
            kernel_rows=(c.kernel[0] - 1) * c.dilation[0] + 1,
            sh=c.stride[0],
            sw=c.stride[1],
        )

    def input_grad_tiling(self) -> Tiling | None:
        """Tiled-kernel description of the input gradient (stride 1 over the gradient buffer)."""
        c = self.csr
        if c.groups != 1 or self.backward.packed is None:
            return None
        return Tiling(
            channels=c.out_channels,
            plane_h=self.grad_h.size,
            plane_w=self.grad_w.size,
            kernel_rows=(c.kernel[0] - 1) * c.dilation[0] + 1,
            sh=1,
            sw=1,
        )

    def input_grad_geometry(self, n_batch: int) -> Geometry:
        """``dx (N, C, H, W)`` from the placed output gradient ``(N, O, Hf, Wf)``."""
        c = self.csr
        hf, wf = self.grad_h.size, self.grad_w.size
        og = c.out_channels // c.groups
        return Geometry(
            n_batch=n_batch,
            rows=c.in_channels,
            rows_per_group=c.in_channels // c.groups,
            in_batch_stride=c.out_channels * hf * wf,
            in_group_stride=og * hf * wf,
            P=c.input_hw[0],
            Q=c.input_hw[1],
            row_step=wf,
            col_step=1,
        )


def _pack(chan: np.ndarray, local: np.ndarray, plane: int, channels: int) -> np.ndarray | None:
    if plane > 0xFFFF or channels > 0xFFFF:
        return None
    return np.ascontiguousarray((chan.astype(np.uint32) << 16) | local.astype(np.uint32))


def conv_layout(csr: ConvCSR, name: str = "conv") -> ConvLayout:
    """Upload layout of a Conv2d layer for the input size of ``csr`` (rebuilt per mask change)."""
    (kh, kw), (dh, dw) = csr.kernel, csr.dilation
    grad_h = _placement(csr.input_hw[0], csr.output_hw[0], kh, csr.stride[0], csr.padding[0], dh)
    grad_w = _placement(csr.input_hw[1], csr.output_hw[1], kw, csr.stride[1], csr.padding[1], dw)
    og = csr.out_channels // csr.groups
    plane = grad_h.size * grad_w.size
    if og * plane > _INT32_MAX:
        raise SparseCoreError(
            f"layer {name!r}: gradient buffer of {og}x{grad_h.size}x{grad_w.size} elements per "
            "group exceeds the int32 offsets of the CUDA kernels"
        )
    hp, wp = csr.padded_hw
    cg = csr.in_channels // csr.groups
    f_local = csr.offsets.astype(np.int64) - csr.chan.astype(np.int64) * (hp * wp)
    forward = RowSet(
        indptr=np.ascontiguousarray(csr.indptr, dtype=np.int32),
        wflat=np.ascontiguousarray(csr.flat, dtype=np.int64),
        offsets=np.ascontiguousarray(csr.offsets, dtype=np.int32),
        row_order=np.ascontiguousarray(csr.row_order, dtype=np.int32),
        packed=_pack(csr.chan, f_local, hp * wp, cg),
    )
    perm = csr.t_perm.astype(np.int64)
    o_local = csr.t_out.astype(np.int64) % og
    r = csr.tap_r[perm].astype(np.int64)
    s = csr.tap_s[perm].astype(np.int64)
    t_local = (kh - 1 - r) * dh * grad_w.size + (kw - 1 - s) * dw
    t_offsets = o_local * plane + t_local
    backward = RowSet(
        indptr=np.ascontiguousarray(csr.t_indptr, dtype=np.int32),
        wflat=np.ascontiguousarray(csr.flat[perm], dtype=np.int64),
        offsets=np.ascontiguousarray(t_offsets, dtype=np.int32),
        row_order=np.ascontiguousarray(csr.t_row_order, dtype=np.int32),
        packed=_pack(o_local, t_local, plane, og),
    )
    return ConvLayout(csr, forward, backward, grad_h, grad_w)


def place_output_grad(dy: object, buf: object, layout: ConvLayout) -> None:
    """Write the output gradient ``dy (N, O, P, Q)`` into the zeroed buffer ``buf (N, O, Hf, Wf)``.

    Works on any array type with NumPy-style slice assignment (NumPy, PyTorch, CuPy).
    """
    gh, gw = layout.grad_h, layout.grad_w
    if gh.count == 0 or gw.count == 0:
        return
    rows = slice(gh.start, gh.start + (gh.count - 1) * gh.stride + 1, gh.stride)
    cols = slice(gw.start, gw.start + (gw.count - 1) * gw.stride + 1, gw.stride)
    src = dy[:, :, gh.first : gh.last + 1, gw.first : gw.last + 1]  # type: ignore[index]
    buf[:, :, rows, cols] = src  # type: ignore[index]
