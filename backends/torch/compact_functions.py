"""Routed layers computed on their active channels only: ``attach(kernels="compact")``.

Sparse momentum leaves whole rows of a weight empty (an output unit or filter with no active
weight) and whole input channels unread (no active weight reads them). A layer's result does not
depend on them: an empty row outputs its bias, an unread channel is multiplied by zeros only. So a
routed layer gathers the active rows and read columns of its weight (the *block*) and the read
channels of its input, runs an ordinary dense kernel (or, for ``"compact+cpu"`` /
``"compact+cuda"``, the sparse kernels of :mod:`sparsecore.torch.sparse_functions` /
:mod:`sparsecore.torch.cuda_kernels`) on those smaller shapes, and scatters the result back to the
full width, empty rows holding the bias. This is per-layer compaction: the network's tensors keep
their shapes, so nothing outside the layer changes, and the result equals the masked dense layer
up to the rounding of sums over fewer zero terms.

Gradients keep the router's contract (:mod:`sparsecore.torch.kernel_router`): the input and bias
gradients are those of the dense layer; the weight gradient is the full dense one inside the
window before a mask update (``state.dense_weight_grad``), so that momentum growth sees the
momentum of every inactive position, whole empty rows and unread columns included, and the
gradient on the mask only elsewhere. The block is gathered again when the mask changes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .sparse_functions import (
    SUPPORTED_DTYPES,
    ConvLayerState,
    LinearLayerState,
    SparseConv2dFunction,
    SparseLinearFunction,
    _LayerStateBase,
)

__all__ = ["INNER_KERNELS", "CompactFunction", "CompactLayerState"]

#: What runs on the gathered block: dense PyTorch kernels, or the sparse CPU / CUDA kernels.
INNER_KERNELS = ("dense", "cpu", "cuda")


@dataclass(eq=False)
class CompactLayerState(_LayerStateBase):
    """The gathered block of one routed layer, rebuilt when its mask changes.

    ``rows``: active output units (ascending); ``cols``: input channels some active weight reads
    (ascending); ``block_mask``: the mask restricted to them. ``inner`` names the kernels that run
    on the block; they run where the block is at least ``min_sparsity`` sparse and the input is
    one they take (else dense kernels on the block). ``shapes`` counts the forward passes per
    weight shape actually run (``"134x784"``, ``"24x12x5x5"``).
    """

    module: nn.Module | None = None
    inner: str = "dense"
    min_sparsity: float = 0.85
    #: zero padding of a convolution as the sparse kernels take it (None: they cannot)
    padding: tuple[int, int] | None = (0, 0)
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    block_mask: torch.Tensor | None = None
    inner_state: LinearLayerState | ConvLayerState | None = None
    shapes: Counter[str] = field(default_factory=Counter)
    _block_values: torch.Tensor | None = None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    def ensure(self, full_compare: bool = False) -> None:
        """Gather rows, columns and block again if the mask changed."""
        if self.rows is not None and not self.mask_changed(full_compare):
            return
        mask = self.mask.detach()
        rest = tuple(range(1, mask.dim()))
        rows = mask.any(dim=rest).nonzero().flatten() if rest else mask.nonzero().flatten()
        col_dims = (0, *range(2, mask.dim()))
        cols = mask.any(dim=col_dims).nonzero().flatten()
        block = mask.index_select(0, rows).index_select(1, cols)
        self.rows, self.cols, self.block_mask = rows, cols, block
        self._block_values = None
        self.inner_state = self._inner_state(block)
        self._remember_mask()

    def _inner_state(self, block: torch.Tensor) -> LinearLayerState | ConvLayerState | None:
        if self.inner == "dense" or block.numel() == 0 or block.device.type != self.inner:
            return None  # the inner kernels run only on their own device
        if 1.0 - float(block.sum()) / block.numel() < self.min_sparsity:
            return None
        name = f"{self.name} (compact block)"
        if not self.is_conv:
            return LinearLayerState(name=name, mask=block, dense_weight_grad=False)
        if self.padding is None:
            return None
        conv = self.module
        assert isinstance(conv, nn.Conv2d)
        return ConvLayerState(
            name=name,
            mask=block,
            dense_weight_grad=False,
            stride=_pair(conv.stride),
            padding=self.padding,
            dilation=_pair(conv.dilation),
            groups=1,
        )

    def block_values(self, dtype: torch.dtype) -> torch.Tensor:
        """The block's mask as 0/1 values of ``dtype`` (kept until the block changes)."""
        cached = self._block_values
        if cached is None or cached.dtype != dtype:
            assert self.block_mask is not None
            cached = self._block_values = self.block_mask.to(dtype)
        return cached

    def refresh(self) -> None:
        """Gather again now if the mask changed (full comparison)."""
        self.ensure(full_compare=True)

    def block_shape(self) -> tuple[int, ...]:
        """The weight shape the compact forward runs (the full shape before the first gather)."""
        if self.rows is None or self.cols is None:
            return tuple(self.mask.shape)
        return (int(self.rows.numel()), int(self.cols.numel()), *self.mask.shape[2:])

    def block_density(self) -> float:
        block = self.block_mask
        return float(block.sum()) / block.numel() if block is not None and block.numel() else 0.0


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _inner_function(state: CompactLayerState, x: torch.Tensor, w: torch.Tensor) -> Any:
    """The sparse autograd function to run on the block, or None for dense kernels."""
    inner = state.inner_state
    if inner is None or x.dtype != w.dtype:
        return None
    if state.inner == "cpu" and x.device.type == "cpu" and x.dtype in SUPPORTED_DTYPES:
        return SparseConv2dFunction if state.is_conv else SparseLinearFunction
    if state.inner == "cuda" and x.device.type == "cuda":
        from . import cuda_kernels

        if cuda_kernels.cuda_supported(x, w):
            return (
                cuda_kernels.CudaSparseConv2dFunction
                if state.is_conv
                else cuda_kernels.CudaSparseLinearFunction
            )
    return None


