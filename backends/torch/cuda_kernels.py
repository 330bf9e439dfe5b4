"""PyTorch autograd functions that run sparse linear and conv2d layers on the CUDA kernels.

They take the same layer states as the CPU functions (:mod:`sparsecore.torch.sparse_functions`:
the host structure is rebuilt there when the mask changes) and upload each new structure to the
layer's GPU once, in the layout of :mod:`sparsecore.kernels.layout`. Every step then launches the
kernels of :mod:`sparsecore.kernels` on PyTorch's current CUDA stream, with tensors handed to
CuPy by DLPack (no copies). The kernels read the weight through the structure's flat positions,
so a step gathers nothing.

Weight gradient: on the mask only (SDDMM, deterministic) outside the window before a mask
update; inside it (``state.dense_weight_grad``) the full dense gradient through cuDNN / cuBLAS,
because sparse momentum needs momentum at inactive positions to choose what to regrow.

Only float32 runs on the kernels; :func:`cuda_supported` says whether an input can.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
from sparsecore.kernels.launch import plan_gather, plan_reduce, plan_sddmm
from sparsecore.kernels.layout import (
    ConvLayout,
    Geometry,
    LinearLayout,
    RowSet,
    conv_layout,
    linear_layout,
    place_output_grad,
)

import torch
from sparsecore import kernels as K
from sparsecore.errors import SparseCoreError
from sparsecore.structures import ConvCSR, LinearCSR
from torch.nn import functional as F

from .sparse_functions import ConvLayerState, LinearLayerState

__all__ = [
    "CudaSparseConv2dFunction",
    "CudaSparseLinearFunction",
    "DeviceRowSet",
    "cuda_supported",
    "sparse_conv2d",
    "sparse_linear",
]

CUDA_DTYPES = (torch.float32,)


def cuda_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True if this input and weight can run on the CUDA kernels (float32, one CUDA device)."""
    return (
        x.is_cuda
        and weight.is_cuda
        and x.device == weight.device
        and x.dtype in CUDA_DTYPES
        and weight.dtype == x.dtype
        and K.cuda_available()
    )


@dataclass(eq=False)
class DeviceRowSet:
    """A :class:`RowSet` on one GPU: torch tensors (own the memory) and CuPy views of them."""

    rows: int
    nnz: int
    tensors: dict[str, torch.Tensor]
    views: dict[str, Any]

    @classmethod
    def upload(cls, rowset: RowSet, device: torch.device) -> DeviceRowSet:
        # An empty layer still launches (its outputs are the bias): give every array at least
        # one element so no zero-size buffer crosses DLPack; the kernels never read past indptr.
        tensors = {
            name: torch.from_numpy(np.ascontiguousarray(a if a.size else np.zeros(1, a.dtype))).to(
                device
            )
            for name, a in rowset.arrays().items()
        }
        with _torch_stream(device):
            views = {name: K.as_cupy(t) for name, t in tensors.items()}
        return cls(rows=rowset.rows, nnz=rowset.nnz, tensors=tensors, views=views)


@dataclass(eq=False)
class _DeviceLayout:
    layout: LinearLayout | ConvLayout
    forward: DeviceRowSet
    backward: DeviceRowSet


# Device copies live as long as the host structure they were made from (a new mask builds a
# new structure, so stale uploads are dropped with the old one).
_uploads: weakref.WeakKeyDictionary[Any, dict[torch.device, _DeviceLayout]] = (
    weakref.WeakKeyDictionary()
)


def _device_layout(csr: LinearCSR | ConvCSR, device: torch.device, name: str) -> _DeviceLayout:
    per_device = _uploads.setdefault(csr, {})
    found = per_device.get(device)
    if found is None:
        layout: LinearLayout | ConvLayout
        if isinstance(csr, LinearCSR):
            layout = linear_layout(csr)
        else:
            layout = conv_layout(csr, name)
        found = _DeviceLayout(
            layout,
            DeviceRowSet.upload(layout.forward, device),
            DeviceRowSet.upload(layout.backward, device),
        )
        per_device[device] = found
    return found


