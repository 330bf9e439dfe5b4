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

import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from sparsecore import kernels as K
from sparsecore.errors import SparseCoreError
from sparsecore.kernels.launch import (
    Launch,
    TiledLaunch,
    plan_gather,
    plan_reduce,
    plan_sddmm,
    plan_tiled,
)
from sparsecore.kernels.layout import (
    ConvLayout,
    Geometry,
    LinearLayout,
    RowSet,
    Tiling,
    conv_layout,
    linear_layout,
    place_output_grad,
)
from sparsecore.kernels.structures import ConvCSR, LinearCSR

from .sparse_functions import ConvLayerState, LinearLayerState

__all__ = [
    "CONV_ALGORITHMS",
    "CudaSparseConv2dFunction",
    "CudaSparseLinearFunction",
    "DeviceRowSet",
    "cuda_supported",
    "set_conv_algorithm",
    "sparse_conv2d",
    "sparse_linear",
]

CUDA_DTYPES = (torch.float32,)

#: Convolution kernels: "gather" (gather.cu, reads the input through L1/L2), "tiled" (tiled.cu,
#: stages input bands in shared memory; groups == 1 only, others fall back to gather) or "auto"
#: (the one measured faster: gather, 2.5-8x ahead of tiled on H200, docs/kernels-gpu.md).
CONV_ALGORITHMS = ("auto", "gather", "tiled")
_conv_algorithm = os.environ.get("SPARSECORE_CUDA_CONV", "auto")


def set_conv_algorithm(name: str) -> str:
    """Choose the convolution kernel (see ``CONV_ALGORITHMS``); returns the previous choice."""
    global _conv_algorithm
    if name not in CONV_ALGORITHMS:
        raise SparseCoreError(f"conv algorithm must be one of {CONV_ALGORITHMS}, got {name!r}")
    previous, _conv_algorithm = _conv_algorithm, name
    return previous


def _use_tiled() -> bool:
    return _conv_algorithm == "tiled"


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
    """A :class:`RowSet` on one GPU: torch tensors (they own the memory) and their addresses."""

    rows: int
    nnz: int
    tensors: dict[str, torch.Tensor]
    ptrs: dict[str, Any]

    @classmethod
    def upload(cls, rowset: RowSet, device: torch.device) -> DeviceRowSet:
        # An empty layer still launches (its outputs are the bias): give every array at least
        # one element so no launch sees a null buffer; the kernels never read past indptr.
        tensors = {}
        for name, a in rowset.arrays().items():
            host = np.ascontiguousarray(a if a.size else np.zeros(1, a.dtype))
            if host.dtype == np.uint32:
                host = host.view(np.int32)  # same bits; the kernel reads them as unsigned
            tensors[name] = torch.from_numpy(host).to(device)
        ptrs = {name: K.pointer(t.data_ptr()) for name, t in tensors.items()}
        return cls(rows=rowset.rows, nnz=rowset.nnz, tensors=tensors, ptrs=ptrs)


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


@dataclass(frozen=True)
class _Launcher:
    """Launches on PyTorch's current stream of one device (captured once per forward/backward)."""

    device: int
    stream: Any

    @classmethod
    def current(cls, device: torch.device) -> _Launcher:
        index = device.index if device.index is not None else torch.cuda.current_device()
        ptr = torch.cuda.current_stream(device).cuda_stream
        return cls(index, K.external_stream(ptr, index))

    def __call__(self, plan: Launch, args: tuple[Any, ...]) -> None:
        import cupy

        if cupy.cuda.runtime.getDevice() == self.device:
            K.launch(plan, args, self.stream, self.device)
        else:
            with cupy.cuda.Device(self.device):
                K.launch(plan, args, self.stream, self.device)


def _ptr(t: torch.Tensor) -> Any:
    """Address of a contiguous tensor as a kernel argument (no copy: the kernel reads it there)."""
    return K.pointer(t.data_ptr())


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _i64(v: int) -> np.int64:
    return np.int64(v)


