"""attach(kernels='compact' | 'compact+cpu'): layers computed on their active channels only.

The compact layers must compute what the masked dense layers compute (outputs and input/bias
gradients), with the router's weight-gradient contract: the full dense gradient inside the window
before a mask update, the gradient on the mask outside it. So training with them equals training
without them, same masks and weights to float64 tolerance, over runs with several mask changes.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hst
from torch import nn

import sparsecore.torch as st
from sparsecore import SparseCoreError
from sparsecore.datasets import load_embedded_fashion_mnist
from sparsecore.torch.compact_functions import CompactFunction, CompactLayerState
from sparsecore.torch.kernel_router import _conv_padding


# -- one layer -------------------------------------------------------------------------------------
def _layer_case(layer: nn.Module, x_shape: tuple[int, ...], seed: int, inner: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    layer = layer.double()
    mask = torch.rand(layer.weight.shape, generator=gen) < 0.3
    mask[torch.randperm(mask.shape[0], generator=gen)[: mask.shape[0] // 3]] = False
    mask[:, torch.randperm(mask.shape[1], generator=gen)[: mask.shape[1] // 3]] = False
    with torch.no_grad():
        layer.weight.mul_(mask)
    padding = _conv_padding(layer) if isinstance(layer, nn.Conv2d) else None
    for dense in (True, False):
        state = CompactLayerState(
            name="layer",
            mask=mask,
            dense_weight_grad=dense,
            module=layer,
            inner=inner,
            min_sparsity=0.0,
            padding=padding,
        )
        x = torch.randn(x_shape, generator=gen, dtype=torch.float64, requires_grad=True)
        params = [x, layer.weight, layer.bias]
        y = CompactFunction.apply(x, layer.weight, layer.bias, state)
        dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(y, params, dy)
        y_ref = layer(x)
        want = list(torch.autograd.grad(y_ref, params, dy))
        if not dense:
            want[1] = want[1] * mask  # gradient on the mask only outside the window
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        kept_rows = int((mask.flatten(1).any(1)).sum())
        kept_cols = int(mask.transpose(0, 1).flatten(1).any(1).sum())
        assert state.block_shape()[:2] == (kept_rows, kept_cols)
        assert kept_rows < mask.shape[0] and kept_cols < mask.shape[1]
        assert sum(state.shapes.values()) == 1
        # reflect padding: no sparse kernel takes it, so dense kernels run on the block
        sparse_inner = inner == "cpu" and (padding is not None or isinstance(layer, nn.Linear))
        assert state.calls["block_sparse" if sparse_inner else "block_dense"] == 1


@settings(max_examples=12, deadline=None)
@given(
    seed=hst.integers(0, 2**16),
    stride=hst.sampled_from([1, 2]),
    padding=hst.sampled_from([0, 1, 2]),
    dilation=hst.sampled_from([1, 2]),
    mode=hst.sampled_from(["zeros", "reflect"]),
    inner=hst.sampled_from(["dense", "cpu"]),
)
def test_compact_conv_equals_masked_conv(
    seed: int, stride: int, padding: int, dilation: int, mode: str, inner: str
) -> None:
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 7, 3, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
    _layer_case(conv, (3, 6, 9, 9), seed, inner)


@pytest.mark.parametrize("inner", ["dense", "cpu"])
@pytest.mark.parametrize("x_shape", [(4, 3, 20), (20,)])  # leading dimensions kept; unbatched
def test_compact_linear_equals_masked_linear(inner: str, x_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    _layer_case(nn.Linear(20, 12), x_shape, 0, inner)


# -- training --------------------------------------------------------------------------------------
def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_embedded_fashion_mnist()
    x = torch.from_numpy(data.train_images[:n]).double().div(255).unsqueeze(1)
    return x, torch.from_numpy(data.train_labels[:n]).long()


def _mlp() -> nn.Module:
    # LeNet-300-100 on 14x14 images: at 2% density some units start empty, more columns unread.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(196, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    ).double()


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 10),
    ).double()


def _train(
    make: object,
    kernels: str | None,
    *,
    momentum: float,
    density: float,
    steps: int,
    windows: list[bool] | None = None,
    **options: object,
) -> tuple[nn.Module, object, list[bool]]:
    """Train on the embedded Fashion-MNIST subset; returns the model, the handle and, per step,
    whether the weight gradient was dense. With ``windows`` (reference runs without kernels), the
    gradients of the steps marked False are masked, as the router's are outside its window."""
    assert callable(make)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=1e-4)
    sparse = st.attach(
        model,
        opt,
        density=density,
        update_every=5,
        total_steps=steps,
        kernels=kernels,
        seed=1,
        **options,
    )
    if kernels is not None:
        sparse.kernel_router.min_sparsity = 0.0  # inner sparse kernels on every block
        sparse.kernel_router.refresh()
    x, y = _data(steps * 16)
    flags: list[bool] = []
    for step in range(steps):
        if kernels is not None:
            flags.append(sparse.kernel_router.dense_weight_grad)
        opt.zero_grad()
        F.cross_entropy(
            model(x[step * 16 : (step + 1) * 16]), y[step * 16 : (step + 1) * 16]
        ).backward()
        if windows is not None and not windows[step]:
            for t in sparse.targets:
                t.param.grad.mul_(sparse.mask(t.name))
        opt.step()
    return model, sparse, flags


