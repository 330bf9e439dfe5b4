"""CUDA kernels against PyTorch's dense ops (float64 references), on a GPU only.

Each product of a sparse layer (forward, input gradient, weight gradient on the mask, and the
dense weight gradient of the window before a mask update) is compared with the dense op on the
masked weight, over random shapes, strides, paddings, dilations and groups; then training with
the kernels is compared with dense masked training.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import sparsecore.kernels as K

pytestmark = pytest.mark.gpu

# No shrinking: GPU time is scarce, and the first failing example already says what broke.
GPU_EXAMPLES = settings(
    max_examples=25, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate]
)


@pytest.fixture(autouse=True)
def _exact_fp32() -> None:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _cuda_modules():
    from sparsecore.torch import cuda_kernels as C
    from sparsecore.torch.sparse_functions import ConvLayerState, LinearLayerState

    return C, ConvLayerState, LinearLayerState


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=what
    )


def _check_conv(
    n, cg, og, groups, hw, k, stride, pad, dil, density, dense_grad, bias, seed, algo="auto"
):
    C, _, _ = _cuda_modules()
    previous = C.set_conv_algorithm(algo)
    try:
        _check_conv_with(
            n, cg, og, groups, hw, k, stride, pad, dil, density, dense_grad, bias, seed
        )
    finally:
        C.set_conv_algorithm(previous)


def _check_conv_with(n, cg, og, groups, hw, k, stride, pad, dil, density, dense_grad, bias, seed):
    C, ConvLayerState, _ = _cuda_modules()
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    c, o = cg * groups, og * groups
    mask = torch.rand((o, cg, *k), generator=gen) < density
    w0 = torch.randn((o, cg, *k), generator=gen) * mask
    b0 = torch.randn(o, generator=gen) if bias else None
    x0 = torch.randn((n, c, *hw), generator=gen)
    state = ConvLayerState(
        name="conv",
        mask=mask.to(dev),
        dense_weight_grad=dense_grad,
        stride=stride,
        padding=pad,
        dilation=dil,
        groups=groups,
    )
    x = x0.to(dev).requires_grad_()
    w = w0.to(dev).requires_grad_()
    b = b0.to(dev).requires_grad_() if bias else None
    y = C.sparse_conv2d(x, w, b, state)
    gy = torch.randn(y.shape, generator=gen).to(dev)
    y.backward(gy)

    xr = x0.to(dev).double().requires_grad_()
    wr = w0.to(dev).double().requires_grad_()
    br = b0.to(dev).double().requires_grad_() if bias else None
    yr = F.conv2d(xr, wr, br, stride, pad, dil, groups)
    yr.backward(gy.double())
    _close(y, yr, "forward")
    _close(x.grad, xr.grad, "input gradient")
    mask_d = mask.to(dev)
    _close(w.grad, wr.grad if dense_grad else wr.grad * mask_d, "weight gradient")
    if not dense_grad:
        assert not bool((w.grad != 0)[~mask_d].any()), "sparse weight gradient off the mask"
    if bias:
        _close(b.grad, br.grad, "bias gradient")
    assert state.calls["weight_grad_dense" if dense_grad else "weight_grad_sparse"] == 1


conv_cases = st.fixed_dictionaries(
    {
        "n": st.integers(1, 5),
        "cg": st.integers(1, 6),
        "og": st.integers(1, 6),
        "groups": st.sampled_from([1, 1, 2, 3]),
        "hw": st.tuples(st.integers(1, 12), st.integers(1, 12)),
        "k": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "stride": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "pad": st.tuples(st.integers(0, 2), st.integers(0, 2)),
        "dil": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "density": st.sampled_from([0.0, 0.05, 0.3, 1.0]),
        "dense_grad": st.booleans(),
        "bias": st.booleans(),
        "seed": st.integers(0, 2**31),
    }
)


def _conv_valid(p) -> bool:
    return all(
        p["hw"][i] + 2 * p["pad"][i] - p["dil"][i] * (p["k"][i] - 1) - 1 >= 0 for i in range(2)
    )


@pytest.mark.parametrize("algo", ["gather", "tiled"])
@GPU_EXAMPLES
@given(conv_cases.filter(_conv_valid))
def test_conv_matches_dense_on_random_shapes(algo, p) -> None:
    _check_conv(**p, algo=algo)


@pytest.mark.parametrize(
    ("n", "c", "o", "hw", "density"),
    [
        (8, 160, 160, (32, 32), 0.05),  # WRN-16-10 group 1 (reduced batch)
        (16, 64, 128, (16, 16), 0.1),
        (32, 512, 512, (4, 4), 0.02),  # VGG16 deep layer: small images, large batch
        (4, 3, 16, (33, 35), 0.5),  # odd sizes, first layer
    ],
)
@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("algo", ["gather", "tiled"])
def test_conv_matches_dense_on_network_shapes(n, c, o, hw, density, dense_grad, algo) -> None:
    _check_conv(n, c, o, 1, hw, (3, 3), (1, 1), (1, 1), (1, 1), density, dense_grad, True, 7, algo)


@pytest.mark.parametrize("algo", ["gather", "tiled"])
def test_conv_strided_grouped_and_large_image_shapes(algo) -> None:
    _check_conv(8, 80, 80, 2, (32, 32), (3, 3), (2, 2), (1, 1), (1, 1), 0.1, False, False, 3, algo)
    _check_conv(8, 16, 32, 1, (15, 15), (1, 1), (2, 2), (0, 0), (1, 1), 0.3, False, True, 4, algo)
    _check_conv(3, 8, 24, 1, (70, 45), (3, 3), (1, 1), (2, 1), (2, 1), 0.2, False, True, 5, algo)
    _check_conv(2, 4, 8, 1, (9, 600), (3, 3), (1, 1), (1, 1), (1, 1), 0.5, False, True, 6, algo)


def _check_linear(lead, batch, n_in, n_out, density, dense_grad, bias, seed):
    C, _, LinearLayerState = _cuda_modules()
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mask = torch.rand((n_out, n_in), generator=gen) < density
    w0 = torch.randn((n_out, n_in), generator=gen) * mask
    b0 = torch.randn(n_out, generator=gen) if bias else None
    x0 = torch.randn((*lead, batch, n_in), generator=gen)
    gy = torch.randn((*lead, batch, n_out), generator=gen).to(dev)
    state = LinearLayerState(name="fc", mask=mask.to(dev), dense_weight_grad=dense_grad)
    x = x0.to(dev).requires_grad_()
    w = w0.to(dev).requires_grad_()
    b = b0.to(dev).requires_grad_() if bias else None
    y = C.sparse_linear(x, w, b, state)
    assert y.shape == (*lead, batch, n_out)
    y.backward(gy)
    xr = x0.to(dev).double().requires_grad_()
    wr = w0.to(dev).double().requires_grad_()
    br = b0.to(dev).double().requires_grad_() if bias else None
    yr = F.linear(xr, wr, br)
    yr.backward(gy.double())
    _close(y, yr, "forward")
    _close(x.grad, xr.grad, "input gradient")
    mask_d = mask.to(dev)
    _close(w.grad, wr.grad if dense_grad else wr.grad * mask_d, "weight gradient")
    if bias:
        _close(b.grad, br.grad, "bias gradient")


@GPU_EXAMPLES
@given(
    st.sampled_from([(), (2,)]),
    st.integers(1, 300),
    st.integers(1, 70),
    st.integers(1, 70),
    st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_linear_matches_dense_on_random_shapes(
    lead, batch, n_in, n_out, density, dense_grad, bias, seed
) -> None:
    _check_linear(lead, batch, n_in, n_out, density, dense_grad, bias, seed)


@pytest.mark.parametrize("batch", [128, 130, 4096])  # float4 path, scalar path, many chunks
def test_linear_matches_dense_on_network_shapes(batch: int) -> None:
    _check_linear((), batch, 3072, 1024, 0.05, False, True, 11)
    _check_linear((), batch, 784, 300, 0.05, True, True, 12)


def test_weight_gradient_is_deterministic_and_inputs_are_not_copied() -> None:
    C, ConvLayerState, _ = _cuda_modules()
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(5)
    mask = (torch.rand((64, 64, 3, 3), generator=gen) < 0.1).to(dev)
    state = ConvLayerState(name="c", mask=mask, dense_weight_grad=False, padding=(1, 1))
    w = (torch.randn((64, 64, 3, 3), generator=gen).to(dev) * mask).requires_grad_()
    x = torch.randn((32, 64, 16, 16), generator=gen).to(dev)
    gy = torch.randn((32, 64, 16, 16), generator=gen).to(dev)
    grads = []
    for _ in range(2):
        w.grad = None
        C.sparse_conv2d(x, w, None, state).backward(gy)
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])
    view = K.as_cupy(x)
    assert int(view.data.ptr) == x.data_ptr()
    assert tuple(view.shape) == tuple(x.shape)


def test_kernels_run_on_the_current_torch_stream() -> None:
    C, _, LinearLayerState = _cuda_modules()
    dev = torch.device("cuda")
    mask = torch.rand((256, 512), device=dev) < 0.1
    state = LinearLayerState(name="fc", mask=mask, dense_weight_grad=False)
    w = torch.randn((256, 512), device=dev) * mask
    x = torch.randn((1024, 512), device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = C.sparse_linear(x, w, None, state)
        expected = x @ w.t()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _close(y, expected, "forward on a side stream")


def test_new_mask_rebuilds_the_device_structure() -> None:
    C, _, LinearLayerState = _cuda_modules()
    dev = torch.device("cuda")
    mask = torch.rand((64, 64), device=dev) < 0.2
    state = LinearLayerState(name="fc", mask=mask, dense_weight_grad=False)
    w = torch.randn((64, 64), device=dev)
    x = torch.randn((16, 64), device=dev)
    _close(C.sparse_linear(x, w * mask, None, state), x @ (w * mask).t(), "first mask")
    mask.copy_(torch.rand((64, 64), device=dev) < 0.5)  # in place, as the adapter does
    _close(C.sparse_linear(x, w * mask, None, state), x @ (w * mask).t(), "second mask")


def test_bad_inputs_are_clear_errors() -> None:
    C, _, LinearLayerState = _cuda_modules()
    from sparsecore.errors import SparseCoreError

    dev = torch.device("cuda")
    mask = torch.ones((4, 8), dtype=torch.bool, device=dev)
    state = LinearLayerState(name="fc1", mask=mask)
    w = torch.randn((4, 8), device=dev)
    with pytest.raises(SparseCoreError, match="fc1.*float32"):
        C.sparse_linear(
            torch.randn((2, 8), device=dev, dtype=torch.float64), w.double(), None, state
        )
    with pytest.raises(SparseCoreError, match="fc1.*8 input features"):
        C.sparse_linear(torch.randn((2, 7), device=dev), w, None, state)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def test_training_with_kernels_equals_dense_masked_training() -> None:
    C, ConvLayerState, LinearLayerState = _cuda_modules()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    ref = _Net().to(dev)
    net = _Net().to(dev)
    net.load_state_dict(ref.state_dict())
    masks = {}
    for name, module in ref.named_children():
        masks[name] = torch.rand(module.weight.shape, device=dev) < 0.2
        with torch.no_grad():
            module.weight.mul_(masks[name])
            getattr(net, name).weight.mul_(masks[name])
    for name, module in net.named_children():
        if isinstance(module, nn.Conv2d):
            state = ConvLayerState(
                name=name,
                mask=masks[name],
                dense_weight_grad=False,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
            )
            module.forward = lambda x, m=module, s=state: C.sparse_conv2d(x, m.weight, m.bias, s)
        else:
            state = LinearLayerState(name=name, mask=masks[name], dense_weight_grad=False)
            module.forward = lambda x, m=module, s=state: C.sparse_linear(x, m.weight, m.bias, s)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator(device="cpu").manual_seed(1)
    for _ in range(20):
        x = torch.randn((64, 3, 16, 16), generator=gen).to(dev)
        target = torch.randint(0, 10, (64,), generator=gen).to(dev)
        for model, opt_ in ((ref, opt_ref), (net, opt)):
            opt_.zero_grad()
            F.cross_entropy(model(x), target).backward()
            if model is ref:
                for name, module in ref.named_children():
                    module.weight.grad.mul_(masks[name])
            opt_.step()
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), net.named_parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-3, atol=1e-4, msg=name)
    for name, module in net.named_children():
        assert not bool((module.weight != 0)[~masks[name]].any()), name
