"""PyTorch autograd functions that run sparse linear and conv2d layers on the Numba CPU kernels.

Each function reads a *layer state* that holds the layer's sparse structure (rebuilt when its
mask changes) and a switch for the weight gradient:

- sparse weight gradient (the default outside the window before a mask update): only the active
  positions get a gradient, computed on the mask (SDDMM); the rest of ``weight.grad`` is zero;
- dense weight gradient (inside that window): the full dense gradient, computed by PyTorch,
  because sparse momentum reads momentum at *inactive* positions to choose what to regrow.

Gradients land in ``weight.grad`` / ``bias.grad`` as dense tensors of the usual shapes, so any
PyTorch optimizer works unchanged. The forward pass reads only the active weights; weights
outside the mask are zero anyway (the adapter keeps them so).

Threads: the Numba kernels run with as many threads as PyTorch's intra-op pool
(``torch.get_num_threads()``, capped by Numba's pool size). Both are called from the same Python
thread one after the other, so the two pools are never busy at the same time and the number of
running compute threads stays at that count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from sparsecore.kernels import cpu as K
from sparsecore.kernels.structures import ConvCSR, LinearCSR, build_conv_csr, build_linear_csr

from .threads import kernel_threads

__all__ = [
    "ConvLayerState",
    "LinearLayerState",
    "SparseConv2dFunction",
    "SparseLinearFunction",
    "kernel_threads",
]

SUPPORTED_DTYPES = (torch.float32, torch.float64)


@dataclass(eq=False)
class _LayerStateBase:
    """What the autograd functions of one layer share: mask, switch and call counts."""

    name: str
    mask: torch.Tensor
    dense_weight_grad: bool = True
    calls: Counter[str] = field(default_factory=Counter)
    rebuilds: int = 0
    _mask_version: int = -1
    _mask_copy: torch.Tensor | None = None

    def mask_numpy(self) -> np.ndarray:
        return self.mask.detach().to("cpu", torch.bool).contiguous().numpy()

    def mask_changed(self, full_compare: bool) -> bool:
        """True if the mask differs from the one the structures were built from.

        The tensor's version counter catches in-place edits at no cost on every forward; a full
        comparison (on ``refresh``) also catches edits made through ``.data``.
        """
        if self._mask_copy is None or self.mask._version != self._mask_version:
            return True
        if full_compare:
            return not torch.equal(self._mask_copy, self.mask.detach().cpu())
        return False

    def _remember_mask(self) -> None:
        self._mask_version = self.mask._version
        self._mask_copy = self.mask.detach().to("cpu", copy=True)
        self.rebuilds += 1

    def density(self) -> float:
        n = self.mask.numel()
        return float(self.mask.sum()) / n if n else 0.0


@dataclass(eq=False)
class LinearLayerState(_LayerStateBase):
    """Sparse structure of an ``nn.Linear`` weight mask (rebuilt when the mask changes)."""

    csr: LinearCSR | None = None
    t_values_perm: np.ndarray | None = None

    def ensure(self, full_compare: bool = False) -> LinearCSR:
        if self.csr is None or self.mask_changed(full_compare):
            self.csr = build_linear_csr(self.mask_numpy(), name=self.name)
            self._remember_mask()
        return self.csr

    def refresh(self) -> None:
        """Rebuild now if the mask changed (full comparison)."""
        self.ensure(full_compare=True)


@dataclass(eq=False)
class ConvLayerState(_LayerStateBase):
    """Direct-convolution structures of an ``nn.Conv2d`` mask, one per input size."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    #: "auto" (by feature-map size), "nchw" or "batch_last"; see SparseConv2dFunction.
    layout: str = "auto"
    by_size: dict[tuple[int, int], ConvCSR] = field(default_factory=dict)

    def ensure(self, input_hw: tuple[int, int], full_compare: bool = False) -> ConvCSR:
        if self.mask_changed(full_compare):
            self.by_size.clear()
            self._remember_mask()
        csr = self.by_size.get(input_hw)
        if csr is None:
            csr = build_conv_csr(
                self.mask_numpy(),
                input_hw,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                name=self.name,
            )
            self.by_size[input_hw] = csr
        return csr

    def refresh(self) -> None:
        """Drop the structures if the mask changed; they depend on the input size, so the
        next forward pass rebuilds the one it needs."""
        if self.mask_changed(full_compare=True):
            self.by_size.clear()
            self._remember_mask()


