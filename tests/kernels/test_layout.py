"""The kernels' host-built layouts and geometries give PyTorch's products (checked on CPU).

``sparsecore.kernels.emulate`` follows the CUDA kernels' indexing formula entry by entry; fed the
layouts and geometries the CUDA path uses, it must reproduce dense conv2d / linear forward, input
gradient and weight gradient (on the mask) for any stride, padding, dilation and groups.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from sparsecore.errors import SparseCoreError
from sparsecore.kernels import emulate
from sparsecore.kernels.launch import plan_tiled
from sparsecore.kernels.layout import conv_layout, linear_layout, place_output_grad
from sparsecore.structures import build_conv_csr, build_linear_csr


def _conv_case(seed, n, cg, og, groups, h, w, kh, kw, stride, pad, dil, density):
    rng = np.random.default_rng(seed)
    c, o = cg * groups, og * groups
    mask = rng.random((o, cg, kh, kw)) < density
    weight = (rng.standard_normal(mask.shape) * mask).astype(np.float64)
    x = rng.standard_normal((n, c, h, w))
    return mask, weight, x


conv_params = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31),
        "n": st.integers(1, 3),
        "cg": st.integers(1, 3),
        "og": st.integers(1, 3),
        "groups": st.integers(1, 3),
        "h": st.integers(1, 9),
        "w": st.integers(1, 9),
        "kh": st.integers(1, 3),
        "kw": st.integers(1, 3),
        "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "pad": st.tuples(st.integers(0, 3), st.integers(0, 3)),
        "dil": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "density": st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    }
)


def _valid(p) -> bool:
    for size, k, _s, pd, d in (
        (p["h"], p["kh"], p["stride"][0], p["pad"][0], p["dil"][0]),
        (p["w"], p["kw"], p["stride"][1], p["pad"][1], p["dil"][1]),
    ):
        if size + 2 * pd - d * (k - 1) - 1 < 0:
            return False
    return True


@given(conv_params.filter(_valid))
def test_conv_layout_matches_dense_conv(p) -> None:
    mask, weight, x = _conv_case(**p)
    csr = build_conv_csr(mask, (p["h"], p["w"]), p["stride"], p["pad"], p["dil"], p["groups"])
    layout = conv_layout(csr)
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(weight).requires_grad_(True)
    bias = np.arange(mask.shape[0], dtype=np.float64) / 7
    y_ref = F.conv2d(xt, wt, torch.from_numpy(bias), p["stride"], p["pad"], p["dil"], p["groups"])
    gy = torch.from_numpy(np.random.default_rng(p["seed"] + 1).standard_normal(y_ref.shape))
    y_ref.backward(gy)

    n = x.shape[0]
    ph, pw = p["pad"]
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = emulate.gather(xpad, weight, layout.forward, layout.forward_geometry(n), bias)
    np.testing.assert_allclose(y, y_ref.detach().numpy(), rtol=1e-10, atol=1e-10)

    buf = np.zeros((n, mask.shape[0], layout.grad_h.size, layout.grad_w.size))
    place_output_grad(gy.numpy(), buf, layout)
    dx = emulate.gather(buf, weight, layout.backward, layout.input_grad_geometry(n))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-10)

    dw = emulate.sddmm(xpad, gy.numpy(), layout.forward, layout.forward_geometry(n), mask.size)
    expected = wt.grad.numpy().reshape(-1) * mask.reshape(-1)
    np.testing.assert_allclose(dw, expected, rtol=1e-10, atol=1e-10)


@given(
    st.integers(0, 2**31),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(1, 9),
    st.sampled_from([0.0, 0.3, 1.0]),
)
def test_linear_layout_matches_dense_linear(seed, n_out, n_in, batch, density) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((n_out, n_in)) < density
    weight = rng.standard_normal(mask.shape) * mask
    x = rng.standard_normal((batch, n_in))
    gy = rng.standard_normal((batch, n_out))
    bias = rng.standard_normal(n_out)
    layout = linear_layout(build_linear_csr(mask))

    yt = emulate.gather(x.T.copy(), weight, layout.forward, layout.forward_geometry(batch), bias)
    np.testing.assert_allclose(yt.reshape(n_out, batch).T, x @ weight.T + bias, atol=1e-10)

    dxt = emulate.gather(gy.T.copy(), weight, layout.backward, layout.input_grad_geometry(batch))
    np.testing.assert_allclose(dxt.reshape(n_in, batch).T, gy @ weight, atol=1e-10)

    dw = emulate.sddmm(
        x.T.copy(), gy.T.copy(), layout.forward, layout.forward_geometry(batch), mask.size
    )
    np.testing.assert_allclose(dw.reshape(mask.shape), (gy.T @ x) * mask, atol=1e-10)


def test_conv_backward_offsets_are_flipped_taps() -> None:
    # One weight at (o=1, c=0, r=0, s=2) of a 3x3 kernel, dilation 2: in the gradient buffer
    # (plane Hf x Wf) its transposed offset is o_local*Hf*Wf + (2-0)*2*Wf + (2-2)*2.
    mask = np.zeros((2, 1, 3, 3), dtype=bool)
    mask[1, 0, 0, 2] = True
    layout = conv_layout(build_conv_csr(mask, (6, 7), 1, 2, 2))
    hf, wf = layout.grad_h.size, layout.grad_w.size
    assert (hf, wf) == (6 + 4, 7 + 4)
    assert layout.backward.offsets.tolist() == [1 * hf * wf + 4 * wf + 0]
    assert layout.backward.indptr.tolist() == [0, 1]
    assert layout.backward.wflat.tolist() == [9 + 2]
    assert layout.forward.offsets.dtype == np.int32
    assert layout.backward.wflat.dtype == np.int64
    for a in (*layout.forward.arrays().values(), *layout.backward.arrays().values()):
        assert a.flags.c_contiguous


def test_grad_placement_drops_rows_that_cannot_reach_the_input() -> None:
    # Padding larger than the kernel reach: the first/last output rows only see padding.
    mask = np.ones((1, 1, 1, 1), dtype=bool)
    layout = conv_layout(build_conv_csr(mask, (4, 4), stride=2, padding=2))
    gh = layout.grad_h
    assert gh.size == 4
    assert (gh.first, gh.start, gh.stride) == (1, 0, 2)
    assert gh.last == 2  # output rows 1, 2 read input rows 0, 2
    assert gh.count == 2


def test_linear_geometry_rejects_bad_batch() -> None:
    layout = linear_layout(build_linear_csr(np.ones((3, 4), dtype=bool)))
    with pytest.raises(SparseCoreError, match="batch"):
        layout.forward_geometry(0)
    with pytest.raises(SparseCoreError, match="int32"):
        layout.forward_geometry(2**30)


def test_vector_loads_only_for_aligned_linear_geometry() -> None:
    layout = linear_layout(build_linear_csr(np.ones((3, 4), dtype=bool)))
    assert layout.forward_geometry(128).vector_ok()
    assert not layout.forward_geometry(6).vector_ok()
    conv = conv_layout(build_conv_csr(np.ones((2, 2, 3, 3), dtype=bool), (8, 8), 1, 1))
    assert not conv.forward_geometry(4).vector_ok()


@given(conv_params.filter(_valid))
def test_torch_gradient_placement_matches_the_layout(p) -> None:
    from sparsecore.torch.cuda_kernels import _placed_grad

    mask, _, _ = _conv_case(**p)
    layout = conv_layout(
        build_conv_csr(mask, (p["h"], p["w"]), p["stride"], p["pad"], p["dil"], p["groups"])
    )
    n, o = p["n"], mask.shape[0]
    dy = np.random.default_rng(p["seed"]).standard_normal((n, o, *layout.csr.output_hw))
    expected = np.zeros((n, o, layout.grad_h.size, layout.grad_w.size))
    place_output_grad(dy, expected, layout)
    got = _placed_grad(torch.from_numpy(dy), layout)
    assert got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), expected)


tiled_params = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31),
        "n": st.integers(1, 5),
        "cg": st.integers(1, 4),
        "og": st.integers(1, 20),
        "groups": st.just(1),
        "h": st.one_of(st.integers(1, 9), st.integers(20, 40)),
        "w": st.one_of(st.integers(1, 9), st.integers(20, 40)),
        "kh": st.integers(1, 3),
        "kw": st.integers(1, 3),
        "stride": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "pad": st.tuples(st.integers(0, 2), st.integers(0, 2)),
        "dil": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "density": st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    }
)


@settings(max_examples=25, deadline=None)
@given(tiled_params.filter(_valid))
def test_tiled_kernel_plan_matches_dense_conv(p) -> None:
    mask, weight, x = _conv_case(**p)
    layout = conv_layout(build_conv_csr(mask, (p["h"], p["w"]), p["stride"], p["pad"], p["dil"]))
    xt = torch.from_numpy(x).requires_grad_(True)
    y_ref = F.conv2d(xt, torch.from_numpy(weight), None, p["stride"], p["pad"], p["dil"])
    gy = torch.from_numpy(np.random.default_rng(p["seed"] + 1).standard_normal(y_ref.shape))
    y_ref.backward(gy)
    n = x.shape[0]
    ph, pw = p["pad"]
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))

    geom, tiling = layout.forward_geometry(n), layout.forward_tiling()
    assert tiling is not None
    plan = plan_tiled(geom, tiling)
    assert plan is not None and plan.per_block <= 512
    assert plan.NB * plan.HB * tiling.plane_w * plan.CH <= 12288
    y = emulate.gather_tiled(xpad, weight, layout.forward, geom, tiling, plan)
    np.testing.assert_allclose(y, y_ref.detach().numpy(), rtol=1e-10, atol=1e-10)

    buf = np.zeros((n, mask.shape[0], layout.grad_h.size, layout.grad_w.size))
    place_output_grad(gy.numpy(), buf, layout)
    geom, tiling = layout.input_grad_geometry(n), layout.input_grad_tiling()
    assert tiling is not None
    plan = plan_tiled(geom, tiling)
    assert plan is not None
    dx = emulate.gather_tiled(buf, weight, layout.backward, geom, tiling, plan)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_tiled_plan_shapes_for_network_layers() -> None:
    mask = np.ones((16, 160, 3, 3), dtype=bool)
    layout = conv_layout(build_conv_csr(mask, (32, 32), 1, 1))
    plan = plan_tiled(layout.forward_geometry(128), layout.forward_tiling())
    # 32x32 outputs: bands of 16 output rows (18 input rows of 34), 2 bands per image.
    assert (plan.NB, plan.PB, plan.HB, plan.p_tiles) == (1, 16, 18, 2)
    assert plan.CH == 12288 // (18 * 34)
    assert plan.grid == (1, 256, 1)
    small = conv_layout(build_conv_csr(np.ones((4, 8, 3, 3), dtype=bool), (4, 4), 1, 1))
    plan = plan_tiled(small.forward_geometry(128), small.forward_tiling())
    assert (plan.NB, plan.PB, plan.p_tiles) == (32, 4, 1) and plan.grid[1] == 4
    grouped = conv_layout(build_conv_csr(np.ones((4, 2, 3, 3), dtype=bool), (8, 8), 1, 1, 1, 2))
    assert grouped.forward_tiling() is None