class _torch_stream:
    """Context: CuPy's current stream is PyTorch's current stream on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream: Any = None

    def __enter__(self) -> Any:
        import cupy

        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._device_ctx = cupy.cuda.Device(index)
        self._device_ctx.__enter__()
        ptr = torch.cuda.current_stream(self.device).cuda_stream
        self._stream = K.external_stream(ptr)
        self._stream.__enter__()
        return self._stream

    def __exit__(self, *exc: object) -> None:
        self._stream.__exit__(*exc)
        self._device_ctx.__exit__(*exc)


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _i64(v: int) -> np.int64:
    return np.int64(v)


def _gather(
    x: torch.Tensor,
    weight: torch.Tensor,
    rows: DeviceRowSet,
    geom: Geometry,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """``out (n_batch, rows, P, Q)`` = the gather product (gather.cu) on the current stream."""
    if geom.positions == 0:
        return
    plan = plan_gather(geom, _aligned(x, out))
    v = rows.views
    b = bias.detach() if bias is not None else weight
    args = (
        K.as_cupy(x),
        K.as_cupy(weight),
        v["wflat"],
        v["offsets"],
        _i32(geom.off_scale),
        v["indptr"],
        v["row_order"],
        K.as_cupy(b),
        _i32(1 if bias is not None else 0),
        K.as_cupy(out),
        _i32(geom.n_batch),
        _i32(geom.rows),
        _i32(geom.rows_per_group),
        _i64(geom.in_batch_stride),
        _i64(geom.in_group_stride),
        _i32(geom.P),
        _i32(geom.Q),
        _i32(geom.row_step),
        _i32(geom.col_step),
    )
    K.launch(plan, args)


def _sddmm(
    x: torch.Tensor, dy: torch.Tensor, rows: DeviceRowSet, geom: Geometry, weight: torch.Tensor
) -> torch.Tensor:
    """Dense weight gradient, zero off the mask, on the mask by SDDMM + ordered reduction."""
    dw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if rows.nnz == 0 or geom.positions == 0:
        return dw
    plan = plan_sddmm(geom, _aligned(x, dy))
    partial = torch.empty((plan.chunks, rows.nnz), dtype=torch.float32, device=weight.device)
    v = rows.views
    args = (
        K.as_cupy(x),
        K.as_cupy(dy),
        v["offsets"],
        _i32(geom.off_scale),
        v["indptr"],
        v["row_order"],
        K.as_cupy(partial),
        _i32(rows.nnz),
        _i32(geom.n_batch),
        _i32(geom.rows),
        _i32(geom.rows_per_group),
        _i64(geom.in_batch_stride),
        _i64(geom.in_group_stride),
        _i32(geom.P),
        _i32(geom.Q),
        _i32(geom.row_step),
        _i32(geom.col_step),
    )
    K.launch(plan, args)
    reduce_args = (
        K.as_cupy(partial),
        _i32(plan.chunks),
        _i32(rows.nnz),
        v["wflat"],
        K.as_cupy(dw),
    )
    K.launch(plan_reduce(rows.nnz), reduce_args)
    return dw


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    if not cuda_supported(x, weight):
        raise SparseCoreError(
            f"layer {name!r}: the CUDA kernels take float32 CUDA tensors on one device with CuPy "
            f"installed; got input {x.dtype} on {x.device}, weight {weight.dtype} on "
            f"{weight.device}"
        )


class CudaSparseLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` sparse (the layer state's CSR); x of shape (..., in)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        state: LinearLayerState,
    ) -> torch.Tensor:
        _check_inputs(x, weight, state.name)
        csr = state.ensure()
        n_out, n_in = csr.shape
        if x.shape[-1] != n_in:
            raise SparseCoreError(
                f"layer {state.name!r} expects {n_in} input features, got input of shape "
                f"{tuple(x.shape)}"
            )
        dev = _device_layout(csr, x.device, state.name)
        layout = dev.layout
        assert isinstance(layout, LinearLayout)
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, n_in)
        batch = int(x2.shape[0])
        xt = x2.t().contiguous()  # free when x arrives feature-major (a sparse layer's output)
        w = weight.detach().contiguous()
        yt = torch.empty((n_out, batch), dtype=x.dtype, device=x.device)
        if batch:
            with _torch_stream(x.device):
                _gather(xt, w, dev.forward, layout.forward_geometry(batch), bias, yt)
        state.calls["forward"] += 1
        ctx.state = state
        ctx.dev = dev
        ctx.dense = state.dense_weight_grad
        ctx.lead = lead
        ctx.has_bias = bias is not None
        ctx.save_for_backward(xt, w)
        return yt.t().reshape(*lead, n_out)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xt, w = ctx.saved_tensors
        state: LinearLayerState = ctx.state
        dev: _DeviceLayout = ctx.dev
        layout = dev.layout
        assert isinstance(layout, LinearLayout)
        n_out, n_in = layout.out_features, layout.in_features
        batch = int(xt.shape[1])
        dyt = dy.reshape(-1, n_out).t().contiguous()
        dx = dw = db = None
        with _torch_stream(dy.device):
            if ctx.needs_input_grad[0]:
                dxt = torch.empty((n_in, batch), dtype=dy.dtype, device=dy.device)
                if batch:
                    _gather(dyt, w, dev.backward, layout.input_grad_geometry(batch), None, dxt)
                state.calls["input_grad"] += 1
                dx = dxt.t().reshape(*ctx.lead, n_in)
            if ctx.needs_input_grad[1]:
                if ctx.dense or batch == 0:
                    dw = dyt @ xt.t()
                    state.calls["weight_grad_dense"] += 1
                else:
                    dw = _sddmm(xt, dyt, dev.forward, layout.forward_geometry(batch), w)
                    state.calls["weight_grad_sparse"] += 1
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dyt.sum(dim=1)
        return dx, dw, db, None


class CudaSparseConv2dFunction(torch.autograd.Function):
    """Direct sparse 2-D convolution (zero padding) of an NCHW input with the state's mask."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        state: ConvLayerState,
    ) -> torch.Tensor:
        _check_inputs(x, weight, state.name)
        unbatched = x.dim() == 3
        xd = x.detach()
        if unbatched:
            xd = xd.unsqueeze(0)
        if xd.dim() != 4:
            raise SparseCoreError(
                f"layer {state.name!r} expects an NCHW or CHW input, got shape {tuple(x.shape)}"
            )
        csr = state.ensure((int(xd.shape[2]), int(xd.shape[3])))
        if xd.shape[1] != csr.in_channels:
            raise SparseCoreError(
                f"layer {state.name!r} expects {csr.in_channels} input channels, got input of "
                f"shape {tuple(x.shape)}"
            )
        dev = _device_layout(csr, x.device, state.name)
        layout = dev.layout
        assert isinstance(layout, ConvLayout)
        ph, pw = csr.padding
        xpad = F.pad(xd, (pw, pw, ph, ph)) if ph or pw else xd
        xpad = xpad.contiguous()
        w = weight.detach().contiguous()
        n = int(xpad.shape[0])
        y = torch.empty((n, csr.out_channels, *csr.output_hw), dtype=x.dtype, device=x.device)
        with _torch_stream(x.device):
            _gather(xpad, w, dev.forward, layout.forward_geometry(n), bias, y)
        state.calls["forward"] += 1
        ctx.state = state
        ctx.dev = dev
        ctx.dense = state.dense_weight_grad
        ctx.unbatched = unbatched
        ctx.has_bias = bias is not None
        ctx.save_for_backward(xpad, w)
        return y.squeeze(0) if unbatched else y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xpad, w = ctx.saved_tensors
        state: ConvLayerState = ctx.state
        dev: _DeviceLayout = ctx.dev
        layout = dev.layout
        assert isinstance(layout, ConvLayout)
        csr = layout.csr
        if ctx.unbatched:
            dy = dy.unsqueeze(0)
        dy = dy.contiguous()
        n = int(dy.shape[0])
        dx = dw = db = None
        with _torch_stream(dy.device):
            if ctx.needs_input_grad[0]:
                buf = _placed_grad(dy, layout)
                dx = torch.empty(
                    (n, csr.in_channels, *csr.input_hw), dtype=dy.dtype, device=dy.device
                )
                _gather(buf, w, dev.backward, layout.input_grad_geometry(n), None, dx)
                state.calls["input_grad"] += 1
                if ctx.unbatched:
                    dx = dx.squeeze(0)
            if ctx.needs_input_grad[1]:
                if ctx.dense:
                    dw = torch.ops.aten.convolution_backward(
                        dy,
                        xpad,
                        w,
                        None,
                        list(csr.stride),
                        [0, 0],
                        list(csr.dilation),
                        False,
                        [0, 0],
                        csr.groups,
                        [False, True, False],
                    )[1]
                    state.calls["weight_grad_dense"] += 1
                else:
                    dw = _sddmm(xpad, dy, dev.forward, layout.forward_geometry(n), w)
                    state.calls["weight_grad_sparse"] += 1
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(dim=(0, 2, 3))
        return dx, dw, db, None


