"""Sparse CPU kernels in PyTorch: each op against PyTorch's dense op on the masked weights,
gradients (gradcheck), structure rebuilds, the router contract, and training equivalence."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from sparsecore.torch.kernel_router import KernelRouter
from sparsecore.torch.sparse_functions import (
    ConvLayerState,
    LinearLayerState,
    SparseConv2dFunction,
    SparseLinearFunction,
    kernel_threads,
)

DENSITIES = [0.0, 0.03, 0.3, 1.0]


def _mask(gen: torch.Generator, shape: tuple[int, ...], density: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) < density


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    )


def _check_linear(batch, n_in, n_out, density, dense_grad, dtype, seed, bias=True, lead=()):
    gen = torch.Generator().manual_seed(seed)
    mask = _mask(gen, (n_out, n_in), density)
    w0 = torch.randn(n_out, n_in, generator=gen, dtype=dtype) * mask
    b0 = torch.randn(n_out, generator=gen, dtype=dtype) if bias else None
    x0 = torch.randn(*lead, batch, n_in, generator=gen, dtype=dtype)
    dy = torch.randn(*lead, batch, n_out, generator=gen, dtype=dtype)

    state = LinearLayerState(name="fc", mask=mask, dense_weight_grad=dense_grad)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    b = b0.clone().requires_grad_() if bias else None
    y = SparseLinearFunction.apply(x, w, b, state)
    y.backward(dy)

    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    br = b0.clone().requires_grad_() if bias else None
    yr = F.linear(xr, wr, br)
    yr.backward(dy)
    tol = _tol(dtype)
    torch.testing.assert_close(y, yr, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    expected_dw = wr.grad if dense_grad else wr.grad * mask
    torch.testing.assert_close(w.grad, expected_dw, **tol)
    if bias:
        torch.testing.assert_close(b.grad, br.grad, **tol)
    assert state.calls["weight_grad_dense" if dense_grad else "weight_grad_sparse"] == 1


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 9),
    n_in=st.integers(1, 17),
    n_out=st.integers(1, 17),
    density=st.sampled_from(DENSITIES),
    dense_grad=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_linear_matches_dense(batch, n_in, n_out, density, dense_grad, seed) -> None:
    _check_linear(batch, n_in, n_out, density, dense_grad, torch.float64, seed)


@pytest.mark.parametrize("dense_grad", [False, True])
def test_linear_float32_and_leading_dims(dense_grad: bool) -> None:
    _check_linear(33, 70, 45, 0.1, dense_grad, torch.float32, 1)
    _check_linear(5, 12, 7, 0.4, dense_grad, torch.float64, 2, bias=False, lead=(3,))


def _check_conv(
    batch,
    cin_g,
    cout_g,
    groups,
    k,
    stride,
    padding,
    dilation,
    hw,
    density,
    dense_grad,
    seed,
    dtype=torch.float64,
    bias=True,
    layout="auto",
):
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out = cin_g * groups, cout_g * groups
    mask = _mask(gen, (c_out, cin_g, *k), density)
    w0 = torch.randn(c_out, cin_g, *k, generator=gen, dtype=dtype) * mask
    b0 = torch.randn(c_out, generator=gen, dtype=dtype) if bias else None
    x0 = torch.randn(batch, c_in, *hw, generator=gen, dtype=dtype)
    yr_shape = F.conv2d(x0, w0, None, stride, padding, dilation, groups).shape
    dy = torch.randn(yr_shape, generator=gen, dtype=dtype)

    state = ConvLayerState(
        name="conv",
        mask=mask,
        dense_weight_grad=dense_grad,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        layout=layout,
    )
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    b = b0.clone().requires_grad_() if bias else None
    y = SparseConv2dFunction.apply(x, w, b, state)
    y.backward(dy)
    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    br = b0.clone().requires_grad_() if bias else None
    yr = F.conv2d(xr, wr, br, stride, padding, dilation, groups)
    yr.backward(dy)
    tol = _tol(dtype)
    torch.testing.assert_close(y, yr, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    torch.testing.assert_close(w.grad, wr.grad if dense_grad else wr.grad * mask, **tol)
    if bias:
        torch.testing.assert_close(b.grad, br.grad, **tol)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    cin_g=st.integers(1, 4),
    cout_g=st.integers(1, 4),
    groups=st.sampled_from([1, 2, 3]),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    extra=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    density=st.sampled_from(DENSITIES),
    dense_grad=st.booleans(),
    layout=st.sampled_from(["nchw", "batch_last"]),
    seed=st.integers(0, 2**31),
)
def test_conv_matches_dense(
    batch,
    cin_g,
    cout_g,
    groups,
    k,
    stride,
    padding,
    dilation,
    extra,
    density,
    dense_grad,
    layout,
    seed,
) -> None:
    hw = tuple(max(1, dilation[i] * (k[i] - 1) + 1 - 2 * padding[i]) + extra[i] for i in range(2))
    _check_conv(
        batch,
        cin_g,
        cout_g,
        groups,
        k,
        stride,
        padding,
        dilation,
        hw,
        density,
        dense_grad,
        seed,
        layout=layout,
    )


@pytest.mark.parametrize("layout", ["nchw", "batch_last"])
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_conv_float32(stride, layout) -> None:
    _check_conv(
        4,
        8,
        16,
        1,
        (3, 3),
        stride,
        (1, 1),
        (1, 1),
        (12, 10),
        0.1,
        False,
        3,
        dtype=torch.float32,
        layout=layout,
    )
    _check_conv(
        2,
        3,
        2,
        2,
        (3, 3),
        stride,
        (1, 1),
        (1, 1),
        (9, 9),
        1.0,
        True,
        4,
        dtype=torch.float32,
        bias=False,
    )


@pytest.mark.parametrize("layout", ["nchw", "batch_last"])
def test_gradcheck_linear_and_conv(layout: str) -> None:
    gen = torch.Generator().manual_seed(0)
    mask = _mask(gen, (5, 6), 0.5)
    state = LinearLayerState(name="fc", mask=mask, dense_weight_grad=False)
    x = torch.randn(3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = (torch.randn(5, 6, dtype=torch.float64, generator=gen) * mask).requires_grad_()
    b = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: SparseLinearFunction.apply(*a, state), (x, w, b))

    cmask = _mask(gen, (4, 2, 3, 2), 0.5)
    cstate = ConvLayerState(
        name="conv",
        mask=cmask,
        dense_weight_grad=False,
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        groups=2,
        layout=layout,
    )
    cx = torch.randn(2, 4, 6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    cw = (torch.randn(4, 2, 3, 2, dtype=torch.float64, generator=gen) * cmask).requires_grad_()
    cb = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: SparseConv2dFunction.apply(*a, cstate), (cx, cw, cb))


def test_unbatched_conv_input() -> None:
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    mask = _mask(gen, tuple(conv.weight.shape), 0.2)
    with torch.no_grad():
        conv.weight.mul_(mask)
    x = torch.randn(3, 7, 6, dtype=torch.float64, generator=gen)
    expected = conv(x)
    router = KernelRouter([("c", conv, mask)], "cpu", min_sparsity=0.5)
    torch.testing.assert_close(conv(x), expected)
    assert router.telemetry()["layers"]["c"]["calls"]["forward"] == 1


def test_structures_rebuilt_when_mask_changes() -> None:
    gen = torch.Generator().manual_seed(7)
    fc = nn.Linear(20, 10).double()
    conv = nn.Conv2d(2, 6, 3, padding=1).double()
    fmask = _mask(gen, (10, 20), 0.2)
    cmask = _mask(gen, (6, 2, 3, 3), 0.2)
    with torch.no_grad():
        fc.weight.mul_(fmask)
        conv.weight.mul_(cmask)
    router = KernelRouter([("fc", fc, fmask), ("conv", conv, cmask)], "cpu", min_sparsity=0.5)
    x = torch.randn(4, 20, dtype=torch.float64, generator=gen)
    xc = torch.randn(2, 2, 5, 5, dtype=torch.float64, generator=gen)
    fc(x), conv(xc)
    before = router.telemetry()["rebuilds"]

    # In-place change (version counter): picked up by the next forward with no refresh.
    fmask.copy_(_mask(gen, (10, 20), 0.2))
    with torch.no_grad():
        fc.weight.copy_(torch.randn(10, 20, dtype=torch.float64, generator=gen) * fmask)
    torch.testing.assert_close(fc(x), F.linear(x, fc.weight, fc.bias))
    # Change through .data (no version bump): picked up by refresh().
    cmask.data.copy_(_mask(gen, (6, 2, 3, 3), 0.2))
    with torch.no_grad():
        conv.weight.data.copy_(torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=gen) * cmask)
    router.refresh()
    torch.testing.assert_close(conv(xc), F.conv2d(xc, conv.weight, conv.bias, padding=1))
    after = router.telemetry()
    assert after["rebuilds"] == before + 2
    # A refresh with no change rebuilds nothing.
    router.refresh()
    assert router.telemetry()["rebuilds"] == after["rebuilds"]


def test_router_threshold_telemetry_and_remove() -> None:
    gen = torch.Generator().manual_seed(11)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5))
    masks = [_mask(gen, (20, 30), 0.1), _mask(gen, (5, 20), 0.9)]
    with torch.no_grad():
        model[0].weight.mul_(masks[0])
        model[2].weight.mul_(masks[1])
    x = torch.randn(8, 30, generator=gen)
    expected = model(x)
    targets = [("0", model[0], masks[0]), ("2", model[2], masks[1])]
    router = KernelRouter(targets, "cpu", min_sparsity=0.5, dense_grad=False)
    assert "forward" in model[0].__dict__ and "forward" in model[2].__dict__
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    tel = router.telemetry()
    assert tel["layers"]["0"]["sparse"] and not tel["layers"]["2"]["sparse"]
    assert tel["layers"]["0"]["calls"] == {
        "forward": 1,
        "input_grad": 0,
        "weight_grad_sparse": 1,
    } or tel["layers"]["0"]["calls"] == {"forward": 1, "weight_grad_sparse": 1}
    assert tel["layers"]["2"]["calls"] == {"dense_forward": 1}
    assert tel["sparse_grad_steps"] == 1 and tel["dense_grad_steps"] == 0
    # Gradients outside the mask are zero in sparse mode, dense inside the window.
    assert torch.all(model[0].weight.grad[~masks[0]] == 0)
    model.zero_grad()
    router.set_dense_weight_grad(True)
    model(x).sum().backward()
    assert torch.any(model[0].weight.grad[~masks[0]] != 0)
    tel = router.telemetry()
    assert tel["dense_grad_steps"] == 1 and tel["dense_grad_windows"] == 1
    # The denser layer becomes sparse enough: refresh routes it.
    masks[1].copy_(_mask(gen, (5, 20), 0.1))
    router.refresh()
    assert router.telemetry()["layers"]["2"]["sparse"]
    router.remove()
    assert "forward" not in model[0].__dict__ and "forward" not in model[2].__dict__
    router.remove()
    assert model[0].forward.__func__ is nn.Linear.forward


def test_router_bad_input_changes_nothing() -> None:
    fc = nn.Linear(4, 3)
    conv = nn.Conv2d(2, 2, 3)
    good = ("fc", fc, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"'conv'.*\(2, 2, 3, 3\)"):
        KernelRouter([good, ("conv", conv, torch.ones(2, 2, 3, dtype=torch.bool))], "cpu")
    assert "forward" not in fc.__dict__
    with pytest.raises(TypeError, match=r"'fc'.*torch\.float32"):
        KernelRouter([("fc", fc, torch.ones(3, 4))], "cpu")
    with pytest.raises(ValueError, match=r"'gpu'"):
        KernelRouter([good], "gpu")
    with pytest.raises(ValueError, match=r"1\.5"):
        KernelRouter([good], "cpu", min_sparsity=1.5)
    with pytest.raises(TypeError, match=r"'emb'.*Embedding"):
        KernelRouter([good, ("emb", nn.Embedding(3, 4), torch.ones(3, 4, dtype=torch.bool))], "cpu")
    assert "forward" not in fc.__dict__
    with pytest.raises(ValueError, match="duplicate"):
        KernelRouter([good, good], "cpu")
    assert "forward" not in fc.__dict__


def test_unsupported_layers_stay_dense() -> None:
    circ = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")
    half = nn.Linear(4, 3).to(torch.bfloat16)
    router = KernelRouter(
        [
            ("circ", circ, torch.zeros(2, 2, 3, 3, dtype=torch.bool)),
            ("half", half, torch.zeros(3, 4, dtype=torch.bool)),
        ],
        "auto",
        min_sparsity=0.0,
    )
    tel = router.telemetry()["layers"]
    assert not tel["circ"]["installed"] and "padding" in tel["circ"]["reason"]
    assert not tel["half"]["installed"] and "bfloat16" in tel["half"]["reason"]
    assert "forward" not in circ.__dict__


def test_threads_follow_torch() -> None:
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert kernel_threads() == 1 and numba.get_num_threads() == 1
        torch.set_num_threads(old)
        assert kernel_threads() == min(old, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(old)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def _train(use_kernels: bool, steps: int = 8) -> list[torch.Tensor]:
    """SGD with momentum on fixed data; sparse weight gradients for steps 0-2 (the reference
    masks its dense gradients the same way), dense ones for steps 3-5, then a mask change."""
    torch.manual_seed(0)
    net = _Net().double()
    gen = torch.Generator().manual_seed(1)
    layers = [("conv1", net.conv1), ("conv2", net.conv2), ("fc1", net.fc1), ("fc2", net.fc2)]
    masks = {n: _mask(gen, tuple(m.weight.shape), 0.25) for n, m in layers}
    with torch.no_grad():
        for n, m in layers:
            m.weight.mul_(masks[n])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    router = (
        KernelRouter([(n, m, masks[n]) for n, m in layers], "cpu", 0.5, dense_grad=False)
        if use_kernels
        else None
    )
    x = torch.randn(16, 1, 16, 16, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 10, (16,), generator=gen)
    for step in range(steps):
        dense = 3 <= step < 6
        if router is not None:
            router.set_dense_weight_grad(dense)
        opt.zero_grad()
        F.cross_entropy(net(x), target).backward()
        if router is None and not dense:
            for n, m in layers:
                m.weight.grad.mul_(masks[n])
        opt.step()
        if step == 5:  # mask update: drop and grow positions chosen by the momentum
            for n, m in layers:
                buf = opt.state[m.weight]["momentum_buffer"]
                grow = (buf.abs() > buf.abs().flatten().quantile(0.9)) & ~masks[n]
                masks[n].logical_and_(torch.rand(masks[n].shape, generator=gen) > 0.3)
                masks[n].logical_or_(grow)
            if router is not None:
                router.refresh()
        with torch.no_grad():
            for n, m in layers:
                m.weight.mul_(masks[n])
    if router is not None:
        tel = router.telemetry()
        assert tel["sparse_layers"] == 4
        assert tel["dense_grad_steps"] == 3 and tel["sparse_grad_steps"] == steps - 3
        router.remove()
    return [p.detach().clone() for p in net.parameters()]


def test_training_with_kernels_equals_training_without() -> None:
    with_kernels = _train(True)
    without = _train(False)
    for a, b in zip(with_kernels, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_cuda_mode_leaves_cpu_layers_dense() -> None:
    fc = nn.Linear(6, 4)
    router = KernelRouter([("fc", fc, torch.zeros(4, 6, dtype=torch.bool))], "cuda", 0.0)
    layer = router.telemetry()["layers"]["fc"]
    assert not layer["installed"] and "kernels='cuda'" in layer["reason"]
    assert "forward" not in fc.__dict__


def test_count_flops_from_a_model() -> None:
    from sparsecore.flops import layer_flops
    from sparsecore.torch.flops import count_flops

    net = _Net()
    gen = torch.Generator().manual_seed(3)
    fc1_mask = _mask(gen, tuple(net.fc1.weight.shape), 0.1)
    with torch.no_grad():
        net.conv2.weight[:4] = 0  # four empty output channels, found from weight != 0
    x = torch.randn(5, 1, 16, 16)
    report = count_flops(net, x, {"fc1.weight": fc1_mask})
    by_name = {layer.name: layer for layer in report.layers}
    assert list(by_name) == ["conv1", "conv2", "fc1", "fc2"]
    # conv1 reads the input: no input gradient. 16x16 output, 8x1x3x3 weights.
    assert by_name["conv1"] == layer_flops(
        "conv1", np.ones((8, 1, 3, 3), dtype=bool), 5, output_hw=(16, 16), input_grad=False
    )
    conv2 = by_name["conv2"]
    assert conv2.dense_forward == 2 * 5 * (8 * 8) * (8 * 8 * 9)  # 8x8 output pixels
    assert conv2.compact_forward == 2 * 5 * (8 * 8) * (4 * 8 * 9)
    assert by_name["fc1"].sparse_forward == 2 * 5 * int(fc1_mask.sum())
    assert by_name["fc2"].sparse_forward == by_name["fc2"].dense_forward


def test_numba_pool_start_keeps_torch_threads() -> None:
    """Starting Numba's OpenMP pool resets the OpenMP thread count; PyTorch's is restored."""
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from sparsecore.torch.sparse_functions import kernel_threads\n"
        "import numba\n"
        "print(kernel_threads(), torch.get_num_threads(), numba.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1", "1"]