def _gather(
    run: _Launcher,
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
    v = rows.ptrs
    args = (
        _ptr(x),
        _ptr(weight),
        v["wflat"],
        v["offsets"],
        _i32(geom.off_scale),
        v["indptr"],
        v["row_order"],
        _ptr(bias) if bias is not None else _ptr(weight),
        _i32(1 if bias is not None else 0),
        _ptr(out),
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
    run(plan, args)


def _conv_gather(
    run: _Launcher,
    x: torch.Tensor,
    weight: torch.Tensor,
    rows: DeviceRowSet,
    geom: Geometry,
    tiling: Tiling | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """A convolution product: the tiled kernel where it applies and is chosen, else gather."""
    plan = plan_tiled(geom, tiling) if tiling is not None and _use_tiled() else None
    if plan is None or "packed" not in rows.ptrs:
        _gather(run, x, weight, rows, geom, bias, out)
        return
    _tiled(run, x, weight, rows, geom, tiling, plan, bias, out)


def _tiled(
    run: _Launcher,
    x: torch.Tensor,
    weight: torch.Tensor,
    rows: DeviceRowSet,
    geom: Geometry,
    tiling: Tiling | None,
    plan: TiledLaunch,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    assert tiling is not None
    v = rows.ptrs
    args = (
        _ptr(x),
        _ptr(weight),
        v["wflat"],
        v["packed"],
        v["indptr"],
        v["row_order"],
        _ptr(bias) if bias is not None else _ptr(weight),
        _i32(1 if bias is not None else 0),
        _ptr(out),
        _i32(geom.n_batch),
        _i32(geom.rows),
        _i32(tiling.channels),
        _i32(tiling.plane_h * tiling.plane_w),
        _i32(tiling.plane_h),
        _i32(tiling.plane_w),
        _i64(geom.in_batch_stride),
        _i32(geom.P),
        _i32(geom.Q),
        _i32(tiling.sh),
        _i32(tiling.sw),
        _i32(plan.NB),
        _i32(plan.PB),
        _i32(plan.HB),
        _i32(plan.CH),
        _i32(plan.p_tiles),
    )
    run(plan, args)


def _sddmm(
    run: _Launcher,
    x: torch.Tensor,
    dy: torch.Tensor,
    rows: DeviceRowSet,
    geom: Geometry,
    weight: torch.Tensor,
) -> torch.Tensor:
    """Dense weight gradient, zero off the mask, on the mask by SDDMM + ordered reduction."""
    dw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if rows.nnz == 0 or geom.positions == 0:
        return dw
    plan = plan_sddmm(geom, _aligned(x, dy))
    partial = torch.empty((plan.chunks, rows.nnz), dtype=torch.float32, device=weight.device)
    v = rows.ptrs
    args = (
        _ptr(x),
        _ptr(dy),
        v["offsets"],
        _i32(geom.off_scale),
        v["indptr"],
        v["row_order"],
        _ptr(partial),
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
    run(plan, args)
    reduce_args = (_ptr(partial), _i32(plan.chunks), _i32(rows.nnz), v["wflat"], _ptr(dw))
    run(plan_reduce(rows.nnz), reduce_args)
    return dw


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().contiguous()


def _check_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str
) -> None:
    if bias is not None and (bias.dtype != weight.dtype or bias.device != weight.device):
        raise SparseCoreError(
            f"layer {name!r}: bias must match the weight ({weight.dtype} on {weight.device}), "
            f"got {bias.dtype} on {bias.device}"
        )
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
        _check_inputs(x, weight, bias, state.name)
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
            run = _Launcher.current(x.device)
            _gather(run, xt, w, dev.forward, layout.forward_geometry(batch), _bias(bias), yt)
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
        run = _Launcher.current(dy.device)
        if ctx.needs_input_grad[0]:
            dxt = torch.empty((n_in, batch), dtype=dy.dtype, device=dy.device)
            if batch:
                _gather(run, dyt, w, dev.backward, layout.input_grad_geometry(batch), None, dxt)
            state.calls["input_grad"] += 1
            dx = dxt.t().reshape(*ctx.lead, n_in)
        if ctx.needs_input_grad[1]:
            if ctx.dense or batch == 0:
                dw = dyt @ xt.t()
                state.calls["weight_grad_dense"] += 1
            else:
                dw = _sddmm(run, xt, dyt, dev.forward, layout.forward_geometry(batch), w)
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
        _check_inputs(x, weight, bias, state.name)
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
        run = _Launcher.current(x.device)
        _conv_gather(
            run,
            xpad,
            w,
            dev.forward,
            layout.forward_geometry(n),
            layout.forward_tiling(),
            _bias(bias),
            y,
        )
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
        run = _Launcher.current(dy.device)
        if ctx.needs_input_grad[0]:
            buf = _placed_grad(dy, layout)
            dx = torch.empty((n, csr.in_channels, *csr.input_hw), dtype=dy.dtype, device=dy.device)
            _conv_gather(
                run,
                buf,
                w,
                dev.backward,
                layout.input_grad_geometry(n),
                layout.input_grad_tiling(),
                None,
                dx,
            )
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
                dw = _sddmm(run, xpad, dy, dev.forward, layout.forward_geometry(n), w)
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