def _placed_grad(dy: torch.Tensor, layout: ConvLayout) -> torch.Tensor:
    """The output gradient in the input-gradient buffer (``layout.py``): one pad for stride 1."""
    gh, gw = layout.grad_h, layout.grad_w
    n, o, p, q = (int(s) for s in dy.shape)
    if gh.stride == 1 and gw.stride == 1 and gh.first == 0 and gw.first == 0:
        if gh.last == p - 1 and gw.last == q - 1:
            pads = (gw.start, gw.size - gw.start - q, gh.start, gh.size - gh.start - p)
            return F.pad(dy, pads).contiguous()
    buf = torch.zeros((n, o, gh.size, gw.size), dtype=dy.dtype, device=dy.device)
    place_output_grad(dy, buf, layout)
    return buf


def sparse_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: LinearLayerState
) -> torch.Tensor:
    """Sparse ``nn.Linear`` forward on the CUDA kernels (differentiable)."""
    out = CudaSparseLinearFunction.apply(x, weight, bias, state)
    assert isinstance(out, torch.Tensor)
    return out


def sparse_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: ConvLayerState
) -> torch.Tensor:
    """Sparse ``nn.Conv2d`` forward on the CUDA kernels (differentiable)."""
    out = CudaSparseConv2dFunction.apply(x, weight, bias, state)
    assert isinstance(out, torch.Tensor)
    return out