def _core(state: CompactLayerState, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer without bias on the gathered block: dense kernels or the inner sparse ones."""
    function = _inner_function(state, x, w)
    if function is not None:
        state.calls["block_sparse"] += 1
        out: torch.Tensor = function.apply(x, w, None, state.inner_state)
        return out
    state.calls["block_dense"] += 1
    if state.is_conv:
        conv = state.module
        assert isinstance(conv, nn.Conv2d)
        return conv._conv_forward(x, w, None)
    return F.linear(x, w)


def _dense_weight_grad(
    state: CompactLayerState, x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor
) -> torch.Tensor:
    """The full dense weight gradient, every position (inactive ones included)."""
    if not state.is_conv:
        return dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    conv = state.module
    assert isinstance(conv, nn.Conv2d)
    if state.padding is not None:
        return torch.ops.aten.convolution_backward(
            dy,
            x,
            weight,
            None,
            _pair(conv.stride),
            state.padding,
            _pair(conv.dilation),
            False,
            [0, 0],
            1,
            [False, True, False],
        )[1]
    # Padding the kernels' call cannot express (reflect, asymmetric "same"): through autograd.
    with torch.enable_grad():
        w = weight.detach().requires_grad_(True)
        y = conv._conv_forward(x.detach(), w, None)
        (dw,) = torch.autograd.grad(y, w, dy)
    return dw


def _direct(state: CompactLayerState, x: torch.Tensor, w: torch.Tensor) -> bool:
    """True where dense kernels run on the block and backward computes their gradients with
    one call each (a linear layer; a convolution with zero padding)."""
    if _inner_function(state, x, w) is not None:
        return False
    return not state.is_conv or state.padding is not None


def _dense_core(state: CompactLayerState, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    state_conv = state.module
    if state.is_conv:
        assert isinstance(state_conv, nn.Conv2d)
        return state_conv._conv_forward(x, w, None)
    return F.linear(x, w)


def _dense_core_grads(
    state: CompactLayerState,
    dy: torch.Tensor,
    x: torch.Tensor | None,
    w: torch.Tensor | None,
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Input and weight gradients of :func:`_dense_core` on the block."""
    if not (need_dx or need_dw):
        return None, None
    if state.is_conv:
        conv = state.module
        assert isinstance(conv, nn.Conv2d) and state.padding is not None
        assert x is not None and w is not None
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy,
            x,
            w,
            None,
            _pair(conv.stride),
            state.padding,
            _pair(conv.dilation),
            False,
            [0, 0],
            1,
            [need_dx, need_dw, False],
        )
        return dx, dw
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = None
    if need_dx:
        assert w is not None
        dx = (dy2 @ w).reshape(*dy.shape[:-1], w.shape[1])
    dw = None
    if need_dw:
        assert x is not None
        dw = dy2.t() @ x.reshape(-1, x.shape[-1])
    return dx, dw