def _assert_same_training(a: tuple, b: tuple) -> None:
    (model_a, sparse_a, _), (model_b, sparse_b, _) = a, b
    assert len(sparse_a.history) >= 3
    assert [r.step for r in sparse_a.history] == [r.step for r in sparse_b.history]
    for name in sparse_a.names:
        assert torch.equal(sparse_a.mask(name), sparse_b.mask(name)), name
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("kernels", ["compact", "compact+cpu"])
def test_mlp_training_compact_equals_training_without(kernels: str) -> None:
    """Momentum 0.9: a window of 10 steps covers every update interval of 5, so every step has
    the full dense weight gradient, exactly as without kernels."""
    run = _train(_mlp, kernels, momentum=0.9, density=0.02, steps=21)
    ref = _train(_mlp, None, momentum=0.9, density=0.02, steps=21)
    _assert_same_training(run, ref)
    tel = run[1].kernel_router.telemetry()
    assert tel["dense_grad_steps"] == 20  # the step after the last update needs none
    layers = tel["layers"]
    # the compact layers really ran on fewer rows / columns, and were gathered again
    assert layers["2.weight"]["shape_run"][0] < 300  # empty hidden units of the first layer
    assert layers["4.weight"]["shape_run"][1] < 300  # their columns, unread by the second layer
    assert min(int(s.split("x")[1]) for s in layers["6.weight"]["shapes_run"]) < 100
    assert all(len(layers[n]["shapes_run"]) >= 2 for n in ("4.weight", "6.weight"))
    assert all(layers[n]["rebuilds"] >= 4 for n in layers)
    block = "block_sparse" if kernels == "compact+cpu" else "block_dense"
    assert all(layers[n]["calls"][block] == 21 for n in layers)


@pytest.mark.parametrize("kernels", ["compact", "compact+cpu"])
def test_convnet_training_compact_short_window(kernels: str) -> None:
    """Momentum 0.5: a window of 2 steps, so most steps take the gradient on the mask; the
    reference masks its dense gradients on the same steps."""
    # Every layer keeps 5% (uniform initial densities, no redistribution) and units are neither covered nor revived, so a 5x5 filter of one
    # channel (1.25 weights on average) is often empty.
    options = {
        "density": 0.05,
        "redistribution": "none",
        "init": "uniform",
        "cover_units": False,
        "revive_dead_units": False,
        "steps": 16,
    }
    run = _train(_convnet, kernels, momentum=0.5, **options)  # type: ignore[arg-type]
    flags = run[2]
    assert 0 < sum(flags) < len(flags)
    ref = _train(_convnet, None, momentum=0.5, windows=flags, **options)  # type: ignore[arg-type]
    _assert_same_training(run, ref)
    layers = run[1].kernel_router.telemetry()["layers"]
    assert layers["0.weight"]["shape_run"][0] < 16  # empty filters of the first convolution
    assert layers["6.weight"]["shape_run"][1] < 16 * 6 * 6  # unread features
    assert layers["0.weight"]["calls"]["weight_grad_sparse"] > 0
    assert layers["0.weight"]["calls"]["weight_grad_dense"] > 0