def _gather_values(weight: torch.Tensor, flat: np.ndarray) -> np.ndarray:
    w = weight.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    return np.take(w.numpy().reshape(-1), flat)


def _scatter_grad(
    weight: torch.Tensor, csr: LinearCSR | ConvCSR, dvalues: np.ndarray, n_threads: int
) -> torch.Tensor:
    """Dense weight gradient, zero off the mask, from the gradient values on the mask."""
    grad = torch.empty(weight.shape, dtype=weight.dtype)
    K.scatter_to_dense(csr.indptr, csr.flat, dvalues, grad.numpy().reshape(-1), n_threads)
    return grad


def _bias_array(bias: torch.Tensor | None, dtype: torch.dtype) -> np.ndarray:
    if bias is None:
        return _NO_BIAS[dtype]
    return bias.detach().to(dtype).contiguous().numpy()


_NO_BIAS = {dt: torch.empty(0, dtype=dt).numpy() for dt in SUPPORTED_DTYPES}


class SparseLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` sparse (CSR of the layer state); x of shape (..., in)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        state: LinearLayerState,
    ) -> torch.Tensor:
        csr = state.ensure()
        n_threads = kernel_threads()
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, x.shape[-1])
        xt = x2.t().contiguous()  # free when x arrives feature-major (output of a sparse layer)
        values = _gather_values(weight, csr.flat)
        yt = torch.empty((csr.shape[0], xt.shape[1]), dtype=x.dtype)
        K.spmm_feature_major(
            csr.indptr,
            csr.indices,
            values,
            csr.row_order,
            xt.numpy(),
            yt.numpy(),
            _bias_array(bias, x.dtype),
            n_threads,
        )
        state.calls["forward"] += 1
        y = yt.t()
        ctx.state = state
        ctx.csr = csr
        ctx.values = values
        ctx.dense = state.dense_weight_grad
        ctx.lead = lead
        ctx.has_bias = bias is not None
        ctx.xt = xt
        ctx.save_for_backward(weight)
        return y.reshape(*lead, csr.shape[0]) if len(lead) != 1 else y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        xt = ctx.xt
        state: LinearLayerState = ctx.state
        csr: LinearCSR = ctx.csr
        n_threads = kernel_threads()
        dy2 = dy.reshape(-1, csr.shape[0])
        dyt = dy2.t().contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dxt = torch.empty((csr.shape[1], dyt.shape[1]), dtype=dy.dtype)
            t_values = np.take(ctx.values, csr.t_perm)
            K.spmm_feature_major(
                csr.t_indptr,
                csr.t_indices,
                t_values,
                csr.t_row_order,
                dyt.numpy(),
                dxt.numpy(),
                _NO_BIAS[dy.dtype],
                n_threads,
            )
            state.calls["input_grad"] += 1
            dx = dxt.t()
            if len(ctx.lead) != 1:
                dx = dx.reshape(*ctx.lead, csr.shape[1])
        if ctx.needs_input_grad[1]:
            if ctx.dense:
                dw = dyt @ xt.t()
                state.calls["weight_grad_dense"] += 1
            else:
                dvalues = np.empty(csr.nnz, dtype=xt.numpy().dtype)
                K.sddmm_feature_major(
                    csr.indptr,
                    csr.indices,
                    csr.row_order,
                    dyt.numpy(),
                    xt.numpy(),
                    dvalues,
                    n_threads,
                )
                dw = _scatter_grad(weight, csr, dvalues, n_threads)
                state.calls["weight_grad_sparse"] += 1
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dyt.sum(dim=1)
        return dx, dw, db, None


def use_batch_last(csr: ConvCSR, layout: str) -> bool:
    """Whether a convolution runs batch-last: forced by ``layout``, or for small feature maps
    (one tap's NCHW loop shorter than :data:`BATCH_LAST_BELOW` elements) under ``"auto"``."""
    if layout != "auto":
        return layout == "batch_last"
    ho, wo = csr.output_hw
    return (ho - 1) * csr.padded_hw[1] + wo < BATCH_LAST_BELOW


#: A tap's NCHW loop length (``(Ho - 1) * Wp + Wo``) below which "auto" runs batch-last;
#: measured with benchmarks/kernels_cpu.py (docs/kernels-cpu.md).
BATCH_LAST_BELOW = 128


class SparseConv2dFunction(torch.autograd.Function):
    """Direct sparse 2-D convolution (zero padding) of NCHW input with the layer state's mask.

    Two layouts (same results): NCHW for large feature maps; batch-last for small ones, where
    the input is repacked as (C, Hp, Wp, N) and the output is returned as an NCHW view of an
    (O, Ho, Wo, N) buffer (elementwise ops keep that layout, so the next sparse conv's repack
    reads contiguous memory).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        state: ConvLayerState,
    ) -> torch.Tensor:
        unbatched = x.dim() == 3
        xd = x.detach()
        if unbatched:
            xd = xd.unsqueeze(0)
        in_hw = (int(xd.shape[2]), int(xd.shape[3]))
        csr = state.ensure(in_hw)
        if xd.shape[1] != csr.in_channels:
            raise ValueError(
                f"layer {state.name!r} expects {csr.in_channels} input channels, "
                f"got input of shape {tuple(x.shape)}"
            )
        n_threads = kernel_threads()
        ph, pw = csr.padding
        hp, wp = csr.padded_hw
        h, w = csr.input_hw
        n = int(xd.shape[0])
        values = _gather_values(weight, csr.flat)
        b = _bias_array(bias, x.dtype)
        batch_last = use_batch_last(csr, state.layout)
        if batch_last:
            xpad = torch.empty((csr.in_channels, hp, wp, n), dtype=x.dtype)
            x_bl = xd.permute(1, 2, 3, 0)
            if x_bl.is_contiguous():  # the input is a batch-last conv's output already
                xpad.zero_()
                xpad[:, ph : ph + h, pw : pw + w, :] = x_bl
            else:
                K.pack_batch_last(
                    xd.contiguous().numpy(), xpad.view(-1, n).numpy(), ph, pw, n_threads
                )
            y_bl = torch.empty((csr.out_channels, *csr.output_hw, n), dtype=x.dtype)
            K.conv2d_forward_batch_last(
                csr.indptr,
                csr.offsets,
                values,
                csr.row_order,
                xpad.view(-1, n).numpy(),
                y_bl.view(-1, n).numpy(),
                b,
                _geometry(csr),
                csr.groups,
                n_threads,
            )
            y = y_bl.permute(3, 0, 1, 2)
        else:
            xpad = F.pad(xd, (pw, pw, ph, ph)).contiguous() if ph or pw else xd.contiguous()
            y = torch.empty((n, csr.out_channels, *csr.output_hw), dtype=x.dtype)
            K.conv2d_forward(
                csr.indptr,
                csr.offsets,
                values,
                xpad.numpy(),
                y.numpy(),
                b,
                csr.stride[0],
                csr.stride[1],
                csr.groups,
                n_threads,
            )
        state.calls["forward"] += 1
        ctx.state = state
        ctx.csr = csr
        ctx.values = values
        ctx.dense = state.dense_weight_grad
        ctx.unbatched = unbatched
        ctx.batch_last = batch_last
        ctx.has_bias = bias is not None
        ctx.xpad = xpad
        ctx.input_batch_last = batch_last and xd.permute(1, 2, 3, 0).is_contiguous()
        ctx.save_for_backward(weight)
        return y.squeeze(0) if unbatched else y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        xpad = ctx.xpad
        state: ConvLayerState = ctx.state
        csr: ConvCSR = ctx.csr
        n_threads = kernel_threads()
        if ctx.unbatched:
            dy = dy.unsqueeze(0)
        ph, pw = csr.padding
        h, w = csr.input_hw
        n = int(dy.shape[0])
        batch_last = ctx.batch_last
        if batch_last:
            dy_k = dy.permute(1, 2, 3, 0)
            if not dy_k.is_contiguous():  # it is when dy kept the output's layout
                dy_k = torch.empty_like(dy_k, memory_format=torch.contiguous_format)
                K.pack_batch_last(
                    dy.contiguous().numpy(), dy_k.view(-1, n).numpy(), 0, 0, n_threads
                )
            dy2 = dy_k.view(-1, n).numpy()
            xpad_nchw = xpad.permute(3, 0, 1, 2)
        else:
            dy_k = dy.contiguous()
            xpad_nchw = xpad
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dxpad = torch.empty_like(xpad)
            if batch_last:
                K.conv2d_input_grad_batch_last(
                    csr.t_indptr,
                    csr.t_out,
                    csr.t_perm,
                    csr.offsets,
                    csr.chan,
                    ctx.values,
                    dy2,
                    dxpad.view(-1, n).numpy(),
                    _geometry(csr),
                    n_threads,
                )
                if ctx.input_batch_last:  # hand the gradient back in the input's layout
                    dx = dxpad[:, ph : ph + h, pw : pw + w, :].permute(3, 0, 1, 2)
                else:
                    dx = torch.empty((n, csr.in_channels, h, w), dtype=dy.dtype)
                    K.unpack_batch_last(dxpad.view(-1, n).numpy(), dx.numpy(), ph, pw, n_threads)
            else:
                K.conv2d_input_grad(
                    csr.indptr,
                    csr.offsets,
                    ctx.values,
                    dy_k.numpy(),
                    dxpad.numpy(),
                    csr.stride[0],
                    csr.stride[1],
                    csr.groups,
                    n_threads,
                )
                dx = dxpad[:, :, ph : ph + h, pw : pw + w]
            state.calls["input_grad"] += 1
            if ctx.unbatched:
                dx = dx.squeeze(0)
        if ctx.needs_input_grad[1]:
            if ctx.dense:
                # The padded input with no further padding gives the same weight gradient.
                dw = torch.ops.aten.convolution_backward(
                    dy,
                    xpad_nchw,
                    weight.detach(),
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
                dvalues = np.empty(csr.nnz, dtype=ctx.values.dtype)
                if batch_last:
                    K.conv2d_weight_grad_batch_last(
                        csr.indptr,
                        csr.offsets,
                        csr.row_order,
                        dy2,
                        xpad.view(-1, n).numpy(),
                        dvalues,
                        _geometry(csr),
                        csr.groups,
                        n_threads,
                    )
                else:
                    K.conv2d_weight_grad(
                        csr.indptr,
                        csr.offsets,
                        csr.row_order,
                        dy_k.numpy(),
                        xpad.numpy(),
                        dvalues,
                        csr.stride[0],
                        csr.stride[1],
                        csr.groups,
                        n_threads,
                    )
                dw = _scatter_grad(weight, csr, dvalues, n_threads)
                state.calls["weight_grad_sparse"] += 1
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(dim=(0, 2, 3))
        return dx, dw, db, None


def _geometry(csr: ConvCSR) -> tuple[int, int, int, int, int, int]:
    hp, wp = csr.padded_hw
    ho, wo = csr.output_hw
    return (hp, wp, ho, wo, csr.stride[0], csr.stride[1])