class CompactFunction(torch.autograd.Function):
    """A routed ``nn.Linear`` (x of shape (..., in)) or ``nn.Conv2d`` (NCHW, groups=1) run on its
    gathered block. The block's own computation is recorded as a small autograd graph at forward
    time and differentiated in ``backward``, so any kernel (dense, or a sparse autograd function)
    can run on it."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        state: CompactLayerState,
    ) -> torch.Tensor:
        state.ensure()
        rows, cols = state.rows, state.cols
        assert rows is not None and cols is not None
        dim = 1 if state.is_conv else x.dim() - 1
        out_features = int(state.mask.shape[0])
        all_rows = rows.numel() == out_features
        all_cols = cols.numel() == int(state.mask.shape[1])
        xd = x.detach()
        wd = weight.detach()
        x_c = xd if all_cols else xd.index_select(dim, cols)
        # whole rows first (contiguous copies), then the columns of those rows
        w_c = wd if all_rows else wd.index_select(0, rows)
        w_c = w_c if all_cols else w_c.index_select(1, cols)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dense = bool(state.dense_weight_grad)
        direct = _direct(state, x_c, w_c)
        if direct:  # dense kernels whose gradients backward computes itself: no inner graph
            state.calls["block_dense"] += 1
            y_c = _dense_core(state, x_c, w_c)
            ctx.graph = None
        else:
            with torch.enable_grad():
                x_leaf = x_c.detach().requires_grad_(need_dx)
                w_leaf = w_c.detach().requires_grad_(need_dw and not dense)
                y_c = _core(state, x_leaf, w_leaf)
            ctx.graph = (x_leaf, w_leaf, y_c)
        state.shapes["x".join(str(s) for s in w_c.shape)] += 1
        state.calls["forward"] += 1
        if all_rows:
            y = y_c.detach() if direct else y_c.detach().clone()
        else:
            shape = list(y_c.shape)
            shape[dim] = out_features
            y = y_c.new_zeros(shape)
            y.index_copy_(dim, rows, y_c.detach())
        if bias is not None:
            view = [1] * y.dim()
            view[dim] = out_features
            y.add_(bias.detach().view(view))
        ctx.state = state
        ctx.plan = (rows, cols, all_rows, all_cols, dim, dense)
        ctx.has_bias = bias is not None
        ctx.x_shape = tuple(x.shape)
        ctx.save_for_backward(
            xd if (dense and need_dw) else None,
            wd if dense else None,
            x_c if direct else None,
            w_c if direct else None,
        )
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        state: CompactLayerState = ctx.state
        rows, cols, all_rows, all_cols, dim, dense = ctx.plan
        x_full, w_full, x_c, w_c = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dy_c = dy if all_rows else dy.index_select(dim, rows)
        if ctx.graph is None:
            dx_c, dw_c = _dense_core_grads(state, dy_c, x_c, w_c, need_dx, need_dw and not dense)
        else:
            x_leaf, w_leaf, y_c = ctx.graph
            inputs = [t for t in (x_leaf, w_leaf) if t.requires_grad]
            grads = dict(
                zip(
                    [id(t) for t in inputs],
                    torch.autograd.grad(y_c, inputs, dy_c) if inputs else (),
                    strict=True,
                )
            )
            dx_c, dw_c = grads.get(id(x_leaf)), grads.get(id(w_leaf))
            ctx.graph = None
        dx = dw = db = None
        if need_dx:
            assert dx_c is not None
            if all_cols:
                dx = dx_c
            else:
                dx = dy.new_zeros(ctx.x_shape)
                dx.index_copy_(dim, cols, dx_c)
        if need_dw:
            if dense:
                dw = _dense_weight_grad(state, x_full, w_full, dy)
                state.calls["weight_grad_dense"] += 1
            else:
                assert dw_c is not None
                dw_c = dw_c * state.block_values(dw_c.dtype)
                if all_rows and all_cols:
                    dw = dw_c
                else:
                    if not all_cols:  # the block's columns into full rows, then the rows
                        wide = dw_c.new_zeros((dw_c.shape[0], *state.mask.shape[1:]))
                        dw_c = wide.index_copy_(1, cols, dw_c)
                    if all_rows:
                        dw = dw_c
                    else:
                        dw = dw_c.new_zeros(state.mask.shape)
                        dw.index_copy_(0, rows, dw_c)
                state.calls["weight_grad_sparse"] += 1
        if ctx.has_bias and need_db:
            others = tuple(d for d in range(dy.dim()) if d != dim)
            db = dy.sum(dim=others) if others else dy.clone()  # sum(dim=()) would sum all
        return dx, dw, db, None