def test_window_sees_momentum_of_empty_units() -> None:
    """Inside the window, an empty unit's and an unread column's weights get their dense
    gradient (so momentum growth can regrow them); outside it, none."""
    torch.manual_seed(0)
    fc = nn.Linear(6, 4).double()
    model = nn.Sequential(fc)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    sparse = st.attach(model, opt, density=0.25, update_every=10, total_steps=40, kernels="compact")
    mask = sparse.mask("0.weight")
    with torch.no_grad():
        mask.zero_()
        mask[0, 1] = mask[2, 3] = True
    sparse._keep[0].copy_(mask)
    sparse.kernel_router.refresh()
    x = torch.randn(5, 6, dtype=torch.float64)
    for dense in (True, False):
        sparse.kernel_router.set_dense_weight_grad(dense)
        opt.zero_grad()
        model(x).sum().backward()
        grad = fc.weight.grad
        assert sparse.kernel_router.telemetry()["layers"]["0.weight"]["shape_run"] == [2, 2]
        if dense:
            torch.testing.assert_close(grad, torch.ones(4, 1, dtype=grad.dtype) * x.sum(0))
        else:
            assert bool((grad[~mask] == 0).all()) and bool((grad[mask] != 0).all())


@pytest.mark.parametrize("bad", ["compact+gpu", "Compact", "compact+auto", ""])
def test_bad_kernels_value_refused(bad: str) -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        SparseCoreError, match="kernels must be one of .*got " + re.escape(repr(bad))
    ):
        st.attach(model, density=0.1, total_steps=10, kernels=bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    st.attach(model, density=0.1, total_steps=10, kernels="compact").detach()


def test_grouped_convolution_stays_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    sparse = st.attach(model, density=0.3, total_steps=10, kernels="compact")
    layers = sparse.kernel_router.telemetry()["layers"]
    assert not layers["0.weight"]["installed"] and "groups=2" in layers["0.weight"]["reason"]
    assert layers["2.weight"]["installed"]
    out = model(torch.randn(2, 4, 6, 6))
    assert out.shape == (2, 3)
    sparse.detach()
    assert "forward" not in model[2].__dict__


# -- telemetry, report, summary ----------------------------------------------------------------
def test_shapes_run_and_step_times_reach_the_report_and_summary() -> None:
    from sparsecore.reporting import format_table
    from sparsecore.telemetry import RunRecord, flops_section
    from sparsecore.torch.flops import count_flops

    model, sparse, _ = _train(_mlp, "compact", momentum=0.9, density=0.02, steps=11)
    tel = sparse.kernel_router.telemetry()
    times = tel["step_time_s"]
    # the first step has no previous end; every later one is timed, inside the window or not
    assert times["window"]["steps"] + times["outside_window"].get("steps", 0) == 10
    assert 0 < times["window"]["min"] <= times["window"]["mean"]
    x, _ = _data(16)
    masks = {name: sparse.mask(name) for name in sparse.names}
    section = flops_section(count_flops(model, x, masks), batch=16, kernels=tel)
    fc1 = next(e for e in section["layers"] if e["name"] == "2")
    assert fc1["shape_run"] == tel["layers"]["2.weight"]["shape_run"]
    assert fc1["units"] == 300 and fc1["inputs"] == 196
    mask = sparse.mask("2.weight")
    assert fc1["units_removed"] >= int((~mask.any(dim=1)).sum()) > 0  # cross-layer: maybe more
    assert section["kernels"] == "compact" and section["step_time_s"] == times
    record = RunRecord.from_reports(sparse.history, flops=section)
    text = format_table(record)
    assert "units removed" in text and "shape run" in text
    assert "x".join(map(str, fc1["shape_run"])) in text
    assert "time per step (kernels='compact'): dense-gradient window " in text
    lines: list[str] = []
    sparse.summary(print_fn=lines.append)
    assert lines[1].split()[-6:] == ["units", "removed", "inputs", "unread", "shape", "run"]
    fc1_row = next(line for line in lines if line.startswith("2.weight"))
    rows_run, cols_run = tel["layers"]["2.weight"]["shape_run"]
    assert fc1_row.split()[-3:] == [
        f"{300 - rows_run}/300",
        f"{196 - cols_run}/196",
        f"{rows_run}x{cols_run}",
    ]


def test_compact_cuda_without_a_gpu_runs_dense_kernels_on_the_blocks() -> None:
    """kernels='compact+cuda' on CPU layers: compaction still runs, the CUDA kernels cannot, and
    the telemetry says so (as kernels='cuda' leaves CPU layers to the dense path)."""
    model = _mlp()
    sparse = st.attach(model, density=0.02, total_steps=10, kernels="compact+cuda")
    sparse.kernel_router.min_sparsity = 0.0
    sparse.kernel_router.refresh()
    out = model(_data(4)[0])
    assert out.shape == (4, 10)
    layers = sparse.kernel_router.telemetry()["layers"]
    assert all(
        layer["installed"] and layer["block_kernels"] == "dense" for layer in layers.values()
    )
    assert all(layer["calls"]["block_dense"] == 1 for layer in layers.values())
