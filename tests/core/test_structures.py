"""Tests of the sparse index structures shared by the CPU and GPU kernels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecore.structures import build_conv_csr, build_linear_csr, conv_output_hw


def _random_mask(rng: np.random.Generator, shape: tuple[int, ...], density: float) -> np.ndarray:
    return rng.random(shape) < density


def _check_linear(mask: np.ndarray) -> None:
    csr = build_linear_csr(mask)
    n_out, n_in = mask.shape
    assert csr.shape == (n_out, n_in)
    assert csr.nnz == int(mask.sum())
    for arr, dtype in [
        (csr.indptr, np.int32),
        (csr.indices, np.int32),
        (csr.rows, np.int32),
        (csr.flat, np.int64),
        (csr.row_order, np.int32),
        (csr.t_indptr, np.int32),
        (csr.t_indices, np.int32),
        (csr.t_perm, np.int32),
        (csr.t_row_order, np.int32),
    ]:
        assert arr.dtype == dtype
        assert arr.flags.c_contiguous
    # The CSR reproduces the mask, column indices ascend inside a row.
    rebuilt = np.zeros_like(mask)
    for o in range(n_out):
        cols = csr.indices[csr.indptr[o] : csr.indptr[o + 1]]
        assert np.all(np.diff(cols) > 0)
        rebuilt[o, cols] = True
        assert np.all(csr.rows[csr.indptr[o] : csr.indptr[o + 1]] == o)
    np.testing.assert_array_equal(rebuilt, mask)
    # flat gathers the values in CSR order.
    w = np.arange(mask.size, dtype=np.float64).reshape(mask.shape) + 1.0
    values = w.reshape(-1)[csr.flat]
    dense = np.zeros_like(w)
    for o in range(n_out):
        sl = slice(csr.indptr[o], csr.indptr[o + 1])
        dense[o, csr.indices[sl]] = values[sl]
    np.testing.assert_array_equal(dense, np.where(mask, w, 0.0))
    # Transposed structure reproduces W^T with values[t_perm].
    t_values = values[csr.t_perm]
    dense_t = np.zeros((n_in, n_out))
    for i in range(n_in):
        sl = slice(csr.t_indptr[i], csr.t_indptr[i + 1])
        assert np.all(np.diff(csr.t_indices[sl]) > 0)
        dense_t[i, csr.t_indices[sl]] = t_values[sl]
    np.testing.assert_array_equal(dense_t, dense.T)
    # Row orders: a permutation, by count descending, ties by lower index.
    counts = np.diff(csr.indptr)
    assert sorted(csr.row_order.tolist()) == list(range(n_out))
    keys = [(-counts[r], r) for r in csr.row_order]
    assert keys == sorted(keys)
    t_counts = np.diff(csr.t_indptr)
    assert sorted(csr.t_row_order.tolist()) == list(range(n_in))
    t_keys = [(-t_counts[r], r) for r in csr.t_row_order]
    assert t_keys == sorted(t_keys)


def test_linear_hand_example() -> None:
    mask = np.array([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=bool)
    csr = build_linear_csr(mask)
    assert csr.indptr.tolist() == [0, 2, 2, 5]
    assert csr.indices.tolist() == [1, 3, 0, 1, 2]
    assert csr.flat.tolist() == [1, 3, 8, 9, 10]
    assert csr.row_order.tolist() == [2, 0, 1]
    assert csr.t_indptr.tolist() == [0, 1, 3, 4, 5]
    assert csr.t_indices.tolist() == [2, 0, 2, 2, 0]
    assert csr.t_perm.tolist() == [2, 0, 3, 4, 1]
    assert csr.t_row_order.tolist() == [1, 0, 2, 3]
    assert csr.density == pytest.approx(5 / 12)


@settings(max_examples=40, deadline=None)
@given(
    n_out=st.integers(1, 9),
    n_in=st.integers(1, 9),
    density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_linear_property(n_out: int, n_in: int, density: float, seed: int) -> None:
    _check_linear(_random_mask(np.random.default_rng(seed), (n_out, n_in), density))


def test_linear_empty_and_full() -> None:
    _check_linear(np.zeros((4, 3), dtype=bool))
    _check_linear(np.ones((4, 3), dtype=bool))
    empty = build_linear_csr(np.zeros((4, 3), dtype=bool))
    assert empty.nnz == 0 and empty.indptr.tolist() == [0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    ("bad", "error", "words"),
    [
        (np.ones((2, 3), dtype=np.float32), TypeError, "dtype bool"),
        (np.ones((2, 3, 1), dtype=bool), ValueError, "2 dimensions"),
        ([[True, False]], TypeError, "numpy.ndarray"),
    ],
)
def test_linear_bad_input(bad: object, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words) as info:
        build_linear_csr(bad, name="fc1")  # type: ignore[arg-type]
    assert "fc1" in str(info.value)


def _conv_reference(x: np.ndarray, w: np.ndarray, stride, padding, dilation, groups) -> np.ndarray:
    """Plain-loop dense convolution (cross-correlation, as PyTorch)."""
    n, _c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho, wo = conv_output_hw((h, wd), (kh, kw), stride, padding, dilation)
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    y = np.zeros((n, o, ho, wo))
    per_group = o // groups
    for oc in range(o):
        g = oc // per_group
        for cl in range(cg):
            for r in range(kh):
                for s in range(kw):
                    rs = r * dilation[0]
                    ss = s * dilation[1]
                    patch = xp[
                        :,
                        g * cg + cl,
                        rs : rs + stride[0] * (ho - 1) + 1 : stride[0],
                        ss : ss + stride[1] * (wo - 1) + 1 : stride[1],
                    ]
                    y[:, oc] += w[oc, cl, r, s] * patch
    return y


def _conv_via_structure(x: np.ndarray, w: np.ndarray, csr) -> np.ndarray:
    """Direct sparse convolution written from the documented meaning of the offsets."""
    n = x.shape[0]
    cg = csr.in_channels // csr.groups
    _hp, wp = csr.padded_hw
    ho, wo = csr.output_hw
    ph, pw = csr.padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    values = w.reshape(-1)[csr.flat]
    per_group = csr.out_channels // csr.groups
    pix = np.arange(ho)[:, None] * csr.stride[0] * wp + np.arange(wo)[None, :] * csr.stride[1]
    y = np.zeros((n, csr.out_channels, ho, wo))
    for o in range(csr.out_channels):
        g = o // per_group
        group_flat = xp[:, g * cg : (g + 1) * cg].reshape(n, -1)
        for k in range(csr.indptr[o], csr.indptr[o + 1]):
            y[:, o] += values[k] * group_flat[:, csr.offsets[k] + pix]
    return y


@settings(max_examples=40, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 3]),
    cg=st.integers(1, 3),
    opg=st.integers(1, 3),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    extra=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    density=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_conv_structure_matches_dense(
    groups, cg, opg, kh, kw, stride, padding, dilation, extra, density, seed
) -> None:
    rng = np.random.default_rng(seed)
    o = opg * groups
    c = cg * groups
    h = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]) + extra[0]
    wd = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]) + extra[1]
    mask = _random_mask(rng, (o, cg, kh, kw), density)
    w = rng.standard_normal((o, cg, kh, kw)) * mask
    x = rng.standard_normal((2, c, h, wd))
    csr = build_conv_csr(mask, (h, wd), stride, padding, dilation, groups)
    assert csr.nnz == int(mask.sum())
    assert csr.weight_shape == mask.shape
    assert csr.padded_hw == (h + 2 * padding[0], wd + 2 * padding[1])
    np.testing.assert_allclose(
        _conv_via_structure(x, w, csr),
        _conv_reference(x, w, stride, padding, dilation, groups),
        rtol=1e-12,
        atol=1e-12,
    )
    # Decomposed taps agree with flat and offsets.
    hp, wp = csr.padded_hw
    o_of = np.repeat(np.arange(o), np.diff(csr.indptr))
    np.testing.assert_array_equal(
        csr.flat, ((o_of * cg + csr.chan) * kh + csr.tap_r) * kw + csr.tap_s
    )
    np.testing.assert_array_equal(
        csr.offsets,
        csr.chan * hp * wp + csr.tap_r * dilation[0] * wp + csr.tap_s * dilation[1],
    )
    # Transposed structure: rows are global input channels, entries point back into the CSR.
    per_group = o // groups
    for ci in range(c):
        sl = slice(csr.t_indptr[ci], csr.t_indptr[ci + 1])
        ks = csr.t_perm[sl]
        assert np.all(o_of[ks] == csr.t_out[sl])
        assert np.all((o_of[ks] // per_group) * cg + csr.chan[ks] == ci)
        assert np.all(np.diff(csr.flat[ks]) > 0)
    assert sorted(csr.t_perm.tolist()) == list(range(csr.nnz))
    counts = np.diff(csr.indptr)
    keys = [(-counts[r], r) for r in csr.row_order]
    assert keys == sorted(keys) and len(keys) == o
    t_counts = np.diff(csr.t_indptr)
    t_keys = [(-t_counts[r], r) for r in csr.t_row_order]
    assert t_keys == sorted(t_keys) and len(t_keys) == c


def test_conv_hand_offsets() -> None:
    mask = np.zeros((1, 2, 3, 3), dtype=bool)
    mask[0, 1, 2, 1] = True
    mask[0, 0, 0, 0] = True
    csr = build_conv_csr(mask, (5, 6), stride=1, padding=(1, 2), dilation=(2, 1))
    hp, wp = 7, 10
    assert csr.padded_hw == (hp, wp)
    assert csr.output_hw == (3, 8)
    assert csr.offsets.tolist() == [0, 1 * hp * wp + 2 * 2 * wp + 1]
    assert csr.flat.tolist() == [0, 9 + 2 * 3 + 1]


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"input_hw": (2, 2)}, ValueError, "too small"),
        ({"input_hw": (8, 8), "groups": 3}, ValueError, "divisible by groups"),
        ({"input_hw": (8, 8), "stride": 0}, ValueError, "stride"),
        ({"input_hw": (8, 8), "padding": -1}, ValueError, "padding"),
        ({"input_hw": (8, 8), "dilation": (1, 2, 3)}, TypeError, "dilation"),
        ({"input_hw": (8, 8), "groups": 0}, ValueError, "groups"),
        ({"input_hw": "8"}, TypeError, "input_hw"),
    ],
)
def test_conv_bad_input(kwargs: dict, error: type[Exception], words: str) -> None:
    mask = np.ones((4, 2, 3, 3), dtype=bool)
    with pytest.raises(error, match=words) as info:
        build_conv_csr(mask, name="conv3", **kwargs)
    assert "conv3" in str(info.value)


def test_conv_bad_mask() -> None:
    with pytest.raises(TypeError, match="conv1"):
        build_conv_csr(np.ones((2, 2, 3, 3), dtype=np.int8), (8, 8), name="conv1")
    with pytest.raises(ValueError, match="4 dimensions"):
        build_conv_csr(np.ones((2, 2, 3), dtype=bool), (8, 8))
